"""Fused prologue/epilogue around the convolutions of hcs/hcm/hcl.

Prologue: projection conv (3 taps) + de-interleave + ``u = x2 * v`` in one pass from the projection output to
channel-first ``x1`` and ``u`` (what the FFT wants); that output is sequence-first (TE's projection, sequence or
context parallelism) or channel-first (the local spec's projection writes ``W @ x^T``: no transpose either way).
Epilogue: ``z = x1 * y`` written sequence-first (what the output projection wants); for hcs the 7-tap conv runs
inside the epilogue (``short_conv_epilogue``, reading the prologue's ``u``). The plain path makes ~6 layout and
elementwise passes for the same work. (An earlier single kernel for the whole hcs path recomputed the projection conv
for each of the 7 taps: 5.2 ms per layer on an H200, removed.) Plain twins: ``operators.hyena_prologue`` /
``hyena_epilogue`` / ``short_conv_epilogue``.

Backward: the prologue's is one kernel (it recomputes x2 and v at the three shifts and writes per-block parts of the
weight gradient, summed after); the hcs epilogue's is two: the gate's gradients (the 7-tap conv recomputed), then the
depthwise conv's backward (``causal_conv_backward``: input gradient, per-block parts of the weight and skip
gradients). (Re-running the plain twins under autograd instead cost the 1b step about a fifth of its GPU time, and
the hcs one ~7 ms per step; profiler, H200.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from evo2_recipe.models.hyena import operators as ops

BLOCK_L, BLOCK_C = 32, 64
# the forwards that transpose (prologue: sequence-first in, channel-first out) or read a 7-tap window (hcs epilogue),
# from H200 sweeps at the 1b and 7b widths, 8,192 tokens, bf16 (4 warps): prologue 16 x 64 73 / 149 us against
# 32 x 64 114 / 231 (16 x 128 85, 64 x 64 216); hcs epilogue 64 x 32 54 / 106 us against 32 x 64 87 / 176. A second
# prologue sweep alone (twenty-first session): 16 x 32 with 2 warps 93 / 194 us against 16 x 64 with 4 warps
# 103 / 194, 8 x 64 126 / 229, but in the 1b forward (its input fresh from the GEMM) 69.5 us against 68.1: kept;
# loading each tile's three interleaved lanes at once (4-wide masked loads, split in registers) instead of one
# strided load per lane was 2.5-2.9x slower.
PROLOGUE_BLOCK_L, PROLOGUE_BLOCK_C, PROLOGUE_WARPS = 16, 64, 4
# the same kernel on channel-first features (no-grad forwards: the projection writes W @ x^T), loads and stores along
# time; H200 sweep alone at the 1b / 7b widths (8,192 tokens, bf16, us): 128 x 16 52.2 / 103.5, 256 x 8 50.8 / 104.1,
# 512 x 4 52.1 / 101.7, 64 x 32 58.0 / 114.8, 128 x 32 72.4 / 145.5; the sequence-first kernel 70.9 / 145.0
CF_PROLOGUE_BLOCK_L, CF_PROLOGUE_BLOCK_C, CF_PROLOGUE_WARPS = 128, 16, 4
SHORT_BLOCK_L, SHORT_BLOCK_C = 64, 32
# the prologue's backward holds three accumulators and recomputes x2, v at three shifts: smaller tiles run faster
# (H200 sweeps at the 1b training shape, weight-gradient sum included: 8 x 32 with 2 warps 451 us, 8 x 16 with 1 warp
# 450, 16 x 32 with 4 warps 563, 32 x 64 840, 64 x 128 1.36 ms; splitting it into a gate pass writing the conv-output
# gradients interleaved plus the shared conv backward was slower, 0.75 + 0.13 ms)
BWD_BLOCK_L, BWD_BLOCK_C, BWD_WARPS = 8, 32, 2
# the same backward on channel-first features (training with the local spec: the projection writes W @ x^T), every
# access along time; H200 sweep alone at the 1b / 7b widths (8,192 tokens, bf16, weight-gradient sum included, us):
# 64 x 16 with 4 warps 271 / 466, 64 x 16 with 2 warps 267 / 493, 128 x 8 313 / 452, 128 x 16 280 / 514, 64 x 32
# 332 / 542, 32 x 16 393 / 764; the sequence-first backward 476 / 978
CF_BWD_BLOCK_L, CF_BWD_BLOCK_C, CF_BWD_WARPS = 64, 16, 4
CONV_BWD_BLOCK_L, CONV_BWD_BLOCK_C = 64, 64


@triton.jit
def _proj_conv(f_ptr, wp_ptr, s, c, lane: tl.constexpr, L, stride_l, cmask, BLOCK_L: tl.constexpr,
               BLOCK_C: tl.constexpr, stride_c):
    """Projection-conv output of interleaved lane ``lane`` (0: x1, 1: x2, 2: v) at positions ``s`` (fp32); feature
    ``3c + lane`` at ``stride_c`` (1: sequence-first features, L: channel-first)."""
    acc = tl.zeros((BLOCK_L, BLOCK_C), dtype=tl.float32)
    for j in tl.static_range(3):
        src = s - 2 + j
        m = ((src >= 0) & (src < L))[:, None] & cmask[None, :]
        # int64 offsets: at 1M tokens x 3*4096 channels the element offset passes 2^31
        f = tl.load(f_ptr + src.to(tl.int64)[:, None] * stride_l + (3 * c + lane).to(tl.int64)[None, :] * stride_c,
                    mask=m, other=0.0)
        w = tl.load(wp_ptr + (3 * c + lane) * 3 + j, mask=cmask, other=0.0)
        acc += f.to(tl.float32) * w.to(tl.float32)[None, :]
    return acc


@triton.jit
def _prologue_fwd(f_ptr, wp_ptr, x1_ptr, u_ptr, L, C, stride_fl, stride_fb, stride_fc, BLOCK_L: tl.constexpr,
                  BLOCK_C: tl.constexpr):
    t = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    b = tl.program_id(1).to(tl.int64)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    f_b = f_ptr + b * stride_fb
    x1 = _proj_conv(f_b, wp_ptr, t, c, 0, L, stride_fl, cmask, BLOCK_L, BLOCK_C, stride_fc)
    x2 = _proj_conv(f_b, wp_ptr, t, c, 1, L, stride_fl, cmask, BLOCK_L, BLOCK_C, stride_fc)
    v = _proj_conv(f_b, wp_ptr, t, c, 2, L, stride_fl, cmask, BLOCK_L, BLOCK_C, stride_fc)
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
def _short_conv_out(u_ptr, w_ptr, skip_ptr, row, t, c, cmask, L, K: tl.constexpr, HAS_SKIP: tl.constexpr,
                    BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr, dtype: tl.constexpr):
    """hcs conv output ``y`` at positions ``t`` (last tap on the current token, + the NV skip ``b u``), rounded to
    ``dtype`` where the plain path rounds it; ``row`` = each channel's (B, C, L) row offset."""
    acc = tl.zeros((BLOCK_L, BLOCK_C), dtype=tl.float32)
    for k in tl.static_range(K):
        src = t - (K - 1) + k
        m = ((src >= 0) & (src < L))[:, None] & cmask[None, :]
        w = tl.load(w_ptr + c * K + k, mask=cmask, other=0.0).to(tl.float32)
        acc += tl.load(u_ptr + row + src[:, None], mask=m, other=0.0).to(tl.float32) * w[None, :]
    y = acc.to(dtype)  # the plain conv returns u's dtype
    if HAS_SKIP:  # y + u * b, each rounded like the plain path
        m = (t < L)[:, None] & cmask[None, :]
        u = tl.load(u_ptr + row + t[:, None], mask=m, other=0.0)
        skip = tl.load(skip_ptr + c, mask=cmask, other=0.0).to(dtype)
        y = (y.to(tl.float32) + (u.to(tl.float32) * skip.to(tl.float32)[None, :]).to(dtype).to(tl.float32)).to(dtype)
    return y


