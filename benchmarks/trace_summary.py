"""Summarise a torch-profiler chrome trace per training step: wall time, GPU busy time, top kernels and CPU ops.

    train_evo2 ... profiling.use_pytorch_profiler=true profiling.profile_step_start=40 profiling.profile_step_end=43
    python benchmarks/trace_summary.py <result-dir>/evo2/torch_profile/rank-0.json.gz

Megatron-Bridge writes the trace of the profiled steps (``ProfilerStep#N`` ranges); a step's GPU busy time is the
sum of its kernels, copies and memsets, so ``wall - busy`` is what the host (syncs, launches, Python) adds. Idle
stretches of the GPU longer than ``--gap-us`` are attributed to the innermost CPU op running at their middle (what
the host was doing while the GPU waited).
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


def _idle_gaps(gpu: list[dict], start: float, end: float, min_us: float) -> list[tuple[float, float]]:
    """GPU-idle intervals of at least ``min_us`` between ``start`` and ``end`` (overlapping kernels merged)."""
    gaps, busy_until = [], start
    for e in sorted(gpu, key=lambda e: e["ts"]):
        if e["ts"] - busy_until >= min_us:
            gaps.append((busy_until, e["ts"]))
        busy_until = max(busy_until, e["ts"] + e["dur"])
    if end - busy_until >= min_us:
        gaps.append((busy_until, end))
    return gaps


def _innermost(cpu: list[dict], t: float) -> str:
    covering = [e for e in cpu if e["ts"] <= t <= e["ts"] + e["dur"]]
    return min(covering, key=lambda e: e["dur"])["name"] if covering else "(no CPU op)"


def summarise(path: str, top: int = 25, gap_us: float = 100.0) -> dict:
    """Per step: wall ms, GPU busy ms, kernel count, GPU-idle ms in stretches >= ``gap_us``; over the steps: mean ms
    per step of the top kernels, CPU ops (inclusive) and of the CPU ops the host ran during those idle stretches,
    each with its calls per step."""
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
    cpu = [e for e in events if e.get("cat") in ("cpu_op", "user_annotation") and start <= e["ts"] < end
           and not e["name"].startswith("ProfilerStep#")]
    per_step, idle_ops = [], []
    for s in steps:
        mine = [k for k in gpu if s["ts"] <= k["ts"] < s["ts"] + s["dur"]]
        gaps = _idle_gaps(mine, s["ts"], s["ts"] + s["dur"], gap_us)
        idle_ops += [dict(name=_innermost(cpu, (a + b) / 2), dur=b - a) for a, b in gaps]
        per_step.append(dict(step=s["name"], wall_ms=s["dur"] / 1e3, gpu_busy_ms=sum(k["dur"] for k in mine) / 1e3,
                             kernels=len(mine), idle_ms=sum(b - a for a, b in gaps) / 1e3, idle_gaps=len(gaps)))

    def top_by_name(evs):
        total, calls = collections.Counter(), collections.Counter()
        for e in evs:
            total[e["name"]] += e["dur"]
            calls[e["name"]] += 1
        n = len(steps)
        return [dict(name=k, ms_per_step=v / 1e3 / n, calls_per_step=calls[k] / n) for k, v in total.most_common(top)]

    cpu_ops = [e for e in cpu if e.get("cat") == "cpu_op"]
    return dict(steps=per_step, kernels=top_by_name(gpu), cpu_ops=top_by_name(cpu_ops), idle=top_by_name(idle_ops))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace", help="chrome trace (.json or .json.gz) from torch.profiler")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--gap-us", type=float, default=100.0, help="shortest GPU-idle stretch attributed to the host")
    args = ap.parse_args()
    s = summarise(args.trace, args.top, args.gap_us)
    for row in s["steps"]:
        print(f"{row['step']}: wall {row['wall_ms']:.1f} ms, GPU busy {row['gpu_busy_ms']:.1f} ms, "
              f"{row['kernels']} kernels, GPU idle {row['idle_ms']:.1f} ms in {row['idle_gaps']} stretches "
              f">= {args.gap_us:g} us")
    for title, key in (("kernels", "kernels"), ("CPU ops (inclusive)", "cpu_ops"),
                       (f"host ops while the GPU idled >= {args.gap_us:g} us", "idle")):
        print(f"{title}, per step: ms, calls")
        for row in s[key]:
            print(f"  {row['ms_per_step']:9.2f} {row['calls_per_step']:7.0f}  {row['name'][:100]}")


if __name__ == "__main__":
    main()
