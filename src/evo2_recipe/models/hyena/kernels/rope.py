"""Fused rotary position embedding of the attention layers' queries and keys (megatron's non-interleaved RoPE).

    y[..., j] = t[..., j] cos f[j] + rot(t)[..., j] sin f[j],   rot(t) = [-t2, t1]   (j < rot_dim; the rest passes)

megatron's unfused path (``_apply_rotary_pos_emb_bshd``, what the local spec runs without Transformer Engine) makes
seven passes per tensor: the neg and cat of ``rot``, two broadcast products, the add, and the cat with the
pass-through part (the 1b forward at 8,192 tokens: 1.7 ms of its 38 ms, H200 profile). Here one kernel reads ``t``
(any strides: queries and keys are views of the fused QKV projection) and writes it rotated, contiguous, each output
rounded once: 20 us a tensor at the 1b width against megatron's 245. Queries and keys share one cos/sin table
(evaluated per element inside the kernel they took 66 us). The backward is the transposed rotation, one pass too.
Plain twin: megatron's ``apply_rotary_pos_emb``; ``tests/test_kernels.py`` compares them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ROWS = 16  # (position, batch, head) rows per program


@triton.jit
def _rope(t_ptr, cos_ptr, sin_ptr, out_ptr, n_rows, B, NH, stride_l, stride_b, stride_h, D, ROT,
          BACKWARD: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    j = tl.arange(0, BLOCK_D)
    half = ROT // 2
    l, b, h = r // (B * NH), (r // NH) % B, r % NH
    row_in = (l * stride_l + b * stride_b + h * stride_h)[:, None]
    rm = (r < n_rows)[:, None]
    m = rm & (j < D)[None, :]
    rotated = (j < ROT)[None, :]
    partner = tl.where(j < half, j + half, j - half)  # rot(t)[j] = -t[j + half] (j < half), t[j - half] (after)
    t = tl.load(t_ptr + row_in + j[None, :], mask=m, other=0.0).to(tl.float32)
    tp = tl.load(t_ptr + row_in + partner[None, :], mask=m & rotated, other=0.0).to(tl.float32)
    table = (l * ROT)[:, None]
    cos = tl.load(cos_ptr + table + j[None, :], mask=rm & rotated, other=0.0).to(tl.float32)
    if BACKWARD:  # the adjoint: g_t[j] = g[j] cos f[j] -/+ g[partner] sin f[partner]
        sin = tl.load(sin_ptr + table + partner[None, :], mask=rm & rotated, other=0.0).to(tl.float32)
        y = t * cos + tl.where((j < half)[None, :], tp, -tp) * sin
    else:
        sin = tl.load(sin_ptr + table + j[None, :], mask=rm & rotated, other=0.0).to(tl.float32)
        y = t * cos + tl.where((j < half)[None, :], -tp, tp) * sin
    y = tl.where(rotated, y, t)
    tl.store(out_ptr + r[:, None] * D + j[None, :], y.to(out_ptr.dtype.element_ty), mask=m)


def _launch(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    L, B, NH, D = t.shape
    if t.stride(-1) != 1:
        t = t.contiguous()
    out = torch.empty((L, B, NH, D), dtype=t.dtype, device=t.device)
    n_rows = L * B * NH
    _rope[(triton.cdiv(n_rows, ROWS),)](t, cos, sin, out, n_rows, B, NH, t.stride(0), t.stride(1), t.stride(2), D,
                                       cos.shape[-1], BACKWARD=backward, ROWS=ROWS,
                                       BLOCK_D=triton.next_power_of_2(D))
    return out


class _RotaryEmbedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _launch(t, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, g):
        cos, sin = ctx.saved_tensors
        return _launch(g, cos, sin, backward=True), None, None


def apply_rotary_pos_emb(freqs: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Fused megatron ``apply_rotary_pos_emb`` (bshd, not interleaved, ``mscale`` 1) of each of ``tensors`` (L, B,
    heads, d) - queries and keys share one table of cos/sin - with ``freqs`` (L, 1, 1, rot_dim) fp32 as megatron's
    ``RotaryEmbedding`` returns them (already this CP rank's positions)."""
    L, rot = freqs.shape[0], freqs.shape[-1]
    for t in tensors:
        if t.dim() != 4 or freqs.dim() != 4 or freqs.shape[1:3] != (1, 1) or t.shape[0] != L:
            raise ValueError(f"RoPE needs t (L, B, heads, d) and freqs (L, 1, 1, rot_dim); got {tuple(t.shape)} and "
                             f"{tuple(freqs.shape)}")
        if rot > t.shape[-1] or rot % 2:
            raise ValueError(f"rotary dim {rot} must be even and at most the head dim {t.shape[-1]}")
    tables = {}
    out = []
    for t in tensors:
        if t.dtype not in tables:  # megatron rounds cos and sin to the activations' dtype
            f = freqs.detach().reshape(L, rot).float()
            tables[t.dtype] = (f.cos().to(t.dtype).contiguous(), f.sin().to(t.dtype).contiguous())
        out.append(_RotaryEmbedding.apply(t, *tables[t.dtype]))
    return tuple(out)