@triton.jit
def _short_epilogue_fwd(x1_ptr, u_ptr, w_ptr, skip_ptr, z_ptr, L, C, stride_zl, stride_zb, K: tl.constexpr,
                        HAS_SKIP: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr):
    t = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    b = tl.program_id(1).to(tl.int64)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    row = b * C * L + c.to(tl.int64)[None, :] * L  # (B, C, L) contiguous
    y = _short_conv_out(u_ptr, w_ptr, skip_ptr, row, t, c, cmask, L, K, HAS_SKIP, BLOCK_L, BLOCK_C,
                        x1_ptr.dtype.element_ty)
    m = (t < L)[:, None] & cmask[None, :]
    x1 = tl.load(x1_ptr + row + t[:, None], mask=m, other=0.0)
    z = x1.to(tl.float32) * y.to(tl.float32)
    tl.store(z_ptr + b * stride_zb + t.to(tl.int64)[:, None] * stride_zl + c[None, :], z.to(z_ptr.dtype.element_ty),
             mask=m)


@triton.jit
def _short_epilogue_bwd(x1_ptr, u_ptr, w_ptr, skip_ptr, gz_ptr, gx1_ptr, gy_ptr, L, C, stride_zl, stride_zb,
                        K: tl.constexpr, HAS_SKIP: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr):
    """``z = x1 * y`` backwards with ``y`` recomputed: g_x1 = g_z y, g_y = g_z x1 (B, C, L), rounded as autograd's mul
    leaves them; the conv's own backward is :func:`_causal_conv_bwd`."""
    t = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    b = tl.program_id(1).to(tl.int64)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    act = x1_ptr.dtype.element_ty
    row = b * C * L + c.to(tl.int64)[None, :] * L
    y = _short_conv_out(u_ptr, w_ptr, skip_ptr, row, t, c, cmask, L, K, HAS_SKIP, BLOCK_L, BLOCK_C, act)
    m = (t < L)[:, None] & cmask[None, :]
    x1 = tl.load(x1_ptr + row + t[:, None], mask=m, other=0.0).to(tl.float32)
    gz = tl.load(gz_ptr + b * stride_zb + t.to(tl.int64)[:, None] * stride_zl + c[None, :], mask=m, other=0.0)
    gz = gz.to(tl.float32)
    tl.store(gx1_ptr + row + t[:, None], (gz * y.to(tl.float32)).to(act), mask=m)
    tl.store(gy_ptr + row + t[:, None], (gz * x1).to(act), mask=m)


