"""Fused prologue/epilogue around the convolutions of hcs/hcm/hcl.

Prologue: projection conv (3 taps) + de-interleave + ``u = x2 * v`` in one pass from the sequence-first projection
output to channel-first ``x1`` and ``u`` (what the FFT wants). Epilogue: ``z = x1 * y`` written sequence-first (what
the output projection wants); for hcs the 7-tap conv runs inside the epilogue (``short_conv_epilogue``, reading the
prologue's ``u``). The plain path makes ~6 layout and elementwise passes for the same work. (An earlier single
kernel for the whole hcs path recomputed the projection conv for each of the 7 taps: 5.2 ms per layer on an H200,
removed.) Plain twins: ``operators.hyena_prologue`` / ``hyena_epilogue`` / ``short_conv_epilogue``; backward
recomputes them (exact gradients).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from evo2_recipe.models.hyena import operators as ops
from evo2_recipe.models.hyena.kernels import recompute_backward

BLOCK_L, BLOCK_C = 32, 64


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
def _prologue_fwd(f_ptr, wp_ptr, x1_ptr, u_ptr, L, C, stride_fl, stride_fb, BLOCK_L: tl.constexpr,
                  BLOCK_C: tl.constexpr):
    t = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    b = tl.program_id(1).to(tl.int64)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    f_b = f_ptr + b * stride_fb
    x1 = _proj_conv(f_b, wp_ptr, t, c, 0, L, stride_fl, cmask, BLOCK_L, BLOCK_C)
    x2 = _proj_conv(f_b, wp_ptr, t, c, 1, L, stride_fl, cmask, BLOCK_L, BLOCK_C)
    v = _proj_conv(f_b, wp_ptr, t, c, 2, L, stride_fl, cmask, BLOCK_L, BLOCK_C)
    offs = b * C * L + c.to(tl.int64)[None, :] * L + t[:, None]  # (B, C, L) contiguous
    m = (t < L)[:, None] & cmask[None, :]
    tl.store(x1_ptr + offs, x1.to(x1_ptr.dtype.element_ty), mask=m)
    # u rounded like the plain path: x2 and v in the activation dtype, then their product
    x2 = x2.to(u_ptr.dtype.element_ty).to(tl.float32)
    v = v.to(u_ptr.dtype.element_ty).to(tl.float32)
    tl.store(u_ptr + offs, (x2 * v).to(u_ptr.dtype.element_ty), mask=m)


@triton.jit
def _epilogue_fwd(x1_ptr, y_ptr, z_ptr, L, C, stride_yb, stride_yc, stride_zl, stride_zb, BLOCK_L: tl.constexpr,
                  BLOCK_C: tl.constexpr):
    t = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    b = tl.program_id(1).to(tl.int64)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    m = (t < L)[:, None] & (c < C)[None, :]
    offs = b * C * L + c.to(tl.int64)[None, :] * L + t[:, None]
    x1 = tl.load(x1_ptr + offs, mask=m, other=0.0)
    # y may be the first half of the FFT's 2L buffer: strided over b and c, unit stride over t
    y_offs = b * stride_yb + c.to(tl.int64)[None, :] * stride_yc + t[:, None]
    y = tl.load(y_ptr + y_offs, mask=m, other=0.0).to(x1_ptr.dtype.element_ty)  # as the plain path rounds it
    z = x1.to(tl.float32) * y.to(tl.float32)
    tl.store(z_ptr + b * stride_zb + t.to(tl.int64)[:, None] * stride_zl + c[None, :], z.to(z_ptr.dtype.element_ty),
             mask=m)


@triton.jit
def _short_epilogue_fwd(x1_ptr, u_ptr, w_ptr, skip_ptr, z_ptr, L, C, stride_zl, stride_zb, K: tl.constexpr,
                        HAS_SKIP: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr):
    t = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    b = tl.program_id(1).to(tl.int64)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    row = b * C * L + c.to(tl.int64)[None, :] * L  # (B, C, L) contiguous
    acc = tl.zeros((BLOCK_L, BLOCK_C), dtype=tl.float32)
    for k in tl.static_range(K):  # last tap on the current token
        src = t - (K - 1) + k
        m = ((src >= 0) & (src < L))[:, None] & cmask[None, :]
        w = tl.load(w_ptr + c * K + k, mask=cmask, other=0.0).to(tl.float32)
        acc += tl.load(u_ptr + row + src[:, None], mask=m, other=0.0).to(tl.float32) * w[None, :]
    m = (t < L)[:, None] & cmask[None, :]
    dtype = x1_ptr.dtype.element_ty
    y = acc.to(dtype)  # the plain conv returns u's dtype
    if HAS_SKIP:  # y + u * b, each rounded like the plain path
        u = tl.load(u_ptr + row + t[:, None], mask=m, other=0.0)
        skip = tl.load(skip_ptr + c, mask=cmask, other=0.0).to(dtype)
        y = (y.to(tl.float32) + (u.to(tl.float32) * skip.to(tl.float32)[None, :]).to(dtype).to(tl.float32)).to(dtype)
    x1 = tl.load(x1_ptr + row + t[:, None], mask=m, other=0.0)
    z = x1.to(tl.float32) * y.to(tl.float32)
    tl.store(z_ptr + b * stride_zb + t.to(tl.int64)[:, None] * stride_zl + c[None, :], z.to(z_ptr.dtype.element_ty),
             mask=m)


def _grid(L, B, C):
    return (triton.cdiv(L, BLOCK_L), B, triton.cdiv(C, BLOCK_C))


class _Prologue(torch.autograd.Function):
    @staticmethod
    def forward(ctx, features, w_proj):
        ctx.save_for_backward(features, w_proj)
        L, B, C3 = features.shape
        f = features.contiguous()
        x1 = torch.empty((B, C3 // 3, L), dtype=features.dtype, device=features.device)
        u = torch.empty_like(x1)
        _prologue_fwd[_grid(L, B, C3 // 3)](f, w_proj.contiguous(), x1, u, L, C3 // 3, f.stride(0), f.stride(1),
                                            BLOCK_L=BLOCK_L, BLOCK_C=BLOCK_C)
        return x1, u

    @staticmethod
    def backward(ctx, g_x1, g_u):
        return recompute_backward(ops.hyena_prologue, ctx.saved_tensors, (g_x1, g_u))


class _Epilogue(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x1, y):
        ctx.save_for_backward(x1, y)
        B, C, L = x1.shape
        z = torch.empty((L, B, C), dtype=x1.dtype, device=x1.device)
        if y.stride(-1) != 1:
            y = y.contiguous()
        _epilogue_fwd[_grid(L, B, C)](x1.contiguous(), y, z, L, C, y.stride(0), y.stride(1), z.stride(0), z.stride(1),
                                      BLOCK_L=BLOCK_L, BLOCK_C=BLOCK_C)
        return z

    @staticmethod
    def backward(ctx, g_z):
        return recompute_backward(ops.hyena_epilogue, ctx.saved_tensors, (g_z,))


class _ShortConvEpilogue(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x1, u, w, skip):
        ctx.save_for_backward(x1, u, w, skip)
        B, C, L = x1.shape
        z = torch.empty((L, B, C), dtype=x1.dtype, device=x1.device)
        _short_epilogue_fwd[_grid(L, B, C)](x1.contiguous(), u.contiguous(), w.contiguous(),
                                            skip if skip is not None else w, z, L, C, z.stride(0), z.stride(1),
                                            K=w.shape[-1], HAS_SKIP=skip is not None, BLOCK_L=BLOCK_L,
                                            BLOCK_C=BLOCK_C)
        return z

    @staticmethod
    def backward(ctx, g_z):
        return recompute_backward(ops.short_conv_epilogue, ctx.saved_tensors, (g_z,))


def hyena_prologue(features_LBC3: torch.Tensor, w_proj_C3K: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused :func:`evo2_recipe.models.hyena.operators.hyena_prologue`."""
    if w_proj_C3K.shape[-1] != 3:
        return ops.hyena_prologue(features_LBC3, w_proj_C3K)
    return _Prologue.apply(features_LBC3, w_proj_C3K)


def hyena_epilogue(x1_BCL: torch.Tensor, y_BCL: torch.Tensor) -> torch.Tensor:
    """Fused :func:`evo2_recipe.models.hyena.operators.hyena_epilogue`."""
    return _Epilogue.apply(x1_BCL, y_BCL)


def short_conv_epilogue(x1_BCL: torch.Tensor, u_BCL: torch.Tensor, w_CK: torch.Tensor,
                        skip_C: torch.Tensor | None = None) -> torch.Tensor:
    """Fused :func:`evo2_recipe.models.hyena.operators.short_conv_epilogue` (one pass instead of pad, casts, a
    cuDNN depthwise conv and the gate)."""
    return _ShortConvEpilogue.apply(x1_BCL, u_BCL, w_CK, skip_C)
