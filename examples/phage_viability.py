"""Zero-shot fitness on real labels: does the model's likelihood rank viable phage genomes above non-viable ones?

    python examples/phage_viability.py --ckpt-dir CKPT --out-dir outputs/phage_viability
        [--viable examples/data/viable_generated_phage_genomes.fasta]
        [--nonviable examples/data/nonviable_generated_phage_genomes.fasta] [--max-per-class N] [--no-rc]

The genomes are 302 AI-designed phiX174-like phages with their experimental outcome (16 produced plaques). Each is
scored by its mean log-likelihood per base (averaged with its reverse complement unless ``--no-rc``), and the score
is used as a classifier of viability: AUROC, a ROC curve (``roc.png``), a score histogram per class
(``scores_hist.png``), and every score (``scores.tsv``, ``summary.json``). Without ``--ckpt-dir`` it uses the bundled
self-test checkpoint (the quick-start model: ``striped_hyena_tiny`` trained on 39 natural phiX174-like genomes).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plots import pyplot, roc_png  # noqa: E402  (examples/plots.py)

DATA = Path(__file__).resolve().parent / "data"
logger = logging.getLogger("phage_viability")


def read_labelled(viable: Path, nonviable: Path, max_per_class: int | None, seed: int):
    from evo2_recipe.data.fasta import iter_fasta

    rows = []
    for path, label in ((viable, 1), (nonviable, 0)):
        records = list(iter_fasta(path))
        if max_per_class and len(records) > max_per_class:  # a reproducible subset (CI, quick looks)
            records = random.Random(seed).sample(records, max_per_class)
        rows += [(name, seq, label) for name, seq in records]
    return rows


def plot(scores, labels, fpr, tpr, auroc: float, out_dir: Path) -> None:
    roc_png(fpr, tpr, auroc, "mean log-likelihood", "Phage viability, zero-shot", out_dir / "roc.png")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label, name in ((0, "non-viable"), (1, "viable")):
        ax.hist([s for s, y in zip(scores, labels) if y == label], bins=30, alpha=0.6, density=True,
                label=f"{name} (n={sum(y == label for y in labels)})")
    ax.set(xlabel="mean log-likelihood per base (nats)", ylabel="density")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "scores_hist.png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt-dir", help="checkpoint to score with (default: the bundled self-test checkpoint)")
    p.add_argument("--viable", type=Path, default=DATA / "viable_generated_phage_genomes.fasta")
    p.add_argument("--nonviable", type=Path, default=DATA / "nonviable_generated_phage_genomes.fasta")
    p.add_argument("--out-dir", type=Path, default=Path("outputs/phage_viability"))
    p.add_argument("--max-per-class", type=int, help="score at most this many genomes of each class (random subset)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--no-rc", action="store_true", help="do not average with the reverse complement")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from evo2_recipe.cli.common import apply_runtime_mode, setup_logging

    setup_logging()  # our log lines and real warnings, no dependency chatter
    apply_runtime_mode()  # first, before megatron's import: the fixes, and CPU mode (hiding TE) without a GPU
    from sklearn.metrics import roc_auc_score, roc_curve

    from evo2_recipe.inference import selftest
    from evo2_recipe.inference.api import Evo2

    rows = read_labelled(args.viable, args.nonviable, args.max_per_class, args.seed)
    evo = Evo2.from_checkpoint(args.ckpt_dir or str(selftest.CHECKPOINT))
    logger.info("scoring %d genomes (%d viable)%s", len(rows), sum(r[2] for r in rows),
                "" if args.no_rc else ", averaged with their reverse complements")
    scores = evo.score([seq for _, seq, _ in rows], reduce="mean", batch_size=args.batch_size,
                       average_reverse_complement=not args.no_rc)
    labels = [label for _, _, label in rows]
    auroc = float(roc_auc_score(labels, scores))
    fpr, tpr, _ = roc_curve(labels, scores)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    with open(args.out_dir / "scores.tsv", "w") as f:
        f.write("id\tviable\tmean_log_likelihood\n")
        f.writelines(f"{name}\t{label}\t{score:.6f}\n" for (name, _, label), score in zip(rows, scores))
    plot(scores, labels, fpr, tpr, auroc, args.out_dir)
    summary = {"auroc": auroc, "n_viable": sum(labels), "n_nonviable": len(labels) - sum(labels),
               "checkpoint": args.ckpt_dir or "bundled self-test checkpoint", "rc_averaged": not args.no_rc}
    (args.out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    logger.info("AUROC %.3f (%d viable vs %d non-viable); plots and scores in %s", auroc, summary["n_viable"],
                summary["n_nonviable"], args.out_dir)
    return summary


if __name__ == "__main__":
    main()
