"""Fused one-token Hyena decode step: projection FIR + de-interleave + ``u = x2*v`` + operator + gate, one kernel.

The eager step (``HyenaOperator.step`` behind ``HyenaMixer._decode_step``) is the oracle: per layer and token it runs ~20 tiny kernels
(window concatenations and shifts, casts, products, reductions), which at batch 1 cost more than the layer's GEMVs.
Here each program owns a block of channels of one sequence and does, with the same roundings as the eager step:

    p[j]   = sum_k proj_taps[j, k] * [proj_window[j, :], f[j]][k]      j = 3c + lane, window shifted in place
    x1, x2, v = round(p[3c]), round(p[3c+1]), round(p[3c+2]);  u = round(x2 * v)
    FIR (hcs 7 taps, hcm 128):  y = sum_k taps[c, k] * [window[c, :], u][k]    window shifted in place
    modal (hcl, 16 modes):      y = sum_o rp[c, o] s[c, o] + direct[c] u;  s <- poles * s + u
    z      = round(x1 * round(y))

Rounding is to the model dtype (a no-op in fp32), accumulation in fp32. Grid: (batch, channel blocks).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _round(x, dtype: tl.constexpr):
    """fp32 -> model dtype -> fp32 with round-to-nearest-even, as torch casts (bf16 done on the bits: Triton's CPU
    interpreter truncates a bf16 cast, which would make the CPU test of this kernel disagree with the GPU)."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    elif dtype == tl.float32:
        return x
    else:
        return x.to(dtype).to(tl.float32)


@triton.jit
def _proj_lane(f_row, pw_row, pt_ptr, c, lane: tl.constexpr, cmask):
    """One interleaved lane (0: x1, 1: x2, 2: v) of the 3-tap projection FIR: (output, window after the shift)."""
    j = 3 * c + lane
    w0 = tl.load(pw_row + 2 * j, mask=cmask, other=0.0)
    w1 = tl.load(pw_row + 2 * j + 1, mask=cmask, other=0.0)
    cur = tl.load(f_row + j, mask=cmask, other=0.0)
    out = (tl.load(pt_ptr + 3 * j, mask=cmask, other=0.0) * w0.to(tl.float32)
           + tl.load(pt_ptr + 3 * j + 1, mask=cmask, other=0.0) * w1.to(tl.float32)
           + tl.load(pt_ptr + 3 * j + 2, mask=cmask, other=0.0) * cur.to(tl.float32))
    return _round(out, cur.dtype), w1, cur


