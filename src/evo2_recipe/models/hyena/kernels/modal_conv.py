"""hcl without the FFT: the modal long convolution as a chunked scan, ``O(L)`` work and no full-length buffers.

The hcl filter is a sum of ``O`` = 16 decaying exponentials, ``h[k] = sum_o R_o lambda_o^k``, so the convolution is
a linear recurrence per mode - the same structure as a state-space model, computed as one (Mamba-2 style chunked
form). The sequence is cut into chunks of ``BT`` positions; for chunk ``j`` with state ``s(j)`` (16 values per
channel: ``s_o(j) = sum_{p < j BT} lambda_o^(j BT - 1 - p) u[p]``):

    y_chunk = T @ u_chunk + A @ s(j) + D u_chunk        T[i, s] = h[i - s] (i >= s),  A[i, o] = R_o lambda_o^(i+1)
    s(j+1)  = lambda^BT s(j) + Bm @ u_chunk            Bm[o, s] = lambda_o^(BT-1-s)

One program owns one (batch, channel) row and walks it in tiles of ``NC`` chunks: the products of a tile are
matrix products over its chunks (columns), and the chunk-to-chunk recurrence is an associative scan along them,
carried from tile to tile. Each ``u`` value is read twice and each ``y`` written once; the FFT path it replaces makes
~8 passes over full-length fp32/complex buffers (2L-point transforms, the filter materialised to L taps) and needs
them all in memory at once (chunked over channels at long context). fp32 throughout (``DOT_PRECISION``).
Inference only (no autograd).

Plain twin: ``operators.fft_causal_conv(u, operators.modal_filter(...), D)`` rounded to ``u``'s dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from evo2_recipe.models.hyena.kernels.modal_filter import modal_filter_from_log_poles

CHUNK = 64  # positions per chunk (BT)
CHUNKS_PER_TILE = 32  # chunks per matrix product (NC)
DOT_PRECISION = "tf32x3"  # ~fp32 accuracy on tensor cores: 7x faster than "ieee" (CUDA cores) on an H200


@triton.jit
def _linear_recurrence(a1, b1, a2, b2):
    """Compose ``x -> a1 x + b1`` then ``x -> a2 x + b2``."""
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _last_column(x, j, NC: tl.constexpr):
    return tl.sum(tl.where(j[None, :] == NC - 1, x, 0.0), axis=1)


@triton.jit
def _modal_conv_fwd(u_ptr, h_ptr, lp_ptr, r_ptr, d_ptr, y_ptr, L, C, P, O,
                    BLOCK_O: tl.constexpr, BT: tl.constexpr, NC: tl.constexpr, PRECISION: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # b * C + c
    c = tl.program_id(0) % C
    g = c // P
    i = tl.arange(0, BT)  # position in a chunk (rows of T, A)
    j = tl.arange(0, NC)  # chunk in a tile
    o = tl.arange(0, BLOCK_O)
    omask = o < O
    lp = tl.load(lp_ptr + g * O + o, mask=omask, other=-1.0)  # log poles, < 0; padded modes get R = 0
    r = tl.load(r_ptr + g * O + o, mask=omask, other=0.0)
    d = tl.load(d_ptr + c).to(tl.float32)
    k = i[:, None] - i[None, :]
    T = tl.load(h_ptr + g * BT + k, mask=k >= 0, other=0.0)  # (BT, BT): h's first BT taps, lower triangle
    A = r[None, :] * tl.exp(lp[None, :] * (i[:, None] + 1).to(tl.float32))  # (BT, BLOCK_O)
    Bm = tl.exp(lp[:, None] * (BT - 1 - i[None, :]).to(tl.float32))  # (BLOCK_O, BT)
    step = tl.exp(lp * BT)  # decay over one chunk
    steps = tl.broadcast_to(step[:, None], (BLOCK_O, NC))
    since_tile = tl.exp(lp[:, None] * (BT * j[None, :]).to(tl.float32))  # decay from the tile start to chunk j
    carry = tl.zeros((BLOCK_O,), dtype=tl.float32)  # state at the start of the tile
    for start in range(0, L, BT * NC):
        pos = start + j[None, :] * BT + i[:, None]  # (BT, NC): column j is chunk j of the tile
        U = tl.load(u_ptr + row * L + pos, mask=pos < L, other=0.0).to(tl.float32)
        prev = pos - BT  # column j: chunk j - 1 (none for the first: the carry holds everything before the tile)
        U_prev = tl.load(u_ptr + row * L + prev, mask=(prev >= start) & (prev < L), other=0.0).to(tl.float32)
        E = tl.dot(Bm, U_prev, input_precision=PRECISION)  # (BLOCK_O, NC): what chunk j - 1 adds to the state
        _, S = tl.associative_scan((steps, E), axis=1, combine_fn=_linear_recurrence)
        S += since_tile * carry[:, None]  # (BLOCK_O, NC): state at the start of each chunk
        Y = tl.dot(T, U, input_precision=PRECISION) + tl.dot(A, S, input_precision=PRECISION) + d * U
        tl.store(y_ptr + row * L + pos, Y.to(y_ptr.dtype.element_ty), mask=pos < L)
        e_last = tl.sum(Bm * _last_column(U, j, NC)[None, :], axis=1)  # what the tile's last chunk adds
        carry = step * _last_column(S, j, NC) + e_last


def modal_conv(u_BCL: torch.Tensor, log_poles_GO: torch.Tensor, R_GO: torch.Tensor,
               skip_C: torch.Tensor) -> torch.Tensor:
    """``y = h * u + D u`` (B, C, L) in ``u``'s dtype for the modal filter ``h[g, k] = sum_o R exp(log_pole k)``,
    channel ``c`` in group ``c // (C / G)``; without autograd."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (u_BCL, log_poles_GO, R_GO, skip_C)):
        raise RuntimeError("modal_conv is inference-only; the training path takes the FFT convolution")
    u = u_BCL.contiguous()
    B, C, L = u.shape
    G, O = log_poles_GO.shape
    if C % G:
        raise ValueError(f"{C} channels are not divisible into {G} filter groups")
    lp, R = log_poles_GO.float().contiguous(), R_GO.float().contiguous()
    taps = modal_filter_from_log_poles(lp, R, CHUNK)  # (G, BT): one kernel instead of four small ops per layer
    y = torch.empty_like(u)
    _modal_conv_fwd[(B * C,)](u, taps, lp, R, skip_C.contiguous(), y, L, C, C // G, O,
                              BLOCK_O=max(16, triton.next_power_of_2(O)), BT=CHUNK, NC=CHUNKS_PER_TILE,
                              PRECISION=DOT_PRECISION)
    return y