@triton.jit
def _prologue_grads_at(f_ptr, wp_ptr, gx1_ptr, gu_ptr, t, b, c, L, C, stride_fl, stride_fc, cmask,
                       BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr):
    """Gradients at the projection-conv outputs of positions ``t``: (g_x1, g_x2, g_v) fp32, each rounded to the
    activation dtype as autograd's ``u = x2 * v`` leaves them (x2 and v recomputed, rounded like the forward)."""
    act = gx1_ptr.dtype.element_ty
    m = (t < L)[:, None] & cmask[None, :]
    offs = b * C * L + c.to(tl.int64)[None, :] * L + t[:, None]
    g1 = tl.load(gx1_ptr + offs, mask=m, other=0.0).to(tl.float32)
    gu = tl.load(gu_ptr + offs, mask=m, other=0.0).to(tl.float32)
    x2 = _proj_conv(f_ptr, wp_ptr, t, c, 1, L, stride_fl, cmask, BLOCK_L, BLOCK_C, stride_fc).to(act).to(tl.float32)
    v = _proj_conv(f_ptr, wp_ptr, t, c, 2, L, stride_fl, cmask, BLOCK_L, BLOCK_C, stride_fc).to(act).to(tl.float32)
    return g1, (gu * v).to(act).to(tl.float32), (gu * x2).to(act).to(tl.float32)


@triton.jit
def _tap_grad(f_ptr, g, s, c, lane: tl.constexpr, j: tl.constexpr, L, stride_fl, stride_fc, cmask):
    """``sum_s g[s] f[s - 2 + j, 3c + lane]`` over this block's positions: one tap's weight-gradient part (C,)."""
    src = s - 2 + j
    m = ((src >= 0) & (src < L))[:, None] & cmask[None, :]
    f = tl.load(f_ptr + src.to(tl.int64)[:, None] * stride_fl + (3 * c + lane).to(tl.int64)[None, :] * stride_fc,
                mask=m, other=0.0)
    return tl.sum(g * f.to(tl.float32), axis=0)


