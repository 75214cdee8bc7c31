"""benchmarks/trace_summary.py against the profiler's own totals (CPU trace; GPU kernels sum the same way)."""

import importlib.util
from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile, schedule


def _trace_summary():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "trace_summary.py"
    spec = importlib.util.spec_from_file_location("trace_summary", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_trace_summary_matches_the_profilers_own_totals(tmp_path):
    trace, own = tmp_path / "trace.json", {}

    def ready(p):
        p.export_chrome_trace(str(trace))
        own.update({e.key: e for e in p.key_averages()})

    a = torch.randn(96, 96)
    with profile(activities=[ProfilerActivity.CPU], schedule=schedule(wait=0, warmup=1, active=3),
                 on_trace_ready=ready) as prof:
        for i in range(4):  # step 0 warms up; steps 1-3 (2, 3 and 4 products) are recorded
            for _ in range(i + 1):
                torch.mm(a, a)
            prof.step()
    s = _trace_summary().summarise(str(trace))
    assert [r["step"] for r in s["steps"]] == ["ProfilerStep#1", "ProfilerStep#2", "ProfilerStep#3"]
    assert all(r["wall_ms"] > 0 and r["gpu_busy_ms"] == 0 for r in s["steps"])
    mm = next(r for r in s["cpu_ops"] if r["name"] == "aten::mm")
    assert mm["calls_per_step"] == 3 == own["aten::mm"].count / 3
    assert mm["ms_per_step"] * 3 == pytest.approx(own["aten::mm"].cpu_time_total / 1e3, rel=0.02)


def test_trace_summary_attributes_gpu_idle_time_to_the_host_op_running(tmp_path):
    """Without GPU events the whole step is one idle stretch; its middle falls in the host's 30 ms sleep."""
    import time

    from torch.profiler import record_function

    trace = tmp_path / "trace.json"
    with profile(activities=[ProfilerActivity.CPU], schedule=schedule(wait=0, warmup=1, active=2),
                 on_trace_ready=lambda p: p.export_chrome_trace(str(trace))) as prof:
        for _ in range(3):
            with record_function("host_wait"):
                time.sleep(0.03)
            prof.step()
    s = _trace_summary().summarise(str(trace))
    assert all(r["idle_gaps"] == 1 and r["idle_ms"] == pytest.approx(r["wall_ms"]) for r in s["steps"])
    assert s["idle"][0]["name"] == "host_wait" and s["idle"][0]["ms_per_step"] >= 30


def test_trace_summary_refuses_a_trace_without_steps(tmp_path):
    trace = tmp_path / "t.json"
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        torch.ones(3).sum()
    prof.export_chrome_trace(str(trace))
    with pytest.raises(ValueError, match="no ProfilerStep"):
        _trace_summary().summarise(str(trace))
