"""Zero-shot BRCA1 variant effects (the reference's headline example): delta log-likelihood of each SNV vs its
loss-of-function class in saturation genome editing (Findlay et al. 2018).

    python examples/brca1_variant_effects.py --ckpt-dir CKPT --reference chr17.fa --out-dir outputs/brca1
        [--window-size 8192] [--batch-size 8] [--no-rc] [--max-variants N] [--reference-offset 0]

``--reference`` is the GRCh37/hg19 chromosome 17 FASTA, which cannot be bundled: download ``chr17.fa.gz`` from UCSC
(hgdownload.soe.ucsc.edu/goldenPath/hg19/chromosomes/) or take chr17 of Ensembl's GRCh37 primary assembly. A file
holding only a region works too: ``--reference-offset N`` says that its first base is chromosome position N+1.

For each SNV a window of ``--window-size`` bases centred on it is cut from the reference and scored with the
reference and the alternative base (mean log-likelihood, averaged with the reverse complement unless ``--no-rc``);
``delta = score(alt) - score(ref)``. Loss-of-function variants should get lower deltas: AUROC of ``-delta`` for LOF
vs FUNC/INT, a ROC curve (``roc.png``), delta distributions per class (``delta_by_class.png``) and every score
(``scores.tsv``, ``summary.json``). The reference base of every variant is checked against the FASTA (a mismatch means
the wrong assembly or offset). Published with Evo 2 at 8,192-base windows: AUROC 0.73-0.76 (1B), 0.87-0.88 (7B).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plots import pyplot, roc_png  # noqa: E402  (examples/plots.py)

DATA = Path(__file__).resolve().parent / "data"
logger = logging.getLogger("brca1")


def read_variants(path: Path, max_variants: int | None) -> list[dict]:
    with open(path) as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if max_variants:
        rows = rows[:max_variants]
    for r in rows:
        r["position_hg19"] = int(r["position_hg19"])
        r["lof"] = int(r["func_class"] == "LOF")
    return rows


def windows(variants: list[dict], chrom: str, offset: int, size: int) -> tuple[list[str], list[str]]:
    """Reference and alternative windows centred on each SNV (0-based index ``size // 2`` holds the variant)."""
    refs, alts = [], []
    for v in variants:
        i = v["position_hg19"] - 1 - offset  # 0-based index of the variant in the FASTA sequence
        if not 0 <= i < len(chrom):
            raise ValueError(f"variant at chr17:{v['position_hg19']} lies outside the reference (length "
                             f"{len(chrom)}, offset {offset}); give the whole chromosome or the right offset")
        if chrom[i].upper() != v["reference"]:
            raise ValueError(f"reference base at chr17:{v['position_hg19']} is {chrom[i]!r} but the table says "
                             f"{v['reference']!r}: the FASTA is not GRCh37 chr17 or --reference-offset is wrong")
        start = max(0, i - size // 2)
        seq = chrom[start:start + size].upper()
        j = i - start
        refs.append(seq)
        alts.append(seq[:j] + v["alt"] + seq[j + 1:])
    return refs, alts


def plot(variants: list[dict], deltas: list[float], fpr, tpr, auroc: float, out_dir: Path) -> None:
    roc_png(fpr, tpr, auroc, "-delta log-likelihood", "BRCA1 SNVs: LOF vs FUNC/INT", out_dir / "roc.png")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    classes = sorted({v["func_class"] for v in variants})
    ax.boxplot([[d for v, d in zip(variants, deltas) if v["func_class"] == c] for c in classes], tick_labels=classes)
    ax.set(ylabel="delta log-likelihood (alt - ref)", title="Delta by SGE class")
    fig.tight_layout()
    fig.savefig(out_dir / "delta_by_class.png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt-dir", required=True)
    p.add_argument("--reference", type=Path, required=True, help="GRCh37 chr17 FASTA (or a region of it)")
    p.add_argument("--reference-offset", type=int, default=0,
                   help="chromosome position of the FASTA's first base minus one (0 for the whole chromosome)")
    p.add_argument("--variants", type=Path, default=DATA / "findlay2018_brca1_sge.tsv")
    p.add_argument("--out-dir", type=Path, default=Path("outputs/brca1"))
    p.add_argument("--window-size", type=int, default=8192)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--no-rc", action="store_true", help="do not average with the reverse complement")
    p.add_argument("--max-variants", type=int, help="only the first N variants of the table")
    args = p.parse_args(argv)
    from evo2_recipe.cli.common import apply_runtime_mode, setup_logging

    setup_logging()  # our log lines and real warnings, no dependency chatter
    apply_runtime_mode()  # first, before megatron's import: the fixes, and CPU mode (hiding TE) without a GPU
    from sklearn.metrics import roc_auc_score, roc_curve

    from evo2_recipe.data.fasta import iter_fasta
    from evo2_recipe.inference.api import Evo2

    variants = read_variants(args.variants, args.max_variants)
    records = list(iter_fasta(args.reference))
    if len(records) != 1:
        raise SystemExit(f"{args.reference}: expected one sequence (chr17), found {len(records)}")
    try:
        refs, alts = windows(variants, records[0][1], args.reference_offset, args.window_size)
    except ValueError as e:
        raise SystemExit(f"brca1_variant_effects: error: {e}") from None
    if len({v["lof"] for v in variants}) < 2:
        raise SystemExit("the selected variants hold only one class; AUROC needs LOF and FUNC/INT variants")
    evo = Evo2.from_checkpoint(str(args.ckpt_dir))
    logger.info("scoring %d SNVs (%d LOF) in %d-base windows%s", len(variants), sum(v["lof"] for v in variants),
                args.window_size, "" if args.no_rc else ", averaged with the reverse complement")
    kw = dict(reduce="mean", batch_size=args.batch_size, average_reverse_complement=not args.no_rc)
    ref_scores, alt_scores = evo.score(refs, **kw), evo.score(alts, **kw)
    deltas = [a - r for a, r in zip(alt_scores, ref_scores)]
    labels = [v["lof"] for v in variants]
    auroc = float(roc_auc_score(labels, [-d for d in deltas]))
    fpr, tpr, _ = roc_curve(labels, [-d for d in deltas])
    args.out_dir.mkdir(parents=True, exist_ok=True)
    with open(args.out_dir / "scores.tsv", "w") as f:
        f.write("position_hg19\treference\talt\tfunc_class\tref_score\talt_score\tdelta\n")
        f.writelines(f"{v['position_hg19']}\t{v['reference']}\t{v['alt']}\t{v['func_class']}\t{r:.6f}\t{a:.6f}\t"
                     f"{d:.6g}\n" for v, r, a, d in zip(variants, ref_scores, alt_scores, deltas))
    plot(variants, deltas, fpr, tpr, auroc, args.out_dir)
    summary = {"auroc": auroc, "n_variants": len(variants), "n_lof": sum(labels), "window_size": args.window_size,
               "rc_averaged": not args.no_rc, "checkpoint": str(args.ckpt_dir)}
    (args.out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    logger.info("AUROC %.3f (LOF vs FUNC/INT, %d variants); results in %s", auroc, len(variants), args.out_dir)
    return summary


if __name__ == "__main__":
    main()
