"""The hcl modal filter ``h[g, t] = sum_o R[g, o] exp(log_pole[g, o] t)`` in one pass, forward and backward.

The plain twin (``operators.modal_filter``) makes four full-size passes per mode - 64 kernels writing and re-reading a
(G, L) fp32 tensor - which is ~18 % of the ``evo2_1b_base`` scoring forward at 8,192 tokens on an H200. Here each
program computes a (BLOCK_G, BLOCK_L) tile of ``h`` in registers and writes it once. The backward reduces over ``t``
in the same tiles: ``dR[g, o] = sum_t dh[g, t] e[g, o, t]`` and
``dlog_pole[g, o] = R[g, o] sum_t dh[g, t] t e[g, o, t]`` with ``e = exp(log_pole t)``; per-tile partial sums are
added in PyTorch. ``log_pole`` comes from ``p`` and ``gamma`` through ``operators.modal_log_poles`` under autograd, so
their gradients follow by the chain rule.

:func:`modal_prompt_state` is the same sum read the other way for generation: the modal state a prompt leaves behind,
``s[c, o] = sum_t lambda^(T-1-t) u[c, t]``, in one pass over ``u`` (plain twin ``inference_state.decayed_sum``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from evo2_recipe.models.hyena import operators as ops

BLOCK_G, BLOCK_L, STEPS = 16, 256, 8  # STEPS: backward tiles of t per program


@triton.jit
def _modal_filter_fwd(logp_ptr, r_ptr, h_ptr, G, L, O: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_L: tl.constexpr):
    g = tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)
    t = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    gmask = g < G
    tf = t.to(tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_L), dtype=tl.float32)
    for o in tl.static_range(O):  # the plain twin's order: mode 0 first
        lp = tl.load(logp_ptr + g * O + o, mask=gmask, other=0.0)
        r = tl.load(r_ptr + g * O + o, mask=gmask, other=0.0)
        acc += r[:, None] * tl.exp(lp[:, None] * tf[None, :])
    offs = g.to(tl.int64)[:, None] * L + t[None, :]  # G * L passes 2^31 at 1M tokens
    tl.store(h_ptr + offs, acc, mask=gmask[:, None] & (t < L)[None, :])


@triton.jit
def _modal_filter_bwd(logp_ptr, dh_ptr, part_ptr, G, L, O: tl.constexpr, BLOCK_G: tl.constexpr,
                      BLOCK_L: tl.constexpr, STEPS: tl.constexpr):
    """Partial sums over this program's ``STEPS`` tiles of ``t`` of ``dh e`` and ``dh t e`` -> part[prog, 0|1, g, o]
    (several tiles per program keep the partial-sum buffer small at 1M tokens)."""
    g = tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)
    prog = tl.program_id(1)
    gmask = g < G
    base = part_ptr + prog.to(tl.int64) * 2 * G * O
    for o in tl.static_range(O):
        lp = tl.load(logp_ptr + g * O + o, mask=gmask, other=0.0)
        s0 = tl.zeros((BLOCK_G,), dtype=tl.float32)
        s1 = tl.zeros((BLOCK_G,), dtype=tl.float32)
        for step in range(STEPS):
            t = (prog * STEPS + step) * BLOCK_L + tl.arange(0, BLOCK_L)
            tf = t.to(tl.float32)
            m = gmask[:, None] & (t < L)[None, :]
            dh = tl.load(dh_ptr + g.to(tl.int64)[:, None] * L + t[None, :], mask=m, other=0.0)
            w = dh * tl.exp(lp[:, None] * tf[None, :])
            s0 += tl.sum(w, axis=1)
            s1 += tl.sum(w * tf[None, :], axis=1)
        tl.store(base + g * O + o, s0, mask=gmask)
        tl.store(base + G * O + g * O + o, s1, mask=gmask)


class _ModalFilter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, log_poles, residues, L: int):
        logp, r = log_poles.float().contiguous(), residues.float().contiguous()
        ctx.save_for_backward(logp, r)
        ctx.L = L
        G, O = logp.shape
        h = torch.empty((G, L), dtype=torch.float32, device=logp.device)
        grid = (triton.cdiv(G, BLOCK_G), triton.cdiv(L, BLOCK_L))
        _modal_filter_fwd[grid](logp, r, h, G, L, O=O, BLOCK_G=BLOCK_G, BLOCK_L=BLOCK_L)
        return h

    @staticmethod
    def backward(ctx, dh):
        logp, r = ctx.saved_tensors
        G, O = logp.shape
        grid = (triton.cdiv(G, BLOCK_G), triton.cdiv(ctx.L, BLOCK_L * STEPS))
        part = torch.empty((grid[1], 2, G, O), dtype=torch.float32, device=logp.device)
        _modal_filter_bwd[grid](logp, dh.float().contiguous(), part, G, ctx.L, O=O, BLOCK_G=BLOCK_G,
                                BLOCK_L=BLOCK_L, STEPS=STEPS)
        sums = part.sum(0)
        return sums[1] * r, sums[0], None


def modal_filter(p_GO: torch.Tensor, gamma_GO: torch.Tensor, R_GO: torch.Tensor, L: int) -> torch.Tensor:
    """Fused :func:`evo2_recipe.models.hyena.operators.modal_filter`: (G, L) fp32."""
    return _ModalFilter.apply(ops.modal_log_poles(p_GO, gamma_GO), R_GO, L)


@triton.jit
def _modal_prompt_state(u_ptr, logp_ptr, part_ptr, B, C, T, su_b, su_c, su_t, CPG, O: tl.constexpr,
                        BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr, TILES: tl.constexpr):
    """Partial s[b, c, o] = sum_t exp(log_pole[c // CPG, o] (T-1-t)) u[b, c, t] over this program's ``TILES`` tiles
    of ``t``, counted from the end of the sequence: tile k covers t = T - (k+1) BLOCK_T + j with lag
    k BLOCK_T + (BLOCK_T-1-j), so its weight is exp(lp k BLOCK_T) * w[j] with one shared table
    w = exp(lp (BLOCK_T-1-j)) - both factors <= 1 (they underflow to 0 together, never inf * 0), and only
    BLOCK_C * O exps per tile."""
    b = tl.program_id(1)
    split = tl.program_id(2)
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    o = tl.arange(0, O)
    j = tl.arange(0, BLOCK_T)
    cmask = c < C
    lp = tl.load(logp_ptr + (c // CPG)[:, None] * O + o[None, :], mask=cmask[:, None], other=0.0)  # (BC, O)
    w = tl.exp(lp[:, :, None] * (BLOCK_T - 1 - j).to(tl.float32)[None, None, :])  # (BC, O, BT)
    acc = tl.zeros((BLOCK_C, O), dtype=tl.float32)
    base = u_ptr + b.to(tl.int64) * su_b + c.to(tl.int64)[:, None] * su_c
    for i in range(TILES):
        k = split * TILES + i
        t = T - (k + 1) * BLOCK_T + j
        u = tl.load(base + t[None, :] * su_t, mask=cmask[:, None] & (t >= 0)[None, :], other=0.0).to(tl.float32)
        scale = tl.exp(lp * (k * BLOCK_T).to(tl.float32))
        acc += scale * tl.sum(w * u[:, None, :], axis=2)
    offs = ((split * B + b) * C + c).to(tl.int64)[:, None] * O + o[None, :]
    tl.store(part_ptr + offs, acc, mask=cmask[:, None])


def modal_prompt_state(u_BCT: torch.Tensor, log_poles_GO: torch.Tensor, block_c: int = 16, block_t: int = 16,
                       tiles: int = 32) -> torch.Tensor:
    """Fused ``inference_state.decayed_sum(u.float(), expand_groups(log_poles, C))``: the hcl modal state after a
    prompt, (B, C, O) fp32, in one pass over ``u`` (any dtype and strides) instead of ~15 small ops per layer.
    Default tiles: the fastest of nine tried on an H200 at C = 1,920, T = 8,192 (204 us; the others 226-309 us)."""
    B, C, T = u_BCT.shape
    G, O = log_poles_GO.shape
    if C % G:
        raise ValueError(f"{C} channels are not divisible into {G} filter groups")
    padded = triton.next_power_of_2(O)  # tl.arange needs a power of two; the padded modes are cut off below
    logp = torch.nn.functional.pad(log_poles_GO.float(), (0, padded - O)).contiguous()
    splits = triton.cdiv(triton.cdiv(T, block_t), tiles)  # programs along t: the sequence is read in parallel
    part = torch.empty((splits, B, C, padded), dtype=torch.float32, device=u_BCT.device)
    _modal_prompt_state[(triton.cdiv(C, block_c), B, splits)](u_BCT, logp, part, B, C, T, *u_BCT.stride(), C // G,
                                                              O=padded, BLOCK_C=block_c, BLOCK_T=block_t,
                                                              TILES=tiles)
    return (part[0] if splits == 1 else part.sum(0))[..., :O]