@triton.jit
def _prologue_bwd(f_ptr, wp_ptr, gx1_ptr, gu_ptr, gf_ptr, gw_ptr, L, C, B, stride_fl, stride_fb, stride_fc,
                  BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr):
    """g_features (laid out as the features: (L, B, 3C) or (B, 3C, L)) of this block's positions and its part of
    g_w (3C, 3): ``g_f[s] = sum_j w[j] G[s+2-j]`` (the conv's transpose: G at this block and the next two
    positions), ``g_w[j] += sum_s G[s] f[s-2+j]``."""
    s = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    b = tl.program_id(1).to(tl.int64)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    f_b = f_ptr + b * stride_fb
    acc0 = tl.zeros((BLOCK_L, BLOCK_C), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_L, BLOCK_C), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_L, BLOCK_C), dtype=tl.float32)
    for d in tl.static_range(3):  # G at s + d meets tap j = 2 - d
        g0, g1, g2 = _prologue_grads_at(f_b, wp_ptr, gx1_ptr, gu_ptr, s + d, b, c, L, C, stride_fl, stride_fc,
                                        cmask, BLOCK_L, BLOCK_C)
        acc0 += g0 * tl.load(wp_ptr + (3 * c + 0) * 3 + 2 - d, mask=cmask, other=0.0).to(tl.float32)[None, :]
        acc1 += g1 * tl.load(wp_ptr + (3 * c + 1) * 3 + 2 - d, mask=cmask, other=0.0).to(tl.float32)[None, :]
        acc2 += g2 * tl.load(wp_ptr + (3 * c + 2) * 3 + 2 - d, mask=cmask, other=0.0).to(tl.float32)[None, :]
        if d == 0:  # this block's own positions: its part of the weight gradient, (nL, B, 3C, 3) fp32
            part = gw_ptr + ((tl.program_id(0) * B + b) * 3 * C + 3 * c) * 3
            for j in tl.static_range(3):
                tl.store(part + 0 * 3 + j, _tap_grad(f_b, g0, s, c, 0, j, L, stride_fl, stride_fc, cmask), mask=cmask)
                tl.store(part + 1 * 3 + j, _tap_grad(f_b, g1, s, c, 1, j, L, stride_fl, stride_fc, cmask), mask=cmask)
                tl.store(part + 2 * 3 + j, _tap_grad(f_b, g2, s, c, 2, j, L, stride_fl, stride_fc, cmask), mask=cmask)
    m = (s < L)[:, None] & cmask[None, :]
    out = gf_ptr + b * stride_fb + s.to(tl.int64)[:, None] * stride_fl + (3 * c).to(tl.int64)[None, :] * stride_fc
    dtype = gf_ptr.dtype.element_ty
    tl.store(out, acc0.to(dtype), mask=m)
    tl.store(out + stride_fc, acc1.to(dtype), mask=m)
    tl.store(out + 2 * stride_fc, acc2.to(dtype), mask=m)


