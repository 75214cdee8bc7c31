"""The benchmark helpers against their sources: trace_summary.py vs the profiler's own totals (CPU trace; GPU kernels
sum the same way), train_log_summary.py vs lines written by train_evo2's own step-line format."""

import importlib.util
import logging
from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile, schedule


def _benchmark(name: str):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
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
    s = _benchmark("trace_summary").summarise(str(trace))
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
    s = _benchmark("trace_summary").summarise(str(trace))
    assert all(r["idle_gaps"] == 1 and r["idle_ms"] == pytest.approx(r["wall_ms"]) for r in s["steps"])
    assert s["idle"][0]["name"] == "host_wait" and s["idle"][0]["ms_per_step"] >= 30


def test_trace_summary_refuses_a_trace_without_steps(tmp_path):
    trace = tmp_path / "t.json"
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        torch.ones(3).sum()
    prof.export_chrome_trace(str(trace))
    with pytest.raises(ValueError, match="no ProfilerStep"):
        _benchmark("trace_summary").summarise(str(trace))


def _write_train_log(path: Path, tokens_per_s: dict[int, float], val: float) -> None:
    """A console log as train_evo2 writes it: its STEP_LINE through logging, then Megatron's validation lines."""
    from evo2_recipe.training.metrics import STEP_LINE

    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    log = logging.getLogger(f"train_log_test.{path.stem}")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    for step, tok in tokens_per_s.items():
        log.info(STEP_LINE, step, 1.5 - step / 1000, 3e-4, "12.345", tok, 300.0, "0.303", 39.1)
    handler.close()
    with open(path, "a") as f:
        f.write(f" validation loss at iteration 200 | lm loss value: {val + 0.01:.6E} | lm loss PPL: 3.7 | \n")
        f.write(f" validation loss at iteration 200 on validation set | lm loss value: {val:.6E} | \n")


def test_train_log_summary_reads_train_evo2_step_lines(tmp_path, capsys):
    tls = _benchmark("train_log_summary")
    _write_train_log(tmp_path / "bf16_1.log", {20: 10.0, 40: 100.0, 60: 110.0}, 1.3)
    _write_train_log(tmp_path / "bf16_2.log", {20: 10.0, 40: 90.0, 60: 100.0}, 1.31)
    _write_train_log(tmp_path / "fp8_1.log", {20: 10.0, 40: 120.0, 60: 110.0}, 1.32)
    run = tls.summarise(str(tmp_path / "bf16_1.log"), from_step=40)
    assert run["tokens_per_s"] == pytest.approx(105.0) and run["lines"] == 2
    assert run["loss"] == pytest.approx({20: 1.48, 40: 1.46, 60: 1.44})
    assert run["validation"] == pytest.approx({"eval": 1.31, "validation": 1.3})
    assert tls.summarise(str(tmp_path / "bf16_1.log"))["tokens_per_s"] == pytest.approx(220 / 3)
    tls.main([str(tmp_path / n) for n in ("bf16_1.log", "bf16_2.log", "fp8_1.log")] + ["--from-step", "40"])
    out = capsys.readouterr().out
    assert "bf16: 100 tokens/s/GPU (1.000x bf16)" in out and "fp8: 115 tokens/s/GPU (1.150x bf16)" in out
    with pytest.raises(ValueError, match="no 'step N"):
        tls.summarise(str(tmp_path / "bf16_1.log"), from_step=80)
