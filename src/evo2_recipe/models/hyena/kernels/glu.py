"""Fused GLUs of the Evo 2 MLPs: ``y = act(a) * b`` of fc1's two halves ``x = [a | b]``, with ``act`` the identity
(every layer after layer 0, spec 1.4: the bilinear GLU) or the exact erf GELU (layer 0).

Megatron's GLU runs ``act(a) * (b + offset)``: for layer 0 three passes over the largest activation of the layer (the
GELU, the add of a zero offset, the product; 0.30 ms of the 1b forward at 8,192 tokens, H200 profile), one here.
Autograd's backward is five passes (two strided products, a zero-filled ``(tokens, 2F)`` gradient per half from
``chunk``'s backward and their sum; for the GELU its own backward too); here one kernel reads ``g``, ``a`` and ``b``
once and writes ``[g_a | g_b]`` in fc1's layout. Each intermediate is rounded to the input dtype where torch rounds
it, so fused and plain results agree to the rounding of the last product (identical for the bilinear GLU). Plain
twins: :func:`evo2_recipe.models.hyena.operators.bilinear_glu` / ``gelu_glu``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _gelu(a):
    return 0.5 * a * (1.0 + tl.math.erf(a * 0.7071067811865476))


@triton.jit
def _glu_fwd(x_ptr, y_ptr, F, GELU: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = col < F
    dtype = y_ptr.dtype.element_ty
    a = tl.load(x_ptr + row * 2 * F + col, mask=m, other=0.0).to(tl.float32)
    b = tl.load(x_ptr + row * 2 * F + F + col, mask=m, other=0.0).to(tl.float32)
    if GELU:  # torch rounds the activation's output before the product
        a = _gelu(a).to(dtype).to(tl.float32)
    tl.store(y_ptr + row * F + col, (a * b).to(dtype), mask=m)


@triton.jit
def _glu_bwd(x_ptr, g_ptr, gx_ptr, F, GELU: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = col < F
    dtype = gx_ptr.dtype.element_ty
    a = tl.load(x_ptr + row * 2 * F + col, mask=m, other=0.0).to(tl.float32)
    b = tl.load(x_ptr + row * 2 * F + F + col, mask=m, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + row * F + col, mask=m, other=0.0).to(tl.float32)
    g_act = g * b
    if GELU:  # d/da gelu(a) = Phi(a) + a phi(a), applied to the product's gradient rounded as autograd leaves it
        cdf = 0.5 * (1.0 + tl.math.erf(a * 0.7071067811865476))
        pdf = tl.exp(-0.5 * a * a) * 0.3989422804014327
        g_act = g_act.to(dtype).to(tl.float32) * (cdf + a * pdf)
        a = _gelu(a).to(dtype).to(tl.float32)
    tl.store(gx_ptr + row * 2 * F + col, g_act.to(dtype), mask=m)
    tl.store(gx_ptr + row * 2 * F + F + col, (g * a).to(dtype), mask=m)


def _grid(rows: int, F: int) -> tuple[int, int]:
    return rows, triton.cdiv(F, BLOCK)


class _GLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gelu):
        x = x.contiguous()
        F = x.shape[-1] // 2
        y = torch.empty(*x.shape[:-1], F, dtype=x.dtype, device=x.device)
        _glu_fwd[_grid(x.numel() // (2 * F), F)](x, y, F, GELU=gelu, BLOCK=BLOCK)
        ctx.save_for_backward(x)
        ctx.gelu = gelu
        return y

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        F = x.shape[-1] // 2
        g = g.contiguous().to(x.dtype)
        gx = torch.empty_like(x)
        _glu_bwd[_grid(x.numel() // (2 * F), F)](x, g, gx, F, GELU=ctx.gelu, BLOCK=BLOCK)
        return gx, None


def _glu(x: torch.Tensor, gelu: bool) -> torch.Tensor:
    if x.shape[-1] % 2:
        raise ValueError(f"a GLU needs an even last dimension, got {x.shape[-1]}")
    return _GLU.apply(x, gelu)


def bilinear_glu(x: torch.Tensor) -> torch.Tensor:
    """Fused :func:`evo2_recipe.models.hyena.operators.bilinear_glu`; ``x`` (..., 2F) -> (..., F)."""
    return _glu(x, gelu=False)


def gelu_glu(x: torch.Tensor) -> torch.Tensor:
    """Fused :func:`evo2_recipe.models.hyena.operators.gelu_glu`; ``x`` (..., 2F) -> (..., F)."""
    return _glu(x, gelu=True)