@triton.jit
def _causal_conv_bwd(x_ptr, w_ptr, g_ptr, skip_ptr, gx_ptr, gw_ptr, gskip_ptr, L, C, B, stride_l, stride_c, stride_b,
                     K: tl.constexpr, HAS_SKIP: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr):
    """Backward of the depthwise causal conv ``y[s, c] = sum_j w[c, j] x[s-K+1+j, c]`` (+ ``skip[c] x[s, c]``) from
    ``g`` = dL/dy (strides over positions, channels, batch; ``g`` and ``g_x`` share x's):
    ``g_x[s] = sum_j w[j] g[s+K-1-j]`` (fp32 sum rounded to x's dtype, the skip's ``g b`` added as autograd adds
    the two), and this block's parts of ``g_w[c, j] = sum_s g[s] x[s-K+1+j]`` and ``g_skip[c] = sum_s g[s] x[s]``
    (fp32, (nL, B, C, K) and (nL, B, C), summed by the caller)."""
    s = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    b = tl.program_id(1).to(tl.int64)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    col = b * stride_b + c.to(tl.int64)[None, :] * stride_c
    act = gx_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_L, BLOCK_C), dtype=tl.float32)
    for j in tl.static_range(K):  # g at s + K-1-j meets tap j
        src = s + (K - 1) - j
        m = (src < L)[:, None] & cmask[None, :]
        g = tl.load(g_ptr + col + src.to(tl.int64)[:, None] * stride_l, mask=m, other=0.0).to(tl.float32)
        acc += g * tl.load(w_ptr + c * K + j, mask=cmask, other=0.0).to(tl.float32)[None, :]
    m = (s < L)[:, None] & cmask[None, :]
    own = col + s.to(tl.int64)[:, None] * stride_l
    g = tl.load(g_ptr + own, mask=m, other=0.0).to(tl.float32)
    gx = acc.to(act)
    part = (tl.program_id(0) * B + b) * C + c
    if HAS_SKIP:
        x = tl.load(x_ptr + own, mask=m, other=0.0).to(tl.float32)
        skip = tl.load(skip_ptr + c, mask=cmask, other=0.0).to(act).to(tl.float32)
        gx = (gx.to(tl.float32) + (g * skip[None, :]).to(act).to(tl.float32)).to(act)
        tl.store(gskip_ptr + part, tl.sum((g * x).to(act).to(tl.float32), axis=0), mask=cmask)
    tl.store(gx_ptr + own, gx, mask=m)
    for j in tl.static_range(K):
        src = s - (K - 1) + j
        mj = ((src >= 0) & (src < L))[:, None] & cmask[None, :]
        x = tl.load(x_ptr + col + src.to(tl.int64)[:, None] * stride_l, mask=mj, other=0.0).to(tl.float32)
        tl.store(gw_ptr + part * K + j, tl.sum(g * x, axis=0), mask=cmask)


@triton.jit
def _epilogue_bwd(x1_ptr, y_ptr, gz_ptr, gx1_ptr, gy_ptr, L, C, stride_yb, stride_yc, stride_zl, stride_zb,
                  BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr):
    """``z = x1 * y`` (y rounded to x1's dtype) backwards: g_x1 = g_z y, g_y = g_z x1, each rounded as autograd's
    mul leaves them; g_y (B, C, L) contiguous in y's dtype."""
    t = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    b = tl.program_id(1).to(tl.int64)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    m = (t < L)[:, None] & (c < C)[None, :]
    act = x1_ptr.dtype.element_ty
    offs = b * C * L + c.to(tl.int64)[None, :] * L + t[:, None]
    x1 = tl.load(x1_ptr + offs, mask=m, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + b * stride_yb + c.to(tl.int64)[None, :] * stride_yc + t[:, None], mask=m, other=0.0)
    gz = tl.load(gz_ptr + b * stride_zb + t.to(tl.int64)[:, None] * stride_zl + c[None, :], mask=m, other=0.0)
    gz = gz.to(tl.float32)
    tl.store(gx1_ptr + offs, (gz * y.to(act).to(tl.float32)).to(act), mask=m)
    tl.store(gy_ptr + offs, (gz * x1).to(act).to(gy_ptr.dtype.element_ty), mask=m)


def _grid(L, B, C, block_l=BLOCK_L, block_c=BLOCK_C):
    return (triton.cdiv(L, block_l), B, triton.cdiv(C, block_c))


