"""hcm without the FFT: the 128-tap causal filter as blocked Toeplitz GEMMs, the skip term and the gate fused in.

The StripedHyena 2 paper's two-stage blocked method: for a block of ``BLOCK_T`` output positions, the filter of one
group is a banded Toeplitz matrix ``T`` over the inputs that reach those outputs (the block itself and the ``KP`` =
128 positions before it), and the channels of that group are the columns of ``U`` - so ``y = T @ U`` runs on tensor
cores. With 16 channels per filter group (evo2 7b/40b; 15 in the 1b) the products are ``(64 x 64) @ (64 x 16)`` and
``(64 x 128) @ (128 x 16)``. The epilogue adds ``D u``, rounds ``y`` to the activation dtype as the plain path does,
gates by ``x1`` and writes ``z`` sequence-first.

The FFT path it replaces makes ~8 passes over full-length fp32/complex buffers per hcm layer (padding, two
transforms, the filter spectrum broadcast to every channel, the product, cuFFT's input copy, the gate); this reads
``u`` and ``x1`` once and writes ``z`` once. For bf16/fp16 activations the fp32 filter is split into a high and a low
half-precision part (two products, fp32 accumulation: ~16 mantissa bits of the filter kept); fp32 activations take
one full-precision product. Inference forward only (no autograd): the training path keeps the FFT and its backward.

Plain twin: ``operators.hyena_epilogue(x1, operators.fft_causal_conv(u, h, D))``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_T = 64  # output positions per product
# time blocks that reuse one program's Toeplitz matrix: 8 150.6 us, 4 158.4, 2 190.7 at the 1b width, 8,192 tokens,
# 4 warps (H200 sweep; 2 or 8 warps and 32- or 128-position blocks slower); in the forwards 8 against 4: 1b 110 /
# 117 us, 7b 301 / 333 us
BLOCKS_PER_PROGRAM = 8


@triton.jit
def _toeplitz(h_ptr, g, K, i, s, shift: tl.constexpr):
    """fp32 block ``T[i, s] = h[g, i + shift - s]`` (zero outside the filter's taps)."""
    k = i[:, None] + shift - s[None, :]
    return tl.load(h_ptr + g * K + k, mask=(k >= 0) & (k < K), other=0.0)


@triton.jit
def _product(taps, U, SPLIT: tl.constexpr):
    """``taps @ U`` in fp32: the filter as high + low half-precision parts for half-precision ``U``, else exact."""
    if SPLIT:
        hi = taps.to(U.dtype)
        out = tl.dot(hi, U) + tl.dot((taps - hi.to(tl.float32)).to(U.dtype), U)
    else:  # an explicit else: the compiler builds the code after an early return even when SPLIT is constexpr
        out = tl.dot(taps, U, input_precision="ieee")
    return out


@triton.jit
def _medium_conv_epilogue_fwd(x1_ptr, u_ptr, h_ptr, d_ptr, z_ptr, L, C, P, K, stride_zl, stride_zb,
                              KP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
                              BLOCKS: tl.constexpr, SPLIT: tl.constexpr):
    g = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    i = tl.arange(0, BLOCK_T)
    n = tl.arange(0, BLOCK_N)
    c = g * P + n  # the channels of filter group g
    cmask = n < P
    # Output i of a block starting at t0 reads u[t0 + s] (s <= i, taps i - s) and the KP positions before the
    # block, u[t0 - KP + s] (taps i + KP - s): two products instead of one (BLOCK_T + KP)-wide one, whose width
    # would not be a power of two.
    t_cur = _toeplitz(h_ptr, g, K, i, i, 0)  # (BLOCK_T, BLOCK_T)
    s_prev = tl.arange(0, KP)
    t_prev = _toeplitz(h_ptr, g, K, i, s_prev, KP)  # (BLOCK_T, KP)
    d = tl.load(d_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    row = b * C * L + c.to(tl.int64) * L  # (B, C, L) contiguous
    for blk in tl.static_range(BLOCKS):
        t0 = (tl.program_id(0) * BLOCKS + blk) * BLOCK_T
        t = t0 + i
        m = (t < L)[:, None] & cmask[None, :]
        u_cur = tl.load(u_ptr + row[None, :] + t[:, None], mask=m, other=0.0)
        p = t0 - KP + s_prev
        u_prev = tl.load(u_ptr + row[None, :] + p[:, None], mask=((p >= 0) & (p < L))[:, None] & cmask[None, :],
                         other=0.0)
        y = _product(t_cur, u_cur, SPLIT) + _product(t_prev, u_prev, SPLIT)
        y = (y + d[None, :] * u_cur.to(tl.float32)).to(x1_ptr.dtype.element_ty)  # rounded as the plain path does
        x1 = tl.load(x1_ptr + row[None, :] + t[:, None], mask=m, other=0.0)
        z = x1.to(tl.float32) * y.to(tl.float32)
        tl.store(z_ptr + t.to(tl.int64)[:, None] * stride_zl + b * stride_zb + c[None, :],
                 z.to(z_ptr.dtype.element_ty), mask=m)


def medium_conv_epilogue(x1_BCL: torch.Tensor, u_BCL: torch.Tensor, h_GK: torch.Tensor,
                         skip_C: torch.Tensor) -> torch.Tensor:
    """``z = x1 * (h * u + D u)`` -> (L, B, C) in x1's dtype: hcm after the prologue, without autograd.

    ``h`` (G, K) fp32 with channel ``c`` in group ``c // (C / G)`` and the current token at ``h[:, 0]``; ``skip``
    (C,) the per-channel ``D``.
    """
    if torch.is_grad_enabled() and (x1_BCL.requires_grad or u_BCL.requires_grad or h_GK.requires_grad):
        raise RuntimeError("medium_conv_epilogue is inference-only; the training path takes the FFT convolution")
    x1, u = x1_BCL.contiguous(), u_BCL.contiguous()
    h, d = h_GK.float().contiguous(), skip_C.contiguous()
    B, C, L = x1.shape
    G, K = h.shape
    if C % G:
        raise ValueError(f"{C} channels are not divisible into {G} filter groups")
    P = C // G
    z = torch.empty((L, B, C), dtype=x1.dtype, device=x1.device)
    KP = max(16, triton.next_power_of_2(max(K - 1, 1)))  # positions before a block that reach it (>= K - 1)
    grid = (triton.cdiv(L, BLOCK_T * BLOCKS_PER_PROGRAM), G, B)
    _medium_conv_epilogue_fwd[grid](x1, u, h, d, z, L, C, P, K, z.stride(0), z.stride(1), KP=KP, BLOCK_T=BLOCK_T,
                                    BLOCK_N=max(16, triton.next_power_of_2(P)), BLOCKS=BLOCKS_PER_PROGRAM,
                                    SPLIT=u.dtype in (torch.bfloat16, torch.float16))
    return z
