"""RMSNorm of the fp32 residual stream straight into the weights' dtype, for forwards without autograd (scoring).

The local spec's norms compute ``rms_norm(x.to(w.dtype)) * w``; with ``fp32_residual_connection`` (every Evo 2
config) the cast is a pass of its own before every norm: 31 of them in the 1b forward at 8,192 tokens, 0.76 ms of
38 ms (H200 profile). Here one kernel per row reads the stream in whatever dtype it has, rounds it to the weights'
dtype as the cast does, and writes the normed row: ``x / sqrt(mean(x^2) + eps) * w`` in fp32, rounded once, as
torch's ``rms_norm`` computes it. Training keeps torch's norm (its backward). Plain twin: ``F.rms_norm`` after the
cast (``local_layers.rms_norm``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def normed_row(x, w_ptr, col, m, H, eps, dtype: tl.constexpr):
    """One row (masked lanes 0) cast to ``dtype`` as the plain path's cast, then ``x / sqrt(mean(x^2) + eps) * w`` in
    fp32 (shared with the residual join's fused norm)."""
    x = x.to(dtype).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / H + eps)
    return x * rstd * tl.load(w_ptr + col, mask=m, other=0.0).to(tl.float32)


def row_launch(H: int) -> dict:
    """Block and warps of a one-row-per-program kernel over rows of ``H``."""
    block = triton.next_power_of_2(H)
    return dict(BLOCK_H=block, num_warps=min(16, max(1, block // 256)))


@triton.jit
def _rms_norm_fwd(x_ptr, w_ptr, out_ptr, H, stride_x, eps, BLOCK_H: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    col = tl.arange(0, BLOCK_H)
    m = col < H
    x = tl.load(x_ptr + row * stride_x + col, mask=m, other=0.0)
    y = normed_row(x, w_ptr, col, m, H, eps, out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * H + col, y.to(out_ptr.dtype.element_ty), mask=m)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``F.rms_norm(x.to(weight.dtype), (H,), weight, eps)`` in one pass over ``x`` (..., H), any float dtype; no
    autograd."""
    H = x.shape[-1]
    if weight.shape != (H,):
        raise ValueError(f"RMSNorm weight of shape {tuple(weight.shape)} for rows of {H}")
    x2 = x.reshape(-1, H)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x.shape, dtype=weight.dtype, device=x.device)
    _rms_norm_fwd[(x2.shape[0],)](x2, weight, out, H, x2.stride(0), eps, **row_launch(H))
    return out