def _unit_stride_last(t: torch.Tensor) -> torch.Tensor:
    """The kernels take any strides over the leading dims (y may be the FFT buffer's first half), unit stride last."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _feature_strides(f: torch.Tensor, channel_first: bool) -> tuple[int, ...]:
    """(L, B, 3C) or channel-first (B, 3C, L) contiguous features -> L, B, 3C and the strides over positions, batch
    and channels the kernels take."""
    if channel_first:
        B, C3, L = f.shape
        return L, B, C3, 1, f.stride(0), f.stride(1)
    L, B, C3 = f.shape
    return L, B, C3, f.stride(0), f.stride(1), 1


class _Prologue(torch.autograd.Function):
    @staticmethod
    def forward(ctx, features, w_proj, channel_first: bool):
        f, w = features.contiguous(), w_proj.contiguous()
        L, B, C3, *strides = _feature_strides(f, channel_first)
        ctx.save_for_backward(f, w)
        ctx.w_dtype, ctx.channel_first = w_proj.dtype, channel_first
        x1 = torch.empty((B, C3 // 3, L), dtype=features.dtype, device=features.device)
        u = torch.empty_like(x1)
        bl, bc, warps = ((CF_PROLOGUE_BLOCK_L, CF_PROLOGUE_BLOCK_C, CF_PROLOGUE_WARPS) if channel_first
                         else (PROLOGUE_BLOCK_L, PROLOGUE_BLOCK_C, PROLOGUE_WARPS))
        _prologue_fwd[_grid(L, B, C3 // 3, bl, bc)](f, w, x1, u, L, C3 // 3, *strides, BLOCK_L=bl, BLOCK_C=bc,
                                                    num_warps=warps)
        return x1, u

    @staticmethod
    def backward(ctx, g_x1, g_u):
        f, w = ctx.saved_tensors
        L, B, C3, *strides = _feature_strides(f, ctx.channel_first)
        bl, bc, warps = ((CF_BWD_BLOCK_L, CF_BWD_BLOCK_C, CF_BWD_WARPS) if ctx.channel_first
                         else (BWD_BLOCK_L, BWD_BLOCK_C, BWD_WARPS))
        grid = _grid(L, B, C3 // 3, bl, bc)
        g_f = torch.empty_like(f)
        g_w_parts = torch.empty((grid[0], B, C3, 3), dtype=torch.float32, device=f.device)
        _prologue_bwd[grid](f, w, g_x1.contiguous(), g_u.contiguous(), g_f, g_w_parts, L, C3 // 3, B, *strides,
                            BLOCK_L=bl, BLOCK_C=bc, num_warps=warps)
        return g_f, g_w_parts.sum((0, 1)).to(ctx.w_dtype), None


class _Epilogue(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x1, y):
        x1, y = x1.contiguous(), _unit_stride_last(y)
        ctx.save_for_backward(x1, y)
        B, C, L = x1.shape
        z = torch.empty((L, B, C), dtype=x1.dtype, device=x1.device)
        _epilogue_fwd[_grid(L, B, C)](x1, y, z, L, C, y.stride(0), y.stride(1), z.stride(0), z.stride(1),
                                      BLOCK_L=BLOCK_L, BLOCK_C=BLOCK_C)
        return z

    @staticmethod
    def backward(ctx, g_z):
        x1, y = ctx.saved_tensors
        B, C, L = x1.shape
        g_z = _unit_stride_last(g_z)
        g_x1, g_y = torch.empty_like(x1), torch.empty((B, C, L), dtype=y.dtype, device=y.device)
        _epilogue_bwd[_grid(L, B, C)](x1, y, g_z, g_x1, g_y, L, C, y.stride(0), y.stride(1), g_z.stride(0),
                                      g_z.stride(1), BLOCK_L=BLOCK_L, BLOCK_C=BLOCK_C)
        return g_x1, g_y


class _ShortConvEpilogue(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x1, u, w, skip):
        x1, u, w = x1.contiguous(), u.contiguous(), w.contiguous()
        ctx.save_for_backward(x1, u, w, skip)
        B, C, L = x1.shape
        z = torch.empty((L, B, C), dtype=x1.dtype, device=x1.device)
        _short_epilogue_fwd[_grid(L, B, C, SHORT_BLOCK_L, SHORT_BLOCK_C)](
            x1, u, w, skip if skip is not None else w, z, L, C, z.stride(0), z.stride(1), K=w.shape[-1],
            HAS_SKIP=skip is not None, BLOCK_L=SHORT_BLOCK_L, BLOCK_C=SHORT_BLOCK_C)
        return z

    @staticmethod
    def backward(ctx, g_z):
        x1, u, w, skip = ctx.saved_tensors
        B, C, L = x1.shape
        g_z = _unit_stride_last(g_z)
        g_x1, g_y = torch.empty_like(x1), torch.empty_like(x1)
        _short_epilogue_bwd[_grid(L, B, C)](x1, u, w, skip if skip is not None else w, g_z, g_x1, g_y, L, C,
                                            g_z.stride(0), g_z.stride(1), K=w.shape[-1], HAS_SKIP=skip is not None,
                                            BLOCK_L=BLOCK_L, BLOCK_C=BLOCK_C)
        g_u, g_w, g_skip = causal_conv_backward(u, w, g_y, skip)
        return g_x1, g_u, g_w.to(w.dtype), None if skip is None else g_skip.to(x1.dtype).to(skip.dtype)


def causal_conv_backward(x_BCL: torch.Tensor, w_CK: torch.Tensor, g_BCL: torch.Tensor, skip_C: torch.Tensor | None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients of the depthwise causal conv (last tap on the current token, + ``skip * x``) from ``g`` = dL/dy, all
    (B, C, L) contiguous: ``(g_x, g_w (C, K) fp32, g_skip (C,) fp32 or None)``."""
    B, C, L = x_BCL.shape
    K = w_CK.shape[-1]
    grid = _grid(L, B, C, CONV_BWD_BLOCK_L, CONV_BWD_BLOCK_C)
    g_x = torch.empty_like(x_BCL)
    g_w_parts = torch.empty((grid[0], B, C, K), dtype=torch.float32, device=x_BCL.device)
    g_skip_parts = (torch.empty((grid[0], B, C), dtype=torch.float32, device=x_BCL.device) if skip_C is not None
                    else None)
    _causal_conv_bwd[grid](x_BCL, w_CK, g_BCL, skip_C if skip_C is not None else w_CK, g_x, g_w_parts,
                           g_skip_parts if skip_C is not None else g_w_parts, L, C, B, 1, L, C * L, K=K,
                           HAS_SKIP=skip_C is not None, BLOCK_L=CONV_BWD_BLOCK_L, BLOCK_C=CONV_BWD_BLOCK_C)
    return g_x, g_w_parts.sum((0, 1)), None if skip_C is None else g_skip_parts.sum((0, 1))


