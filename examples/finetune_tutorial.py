"""Fine-tuning tutorial: converted checkpoint -> fine-tune on your genomes -> resume -> loss curves -> before/after.

    python examples/finetune_tutorial.py --savanna-ckpt savanna_evo2_1b_base.pt --model-size evo2_1b_base \\
        --fasta my_genomes.fa --work-dir outputs/finetune --steps 200 --seq-length 8192
    python examples/finetune_tutorial.py --work-dir outputs/finetune_tiny      # CPU demo with a random stand-in

Every step runs the console tools exactly as a user would (each command is logged so it can be copied):

1. ``preprocess_evo2``: the FASTA -> train/validation/test indexed datasets (80/10/10 by record);
2. ``evo2_convert_savanna_to_mbridge``: the Savanna ``.pt`` (the public Evo 2 weights on the Hugging Face Hub) ->
   a Megatron-Bridge checkpoint. Without ``--savanna-ckpt`` a randomly initialised ``striped_hyena_tiny`` Savanna file
   stands in for it (no weights can be downloaded here);
3. ``predict_evo2``: mean log-likelihood of held-out sequences (``--held-out``) before fine-tuning;
4. ``train_evo2 --finetune-ckpt-dir``: fine-tune, stopped half-way (``--early-stop-on-step``) and resumed - the
   second command is the same as the first, resuming from the last checkpoint;
5. the TensorBoard events -> ``loss_curves.png`` (train and validation loss per step);
6. ``predict_evo2`` again: the same genomes after fine-tuning; ``summary.json`` holds both.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
logger = logging.getLogger("finetune_tutorial")


def run(tool: str, *args) -> str:
    cmd = [str(BIN / tool) if (BIN / tool).exists() else tool, *map(str, args)]
    logger.info("$ %s", shlex.join([tool, *map(str, args)]))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{tool} failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    return proc.stdout + proc.stderr


def random_savanna(path: Path, model_size: str) -> None:
    """A randomly initialised Savanna checkpoint of ``model_size`` (stand-in for public weights)."""
    import torch

    from evo2_recipe.cli.common import apply_runtime_mode

    on_cpu = apply_runtime_mode()  # before megatron's import: the fixes, and CPU mode (hiding TE) without a GPU
    from evo2_recipe.checkpoint.savanna import mbridge_to_savanna
    from evo2_recipe.models.providers import get_provider
    from evo2_recipe.utils.distributed import init_distributed, teardown

    init_distributed(seed=0, cpu=on_cpu)  # gloo in CPU mode
    p = get_provider(model_size, vocab_size=512, params_dtype=torch.float32, bf16=False)
    p.finalize()
    state = {k: v.detach().to(torch.bfloat16) for k, v in p.provide().state_dict().items()
             if not k.endswith("_extra_state")}
    torch.save({"module": mbridge_to_savanna(state, p.hybrid_override_pattern, p.ffn_hidden_size)}, path)
    teardown()


def mean_log_likelihoods(pred_dir: Path) -> dict[str, float]:
    import torch

    index = json.loads((pred_dir / "seq_idx_map.json").read_text())
    preds = {}
    for f in sorted(pred_dir.glob("predictions__rank_*.pt")):
        preds.update(torch.load(f, weights_only=True))
    scores, order = preds["log_probs_seqs"].tolist(), preds["seq_idx"].tolist()
    by_index = dict(zip(order, scores))
    return {name: float(by_index[i]) for name, i in index.items()}


def loss_curves(tb_dir: Path, png: Path) -> dict[str, list[tuple[int, float]]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    curves: dict[str, dict[int, float]] = {"lm loss": {}, "lm loss validation": {}}
    for events in sorted(tb_dir.rglob("events.out.tfevents.*")):  # both runs (stopped and resumed)
        acc = EventAccumulator(str(events)).Reload()
        for tag in curves:
            if tag in acc.Tags()["scalars"]:
                curves[tag].update({e.step: e.value for e in acc.Scalars(tag)})
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for tag, label, style in (("lm loss", "train", "-"), ("lm loss validation", "validation", "o-")):
        steps = sorted(curves[tag])
        ax.plot(steps, [curves[tag][s] for s in steps], style, label=label)
    ax.set(xlabel="step", ylabel="loss (nats/base)", title="Fine-tuning")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return {tag: sorted(points.items()) for tag, points in curves.items()}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--savanna-ckpt", type=Path, help="public Savanna weights (.pt); default: a random tiny stand-in")
    p.add_argument("--model-size", default="striped_hyena_tiny")
    p.add_argument("--fasta", type=Path, default=ROOT / "examples/data/wichman2005_phix174_like.fasta")
    p.add_argument("--held-out", type=Path, default=ROOT / "src/evo2_recipe/selftest_data/phix174_NC_001422.1.fna",
                   help="sequences scored before and after (default: the phiX174 reference genome, which is not a "
                        "record of the default training FASTA)")
    p.add_argument("--work-dir", type=Path, default=Path("outputs/finetune_tutorial"))
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--seq-length", type=int, default=1024)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    args = p.parse_args(argv)
    from evo2_recipe.cli.common import setup_logging

    setup_logging()
    work = args.work_dir
    if work.exists():
        raise SystemExit(f"{work} exists; choose a new --work-dir (the tutorial starts from scratch)")
    work.mkdir(parents=True)
    config = work / "preprocess.yaml"
    config.write_text(f"- datapaths: [{args.fasta.resolve()}]\n  output_dir: {work / 'data'}\n  output_prefix: genomes\n"
                      "  train_split: 0.8\n  valid_split: 0.1\n  test_split: 0.1\n  append_eod: true\n  seed: 1234\n")
    run("preprocess_evo2", "--config", config, "--no-progress")
    prefix = work / "data" / "genomes_nucleotide_fast_tokenizer_256"
    dataset = work / "dataset.yaml"
    dataset.write_text("".join(f"- dataset_prefix: {prefix}_{s}\n  dataset_split: {split}\n  dataset_weight: 1.0\n"
                               for s, split in (("train", "train"), ("val", "validation"), ("test", "test"))))
    savanna = args.savanna_ckpt
    if savanna is None:
        savanna = work / f"random_{args.model_size}.pt"
        logger.info("no --savanna-ckpt: a random %s Savanna checkpoint stands in for public weights", args.model_size)
        random_savanna(savanna, args.model_size)
    base = work / "converted"
    run("evo2_convert_savanna_to_mbridge", "--savanna-ckpt-path", savanna, "--model-size", args.model_size,
        "--mbridge-ckpt-dir", base)
    test_fa = args.held_out
    def score(ckpt: Path, out: Path) -> dict[str, float]:
        run("predict_evo2", "--fasta", test_fa, "--ckpt-dir", ckpt, "--output-dir", out, "--output-log-prob-seqs",
            "--log-prob-collapse-option", "mean")
        return mean_log_likelihoods(out)

    before = score(base, work / "pred_before")
    train = ["-d", dataset, "--model-size", args.model_size, "--finetune-ckpt-dir", base, "--seq-length",
             args.seq_length, "--micro-batch-size", args.micro_batch_size, "--global-batch-size",
             2 * args.micro_batch_size, "--max-steps", args.steps, "--warmup-steps", max(1, args.steps // 10),
             "--constant-steps", 0, "--lr", args.lr, "--min-lr", args.lr / 10, "--eval-interval",
             max(1, args.steps // 4), "--eval-iters", 2, "--log-interval", max(1, args.steps // 20), "--workers", 0,
             "--result-dir", work / "run", "--experiment-name", "finetune"]
    run("train_evo2", *train, "--early-stop-on-step", args.steps // 2)  # interrupted half-way ...
    run("train_evo2", *train)  # ... and resumed: the same command picks up the last checkpoint
    ckpt = work / "run" / "finetune" / "checkpoints"
    curves = loss_curves(work / "run" / "finetune" / "tb_logs", work / "loss_curves.png")
    after = score(ckpt, work / "pred_after")
    summary = {"mean_log_likelihood_before": sum(before.values()) / len(before),
               "mean_log_likelihood_after": sum(after.values()) / len(after), "held_out": sorted(before),
               "steps": args.steps, "final_checkpoint_iteration": int((ckpt / "latest_checkpointed_iteration.txt")
                                                                      .read_text()),
               "train_loss": curves["lm loss"], "validation_loss": curves["lm loss validation"]}
    (work / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    logger.info("held-out mean log-likelihood %.4f -> %.4f nats/base; loss curves in %s",
                summary["mean_log_likelihood_before"], summary["mean_log_likelihood_after"], work / "loss_curves.png")
    return summary


if __name__ == "__main__":
    main()
