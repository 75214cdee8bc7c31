"""Fused residual join of a Hyena layer's branch: ``residual + (y + bias)`` and the next norm's input in one pass.

With ``fp32_residual_connection`` (every Evo 2 config) the plain path makes four passes per branch: the bias add in
the branch dtype, its cast to fp32, the fp32 add, and the cast of the sum back to ``params_dtype`` for the next norm.
Here one kernel reads ``y`` and the residual once and writes the fp32 sum and, when asked, its low-precision copy.
Plain twin: :func:`evo2_recipe.models.hyena.operators.residual_add`; the backward is analytic (an add and casts), one
pass too. For forwards without autograd (scoring) :func:`residual_add_rms_norm` also applies the next norm (the MLP's,
fused into its fc1) to each row, so the low copy is never written and read again: the 1b forward at 8,192 tokens ran
21 such norms, 0.47 ms of 35 ms (H200 profile). Its plain twin is the join followed by the norm.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from evo2_recipe.models.hyena.kernels.rms_norm import normed_row, row_launch

BLOCK = 1024


@triton.jit
def _residual_add_fwd(res_ptr, y_ptr, bias_ptr, out_ptr, low_ptr, N, H, HAS_BIAS: tl.constexpr,
                      WRITE_LOW: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = i < N
    y = tl.load(y_ptr + i, mask=m, other=0.0)
    if HAS_BIAS:  # the branch's bias add happens in the branch dtype, as in the plain path
        bias = tl.load(bias_ptr + i % H, mask=m, other=0.0)
        y = (y.to(tl.float32) + bias.to(tl.float32)).to(y_ptr.dtype.element_ty)
    out = tl.load(res_ptr + i, mask=m, other=0.0).to(tl.float32) + y.to(tl.float32)
    out = out.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + i, out, mask=m)
    if WRITE_LOW:
        tl.store(low_ptr + i, out.to(low_ptr.dtype.element_ty), mask=m)


@triton.jit
def _residual_add_rms_norm_fwd(res_ptr, y_ptr, bias_ptr, w_ptr, out_ptr, normed_ptr, H, eps, HAS_BIAS: tl.constexpr,
                               BLOCK_H: tl.constexpr):
    """One row: ``out = res + (y + bias)`` as :func:`_residual_add_fwd`, then ``rms_norm(out.to(w.dtype)) * w``."""
    row = tl.program_id(0).to(tl.int64)
    col = tl.arange(0, BLOCK_H)
    m = col < H
    i = row * H + col
    y = tl.load(y_ptr + i, mask=m, other=0.0)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + col, mask=m, other=0.0)
        y = (y.to(tl.float32) + bias.to(tl.float32)).to(y_ptr.dtype.element_ty)
    out = (tl.load(res_ptr + i, mask=m, other=0.0).to(tl.float32) + y.to(tl.float32)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + i, out, mask=m)
    normed = normed_row(out, w_ptr, col, m, H, eps, normed_ptr.dtype.element_ty)
    tl.store(normed_ptr + i, normed.to(normed_ptr.dtype.element_ty), mask=m)


@triton.jit
def _residual_add_bwd(g_out_ptr, g_low_ptr, g_res_ptr, g_y_ptr, N, HAS_LOW: tl.constexpr, BLOCK: tl.constexpr):
    """``g_res = g_out + g_low`` (in the stream's dtype, as the plain add) and its cast to the branch: one pass for
    what autograd runs as a cast, an add and a cast."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = i < N
    g = tl.load(g_out_ptr + i, mask=m, other=0.0)
    if HAS_LOW:
        g_low = tl.load(g_low_ptr + i, mask=m, other=0.0).to(g_out_ptr.dtype.element_ty)
        g = (g.to(tl.float32) + g_low.to(tl.float32)).to(g_out_ptr.dtype.element_ty)
    tl.store(g_res_ptr + i, g, mask=m)
    tl.store(g_y_ptr + i, g.to(g_y_ptr.dtype.element_ty), mask=m)


class _ResidualAdd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, residual, y, bias, low_dtype):
        ctx.dtypes = (y.dtype, None if bias is None else bias.dtype)
        res, y = residual.contiguous(), y.contiguous()
        out = torch.empty_like(res)
        low = torch.empty(res.shape, dtype=low_dtype, device=res.device) if low_dtype is not None else None
        N, H = res.numel(), res.shape[-1]
        _residual_add_fwd[(triton.cdiv(N, BLOCK),)](res, y, bias if bias is not None else y, out,
                                                     low if low is not None else out, N, H,
                                                     HAS_BIAS=bias is not None, WRITE_LOW=low is not None,
                                                     BLOCK=BLOCK)
        return (out, low) if low is not None else out

    @staticmethod
    def backward(ctx, g_out, g_low=None):
        y_dtype, bias_dtype = ctx.dtypes
        g_out = g_out.contiguous()
        g_low = g_out if g_low is None else g_low.contiguous()  # a stand-in pointer when there is no low copy
        # g_y: the plain path's cast of the branch to the stream dtype, backwards
        g_res, g_y = torch.empty_like(g_out), torch.empty(g_out.shape, dtype=y_dtype, device=g_out.device)
        N = g_out.numel()
        _residual_add_bwd[(triton.cdiv(N, BLOCK),)](g_out, g_low, g_res, g_y, N, HAS_LOW=g_low is not g_out,
                                                    BLOCK=BLOCK)
        g_bias = g_y.sum(dim=tuple(range(g_y.dim() - 1))).to(bias_dtype) if bias_dtype is not None else None
        return g_res, g_y, g_bias, None


def residual_add(residual: torch.Tensor, y: torch.Tensor, bias: torch.Tensor | None = None,
                 low_dtype: torch.dtype | None = None):
    """Fused :func:`evo2_recipe.models.hyena.operators.residual_add`; with ``low_dtype`` also returns the sum cast to
    it (the next norm's input), as ``(sum, sum.to(low_dtype))``. A bias of another dtype than ``y`` (the plain path
    would promote the branch) is refused: callers take the plain path then."""
    if bias is not None and bias.dtype != y.dtype:
        raise ValueError(f"fused residual add needs the bias in the branch dtype {y.dtype}, got {bias.dtype}")
    if low_dtype == residual.dtype:  # nothing to cast: the sum is the norm's input
        out = _ResidualAdd.apply(residual, y, bias, None)
        return out, out
    return _ResidualAdd.apply(residual, y, bias, low_dtype)


def residual_add_rms_norm(residual: torch.Tensor, y: torch.Tensor, bias: torch.Tensor | None, weight: torch.Tensor,
                          eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, rms_norm(s.to(weight.dtype)) * weight)`` with ``s = residual + (y + bias)``, one pass over each row; no
    autograd (inference forwards). The bias, if any, in ``y``'s dtype."""
    H = residual.shape[-1]
    if bias is not None and bias.dtype != y.dtype:
        raise ValueError(f"fused residual add needs the bias in the branch dtype {y.dtype}, got {bias.dtype}")
    if weight.shape != (H,) or y.shape != residual.shape:
        raise ValueError(f"residual {tuple(residual.shape)}, branch {tuple(y.shape)} and norm weight "
                         f"{tuple(weight.shape)} do not fit")
    res, y = residual.contiguous(), y.contiguous()
    out, normed = torch.empty_like(res), torch.empty(res.shape, dtype=weight.dtype, device=res.device)
    _residual_add_rms_norm_fwd[(res.numel() // H,)](res, y, bias if bias is not None else y, weight, out, normed, H,
                                                    eps, HAS_BIAS=bias is not None, **row_launch(H))
    return out, normed
