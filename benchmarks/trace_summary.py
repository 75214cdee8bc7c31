"""Summarise a torch-profiler chrome trace per training step: wall time, GPU busy time, top kernels and CPU ops.

    train_evo2 ... profiling.use_pytorch_profiler=true profiling.profile_step_start=40 profiling.profile_step_end=43
    python benchmarks/trace_summary.py <result-dir>/evo2/torch_profile/rank-0.json.gz

Megatron-Bridge writes the trace of the profiled steps (``ProfilerStep#N`` ranges); a step's GPU busy time is the
sum of its kernels, copies and memsets, so ``wall - busy`` is what the host (syncs, launches, Python) adds.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json

GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def _load(path: str) -> list[dict]:
    with (gzip.open(path, "rt") if path.endswith(".gz") else open(path)) as f:
        return [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]


def summarise(path: str, top: int = 25) -> dict:
    """Per step: wall ms, GPU busy ms, kernel count; over the steps: mean ms per step of the top kernels and CPU ops
    (inclusive), each with its calls per step."""
    events = _load(path)
    steps = {}  # one range per step (the profiler writes some twice)
    for e in sorted(events, key=lambda e: e["ts"]):
        if e["name"].startswith("ProfilerStep#"):
            steps.setdefault(e["name"], e)
    steps = list(steps.values())
    if not steps:
        raise ValueError(f"{path}: no ProfilerStep ranges - profile with a schedule (Megatron-Bridge's profiling "
                         "config does)")
    start, end = steps[0]["ts"], steps[-1]["ts"] + steps[-1]["dur"]
    gpu = [e for e in events if e.get("cat") in GPU_CATEGORIES and start <= e["ts"] < end]
    cpu = [e for e in events if e.get("cat") == "cpu_op" and start <= e["ts"] < end]
    per_step = []
    for s in steps:
        mine = [k for k in gpu if s["ts"] <= k["ts"] < s["ts"] + s["dur"]]
        per_step.append(dict(step=s["name"], wall_ms=s["dur"] / 1e3, gpu_busy_ms=sum(k["dur"] for k in mine) / 1e3,
                             kernels=len(mine)))

    def top_by_name(evs):
        total, calls = collections.Counter(), collections.Counter()
        for e in evs:
            total[e["name"]] += e["dur"]
            calls[e["name"]] += 1
        n = len(steps)
        return [dict(name=k, ms_per_step=v / 1e3 / n, calls_per_step=calls[k] / n) for k, v in total.most_common(top)]

    return dict(steps=per_step, kernels=top_by_name(gpu), cpu_ops=top_by_name(cpu))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace", help="chrome trace (.json or .json.gz) from torch.profiler")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    s = summarise(args.trace, args.top)
    for row in s["steps"]:
        print(f"{row['step']}: wall {row['wall_ms']:.1f} ms, GPU busy {row['gpu_busy_ms']:.1f} ms, "
              f"{row['kernels']} kernels")
    for title, key in (("kernels", "kernels"), ("CPU ops (inclusive)", "cpu_ops")):
        print(f"{title}, per step: ms, calls")
        for row in s[key]:
            print(f"  {row['ms_per_step']:9.2f} {row['calls_per_step']:7.0f}  {row['name'][:100]}")


if __name__ == "__main__":
    main()
