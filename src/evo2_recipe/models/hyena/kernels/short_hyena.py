"""Fused hcs path: 3-tap projection conv + de-interleave + ``u = x2*v`` + 7-tap conv + skip + gate, one kernel.

The plain path (``operators.short_hyena``) runs ~8 memory-bound passes over (B, 3C, L) tensors, with layout copies
(sequence-first -> channel-first and back). This kernel reads the projection output in its sequence-first layout
once per tile (the 8-sample causal halo comes from neighbouring rows, served by cache) and writes ``z`` in the
layout the output projection wants, accumulating in fp32. Backward recomputes the plain twin under autograd (exact
gradients; a fused backward is future work).

Grid: (L tiles, batch, channel tiles). Shapes: features (L, B, 3C) contiguous, z (L, B, C).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from evo2_recipe.models.hyena import operators as ops
from evo2_recipe.models.hyena.kernels import recompute_backward

PROJ_TAPS, SHORT_TAPS = 3, 7


@triton.jit
def _proj_conv(f_ptr, wp_ptr, s, c, lane: tl.constexpr, L, stride_l, cmask, BLOCK_L: tl.constexpr,
               BLOCK_C: tl.constexpr):
    """Projection-conv output of interleaved lane ``lane`` (0: x1, 1: x2, 2: v) at positions ``s`` (fp32)."""
    acc = tl.zeros((BLOCK_L, BLOCK_C), dtype=tl.float32)
    for j in tl.static_range(3):
        src = s - 2 + j
        m = ((src >= 0) & (src < L))[:, None] & cmask[None, :]
        # int64 offsets: at 1M tokens x 3*4096 channels the element offset passes 2^31
        f = tl.load(f_ptr + src.to(tl.int64)[:, None] * stride_l + (3 * c + lane)[None, :], mask=m, other=0.0)
        w = tl.load(wp_ptr + (3 * c + lane) * 3 + j, mask=cmask, other=0.0)
        acc += f.to(tl.float32) * w.to(tl.float32)[None, :]
    return acc


@triton.jit
def _short_hyena_fwd(f_ptr, wp_ptr, ws_ptr, b_ptr, z_ptr, L, C, stride_fl, stride_fb, stride_zl, stride_zb,
                     HAS_BIAS: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr):
    t = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    b = tl.program_id(1)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    f_b = f_ptr + b.to(tl.int64) * stride_fb
    y = tl.zeros((BLOCK_L, BLOCK_C), dtype=tl.float32)
    u_t = tl.zeros((BLOCK_L, BLOCK_C), dtype=tl.float32)
    for k in tl.static_range(7):
        s = t - 6 + k
        x2 = _proj_conv(f_b, wp_ptr, s, c, 1, L, stride_fl, cmask, BLOCK_L, BLOCK_C)
        v = _proj_conv(f_b, wp_ptr, s, c, 2, L, stride_fl, cmask, BLOCK_L, BLOCK_C)
        u = x2 * v
        u = tl.where((s >= 0)[:, None], u, 0.0)  # the 7-tap conv's causal zero padding
        w = tl.load(ws_ptr + c * 7 + k, mask=cmask, other=0.0).to(tl.float32)
        y += u * w[None, :]
        if k == 6:
            u_t = u
    if HAS_BIAS:
        y += u_t * tl.load(b_ptr + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
    z = _proj_conv(f_b, wp_ptr, t, c, 0, L, stride_fl, cmask, BLOCK_L, BLOCK_C) * y
    m = (t < L)[:, None] & cmask[None, :]
    offs = b.to(tl.int64) * stride_zb + t.to(tl.int64)[:, None] * stride_zl + c[None, :]
    tl.store(z_ptr + offs, z.to(z_ptr.dtype.element_ty), mask=m)


def _forward(features, w_proj, w_short, bias):
    L, B, C3 = features.shape
    C = C3 // 3
    f = features.contiguous()
    z = torch.empty((L, B, C), dtype=features.dtype, device=features.device)
    block_l, block_c = 32, 64
    grid = (triton.cdiv(L, block_l), B, triton.cdiv(C, block_c))
    _short_hyena_fwd[grid](f, w_proj.contiguous(), w_short.contiguous(), bias if bias is not None else w_short, z,
                           L, C, f.stride(0), f.stride(1), z.stride(0), z.stride(1), HAS_BIAS=bias is not None,
                           BLOCK_L=block_l, BLOCK_C=block_c)
    return z


class _ShortHyena(torch.autograd.Function):
    @staticmethod
    def forward(ctx, features, w_proj, w_short, bias):
        ctx.save_for_backward(features, w_proj, w_short, bias)
        return _forward(features, w_proj, w_short, bias)

    @staticmethod
    def backward(ctx, grad_z):
        return recompute_backward(ops.short_hyena, ctx.saved_tensors, (grad_z,))


def short_hyena(features_LBC3: torch.Tensor, w_proj_C3K: torch.Tensor, w_short_CK: torch.Tensor,
                bias_C: torch.Tensor | None = None) -> torch.Tensor:
    """Fused :func:`evo2_recipe.models.hyena.operators.short_hyena` (same arguments, same result)."""
    if w_proj_C3K.shape[-1] != PROJ_TAPS or w_short_CK.shape[-1] != SHORT_TAPS:
        return ops.short_hyena(features_LBC3, w_proj_C3K, w_short_CK, bias_C)
    return _ShortHyena.apply(features_LBC3, w_proj_C3K, w_short_CK, bias_C)
