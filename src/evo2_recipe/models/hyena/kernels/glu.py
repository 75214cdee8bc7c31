"""Fused bilinear GLU of the Evo 2 MLPs after layer 0 (spec 1.4): ``y = a * b`` of fc1's two halves ``x = [a | b]``.

The forward is one product either way; autograd's backward is not: two strided products (``g * b``, ``g * a``), a
zero-filled ``(tokens, 2F)`` gradient per half from ``chunk``'s backward and their sum - five passes over the largest
activation of the layer. Here one kernel reads ``g``, ``a`` and ``b`` once and writes ``[g*b | g*a]`` in fc1's
layout. Each product is rounded once in the input dtype, as torch's, so fused and plain results are identical.
Plain twin: :func:`evo2_recipe.models.hyena.operators.bilinear_glu`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _glu_fwd(x_ptr, y_ptr, F, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = col < F
    a = tl.load(x_ptr + row * 2 * F + col, mask=m, other=0.0)
    b = tl.load(x_ptr + row * 2 * F + F + col, mask=m, other=0.0)
    tl.store(y_ptr + row * F + col, (a.to(tl.float32) * b.to(tl.float32)).to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _glu_bwd(x_ptr, g_ptr, gx_ptr, F, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = col < F
    a = tl.load(x_ptr + row * 2 * F + col, mask=m, other=0.0).to(tl.float32)
    b = tl.load(x_ptr + row * 2 * F + F + col, mask=m, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + row * F + col, mask=m, other=0.0).to(tl.float32)
    tl.store(gx_ptr + row * 2 * F + col, (g * b).to(gx_ptr.dtype.element_ty), mask=m)
    tl.store(gx_ptr + row * 2 * F + F + col, (g * a).to(gx_ptr.dtype.element_ty), mask=m)


def _grid(rows: int, F: int) -> tuple[int, int]:
    return rows, triton.cdiv(F, BLOCK)


class _BilinearGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        x = x.contiguous()
        F = x.shape[-1] // 2
        y = torch.empty(*x.shape[:-1], F, dtype=x.dtype, device=x.device)
        _glu_fwd[_grid(x.numel() // (2 * F), F)](x, y, F, BLOCK=BLOCK)
        ctx.save_for_backward(x)
        return y

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        F = x.shape[-1] // 2
        g = g.contiguous().to(x.dtype)
        gx = torch.empty_like(x)
        _glu_bwd[_grid(x.numel() // (2 * F), F)](x, g, gx, F, BLOCK=BLOCK)
        return gx


def bilinear_glu(x: torch.Tensor) -> torch.Tensor:
    """Fused :func:`evo2_recipe.models.hyena.operators.bilinear_glu`; ``x`` (..., 2F) -> (..., F)."""
    if x.shape[-1] % 2:
        raise ValueError(f"bilinear GLU needs an even last dimension, got {x.shape[-1]}")
    return _BilinearGLU.apply(x)