@triton.jit
def _hyena_decode_kernel(f_ptr, pw_ptr, pt_ptr, ow_ptr, ot_ptr, s_ptr, poles_ptr, rp_ptr, direct_ptr, z_ptr, C,
                         stride_fb, stride_pwb, stride_owb, stride_sb, stride_zb,
                         MODAL: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, ORDER: tl.constexpr,
                         BLOCK_C: tl.constexpr):
    # Every state read happens before the barrier and every state write after it: Triton may give one element to
    # several threads (replicas), and a replica must not overwrite a window value another has yet to read.
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    f_row = f_ptr + b * stride_fb
    pw_row = pw_ptr + b * stride_pwb
    x1, x1_w1, x1_cur = _proj_lane(f_row, pw_row, pt_ptr, c, 0, cmask)
    x2, x2_w1, x2_cur = _proj_lane(f_row, pw_row, pt_ptr, c, 1, cmask)
    v, v_w1, v_cur = _proj_lane(f_row, pw_row, pt_ptr, c, 2, cmask)
    dtype = f_ptr.dtype.element_ty
    u = _round(x2 * v, dtype)
    if MODAL:
        o = tl.arange(0, ORDER)
        co = c[:, None] * ORDER + o[None, :]
        s_at = s_ptr + b * stride_sb + co
        s = tl.load(s_at, mask=cmask[:, None], other=0.0)
        rp = tl.load(rp_ptr + co, mask=cmask[:, None], other=0.0)
        y = tl.sum(rp * s, axis=1) + tl.load(direct_ptr + c, mask=cmask, other=0.0) * u
        s_new = tl.load(poles_ptr + co, mask=cmask[:, None], other=0.0) * s + u[:, None]
    else:
        k = tl.arange(0, KP)
        row = ow_ptr + b * stride_owb + c[:, None] * (K - 1)
        in_window = cmask[:, None] & (k < K - 1)[None, :]
        window = tl.load(row + k[None, :], mask=in_window, other=0.0).to(tl.float32)
        window = tl.where((k == K - 1)[None, :], u[:, None], window)  # the current token is the last tap
        taps = tl.load(ot_ptr + c[:, None] * K + k[None, :], mask=cmask[:, None] & (k < K)[None, :], other=0.0)
        y = tl.sum(window * taps, axis=1)
        shifted = tl.load(row + k[None, :] + 1, mask=cmask[:, None] & (k < K - 2)[None, :], other=0.0)
        shifted = tl.where((k == K - 2)[None, :], u[:, None].to(dtype), shifted)
    z = _round(x1 * _round(y, dtype), dtype)  # exactly representable: the store's cast does not round
    tl.debug_barrier()
    j = 3 * c
    tl.store(pw_row + 2 * j, x1_w1, mask=cmask)
    tl.store(pw_row + 2 * j + 1, x1_cur, mask=cmask)
    tl.store(pw_row + 2 * (j + 1), x2_w1, mask=cmask)
    tl.store(pw_row + 2 * (j + 1) + 1, x2_cur, mask=cmask)
    tl.store(pw_row + 2 * (j + 2), v_w1, mask=cmask)
    tl.store(pw_row + 2 * (j + 2) + 1, v_cur, mask=cmask)
    if MODAL:
        tl.store(s_at, s_new, mask=cmask[:, None])
    else:
        tl.store(row + k[None, :], shifted, mask=in_window)
    tl.store(z_ptr + b * stride_zb + c, z.to(dtype), mask=cmask)


def hyena_decode_step(features_1BC3: torch.Tensor, proj_window: torch.Tensor, proj_taps: torch.Tensor, *,
                      window: torch.Tensor | None = None, taps: torch.Tensor | None = None,
                      modal_state: torch.Tensor | None = None, poles: torch.Tensor | None = None,
                      residue_poles: torch.Tensor | None = None, direct: torch.Tensor | None = None) -> torch.Tensor:
    """``z`` (1, B, C) of one decode token from the projection output ``features`` (1, B, 3C); updates the windows
    ``proj_window`` (B, 3C, 2) and ``window`` (B, C, K-1) or ``modal_state`` (B, C, 16, fp32) in place.

    FIR operators pass ``window`` and fp32 ``taps`` (C, K); the modal operator passes ``modal_state``, ``poles`` and
    ``residue_poles`` (C, 16) and ``direct`` (C, 1), all fp32 (the constants of ``HyenaOperator.step_constants``).
    """
    _, B, C3 = features_1BC3.shape
    C = C3 // 3
    f = features_1BC3[0]
    for name, t in (("features", f), ("proj_window", proj_window)):
        if t.stride(-1) != 1 or (t.dim() == 3 and t.stride(1) != t.shape[2]):
            raise ValueError(f"{name} must be contiguous within a sequence")
    z = torch.empty(1, B, C, dtype=f.dtype, device=f.device)
    modal = modal_state is not None
    K = 2 if modal else taps.shape[-1]
    dummy = proj_taps  # unused pointer arguments of the other operator kind
    block = 32 if K > 16 else 64
    grid = (B, triton.cdiv(C, block))
    _hyena_decode_kernel[grid](
        f, proj_window, proj_taps, window if not modal else dummy, taps if not modal else dummy,
        modal_state if modal else dummy, poles if modal else dummy, residue_poles if modal else dummy,
        direct if modal else dummy, z, C,
        f.stride(0), proj_window.stride(0), window.stride(0) if not modal else 0,
        modal_state.stride(0) if modal else 0, z.stride(1),
        MODAL=modal, K=K, KP=triton.next_power_of_2(K), ORDER=poles.shape[-1] if modal else 16, BLOCK_C=block,
        num_warps=4,
    )
    return z