def hyena_prologue(features_LBC3: torch.Tensor, w_proj_C3K: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused :func:`evo2_recipe.models.hyena.operators.hyena_prologue`."""
    if w_proj_C3K.shape[-1] != 3:
        return ops.hyena_prologue(features_LBC3, w_proj_C3K)
    return _Prologue.apply(features_LBC3, w_proj_C3K, False)


def hyena_prologue_channel_first(features_BC3L: torch.Tensor, w_proj_C3K: torch.Tensor
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused :func:`evo2_recipe.models.hyena.operators.hyena_prologue_channel_first`: the features come
    channel-first from the projection (``W @ x^T``), so every load and store, forward and backward, runs along time -
    no transpose. With other than 3 taps the plain twin runs."""
    if w_proj_C3K.shape[-1] != 3:
        return ops.hyena_prologue_channel_first(features_BC3L, w_proj_C3K)
    return _Prologue.apply(features_BC3L, w_proj_C3K, True)


def hyena_epilogue(x1_BCL: torch.Tensor, y_BCL: torch.Tensor) -> torch.Tensor:
    """Fused :func:`evo2_recipe.models.hyena.operators.hyena_epilogue`."""
    return _Epilogue.apply(x1_BCL, y_BCL)


def short_conv_epilogue(x1_BCL: torch.Tensor, u_BCL: torch.Tensor, w_CK: torch.Tensor,
                        skip_C: torch.Tensor | None = None) -> torch.Tensor:
    """Fused :func:`evo2_recipe.models.hyena.operators.short_conv_epilogue` (one pass instead of pad, casts, a
    cuDNN depthwise conv and the gate)."""
    return _ShortConvEpilogue.apply(x1_BCL, u_BCL, w_CK, skip_C)
