"""Summarise ``train_evo2`` logs: mean tokens/s/GPU, the loss curve and the final validation losses of each run.

    python benchmarks/train_log_summary.py gpu_out/train16_*.log --from-step 40

Reads the per-interval step lines (``evo2_recipe.training.metrics.STEP_LINE``) and Megatron-Bridge's validation
lines. Runs whose names differ only by a trailing ``_<n>`` (repeats, as ``scripts/gpu_acceptance.sh train16`` writes
them) form one group; each group's mean tokens/s is given against the first group's, so a recipe comparison
(``bf16_mixed`` vs an FP8 recipe) prints its speed ratio. Steps before ``--from-step`` (CUDA-graph capture, warm-up)
are left out of the means.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

STEP = re.compile(r"step (\d+) \| lm loss ([0-9.naninf]+) \|.*?tokens/s/GPU (\d+)")
VALIDATION = re.compile(r"validation loss at iteration (\d+)(?: on (\w+) set)? \| lm loss value: ([0-9.Ee+-]+)")


def summarise(path: str, from_step: int = 0) -> dict:
    """One run: mean tokens/s over the step lines at or after ``from_step``, loss by step, last validation losses."""
    steps, validation = [], {}
    for line in Path(path).read_text(errors="replace").splitlines():
        if m := STEP.search(line):
            steps.append((int(m[1]), float(m[2]), int(m[3])))
        elif m := VALIDATION.search(line):
            validation[m[2] or "eval"] = float(m[3])  # in-training evaluations: "eval"; the last wins
    timed = [tok for step, _, tok in steps if step >= from_step]
    if not timed:
        raise ValueError(f"{path}: no 'step N | lm loss ... | tokens/s/GPU ...' line at or after step {from_step}")
    return {"run": Path(path).stem, "tokens_per_s": sum(timed) / len(timed), "lines": len(timed),
            "loss": {step: loss for step, loss, _ in steps}, "validation": validation}


def group_means(runs: list[dict]) -> dict[str, float]:
    """Mean tokens/s per group (run name without a trailing ``_<n>``), in first-seen order."""
    groups: dict[str, list[float]] = {}
    for r in runs:
        groups.setdefault(re.sub(r"_\d+$", "", r["run"]), []).append(r["tokens_per_s"])
    return {name: sum(v) / len(v) for name, v in groups.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("logs", nargs="+", help="train_evo2 console logs")
    p.add_argument("--from-step", type=int, default=0, help="leave earlier step lines out of the means")
    a = p.parse_args(argv)
    runs = [summarise(path, a.from_step) for path in a.logs]
    for r in runs:
        print(json.dumps({k: (round(v, 1) if k == "tokens_per_s" else v) for k, v in r.items()}))
    means = group_means(runs)
    base_name, base = next(iter(means.items()))
    for name, mean in means.items():
        print(f"{name}: {mean:,.0f} tokens/s/GPU ({mean / base:.3f}x {base_name})")


if __name__ == "__main__":
    main()
