"""The inference-only Hyena kernels against the paths they replace, one operator at a time (GPU, bf16).

    python benchmarks/bench_kernels.py [--lengths 8192 131072] [--json out.json]

Rows (one JSON line each): hcm - FFT convolution + fused epilogue vs ``medium_conv_epilogue`` (Toeplitz GEMMs); hcl -
FFT convolution (channel-chunked as the model runs it without autograd) + epilogue vs ``modal_conv`` (chunked scan,
each ``DOT_PRECISION``) + epilogue; at the evo2_1b_base (1,920 channels) and evo2_7b (4,096) widths. Microseconds
per call (median of 20 after warm-up), the kernel path's speed-up, its largest difference from the FFT path relative
to the output's scale, and peak memory above the inputs.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from evo2_recipe.models.hyena import operators as ops
from evo2_recipe.models.hyena.kernels import gating, medium_conv, modal_conv
from evo2_recipe.models.hyena.kernels.modal_filter import modal_filter
from evo2_recipe.models.hyena.mixer import INFERENCE_CHUNK_ELEMENTS

WIDTHS = {"evo2_1b_base": (1920, 128, 1920), "evo2_7b": (4096, 256, 4096)}  # channels, hcm groups, hcl groups


def _time_us(fn, iters: int = 20) -> tuple[float, torch.Tensor, float]:
    out = fn()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000)
    return statistics.median(times), out, (torch.cuda.max_memory_allocated() - base) / 2**30


def _row(op, size, L, ref_fn, new_fn, **extra):
    t_ref, ref, mem_ref = _time_us(ref_fn)
    t_new, new, mem_new = _time_us(new_fn)
    err = ((new.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
    row = dict(op=op, size=size, seq=L, fft_us=round(t_ref, 1), kernel_us=round(t_new, 1),
               speedup=round(t_ref / t_new, 2), max_err_vs_fft=float(f"{err:.2e}"),
               fft_extra_gib=round(mem_ref, 2), kernel_extra_gib=round(mem_new, 2), **extra)
    print(json.dumps(row), flush=True)
    return row


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 131072])
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = []
    g = torch.Generator(device="cuda").manual_seed(0)
    for L in args.lengths:
        for size, (C, g_medium, g_long) in WIDTHS.items():
            x1, u = (torch.randn(1, C, L, device="cuda", generator=g).to(torch.bfloat16) for _ in range(2))
            D = torch.randn(C, device="cuda", generator=g).to(torch.bfloat16)
            h = torch.randn(g_medium, 128, device="cuda", generator=g) * torch.exp(
                -torch.arange(128, device="cuda") / 16) / 4
            rows.append(_row("hcm", size, L, lambda: gating.hyena_epilogue(x1, ops.fft_causal_conv(u, h, D)),
                             lambda: medium_conv.medium_conv_epilogue(x1, u, h, D)))
            log_poles = -torch.exp(torch.randn(g_long, 16, device="cuda", generator=g) - 4)
            R = 0.1 * torch.randn(g_long, 16, device="cuda", generator=g)
            chunk = max(1, INFERENCE_CHUNK_ELEMENTS // L)  # channels per FFT chunk, as the model runs it

            def fft_path():
                y = torch.empty_like(u)
                for a in range(0, C, chunk):
                    b = min(a + chunk, C)
                    filt = modal_filter(torch.log(-log_poles[a:b]), torch.zeros_like(log_poles[a:b]), R[a:b], L)
                    y[:, a:b] = ops.fft_causal_conv(u[:, a:b], filt, D[a:b])
                return gating.hyena_epilogue(x1, y)

            default = modal_conv.DOT_PRECISION
            for precision in ("ieee", "tf32x3"):
                modal_conv.DOT_PRECISION = precision
                rows.append(_row("hcl", size, L, fft_path,
                                 lambda: gating.hyena_epilogue(x1, modal_conv.modal_conv(u, log_poles, R, D)),
                                 dot_precision=precision))
            modal_conv.DOT_PRECISION = default
            del x1, u
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
