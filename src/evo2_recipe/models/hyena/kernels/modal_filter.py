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
    return modal_filter_from_log_poles(ops.modal_log_poles(p_GO, gamma_GO), R_GO, L)


def modal_filter_from_log_poles(log_poles_GO: torch.Tensor, R_GO: torch.Tensor, L: int) -> torch.Tensor:
    """``h[g, t] = sum_o R[g, o] exp(log_pole[g, o] t)`` for ``t < L``: (G, L) fp32, one kernel."""
    return _ModalFilter.apply(log_poles_GO, R_GO, L)


@triton.jit
def _modal_prompt_state(u_ptr, logp_ptr, out_ptr, C, T, su_b, su_c, su_t, CPG, O: tl.constexpr,
                        CHUNK: tl.constexpr, CHUNKS: tl.constexpr):
    """s[b, c, o] = sum_t exp(log_pole[c // CPG, o] (T-1-t)) u[b, c, t] for one (b, c), as small GEMMs.

    The sequence is cut into chunks of ``CHUNK`` positions counted from its end: chunk q covers
    t = T - (q+1) CHUNK + j, whose lag is q CHUNK + (CHUNK-1-j). A block of ``CHUNKS`` chunks is a (CHUNKS, CHUNK)
    tile ``U``; ``U @ W`` with ``W[j, o] = exp(lp_o (CHUNK-1-j))`` gives every chunk's in-chunk sums on the tensor
    cores (tf32x3: fp32 accuracy), and ``exp(lp_o q CHUNK)`` decays each to the end. Both factors are <= 1 (they
    underflow to 0 together, never inf * 0); ~1 exp per 4 elements of ``u``.
    """
    c = tl.program_id(0)
    b = tl.program_id(1)
    o = tl.arange(0, O)
    j = tl.arange(0, CHUNK)
    q = tl.arange(0, CHUNKS)
    lp = tl.load(logp_ptr + (c // CPG) * O + o)  # (O,)
    w = tl.exp((CHUNK - 1 - j).to(tl.float32)[:, None] * lp[None, :])  # (CHUNK, O)
    acc = tl.zeros((O,), dtype=tl.float32)
    base = u_ptr + b.to(tl.int64) * su_b + c.to(tl.int64) * su_c
    for i in range(0, tl.cdiv(T, CHUNKS * CHUNK)):
        chunk = i * CHUNKS + q  # (CHUNKS,) chunk index from the end
        t = T - (chunk + 1)[:, None] * CHUNK + j[None, :]  # (CHUNKS, CHUNK)
        u = tl.load(base + t.to(tl.int64) * su_t, mask=t >= 0, other=0.0).to(tl.float32)
        in_chunk = tl.dot(u, w, input_precision="tf32x3")  # (CHUNKS, O)
        decay = tl.exp((chunk * CHUNK).to(tl.float32)[:, None] * lp[None, :])  # (CHUNKS, O)
        acc += tl.sum(in_chunk * decay, axis=0)
    tl.store(out_ptr + (b.to(tl.int64) * C + c) * O + o, acc)


def modal_prompt_state(u_BCT: torch.Tensor, log_poles_GO: torch.Tensor, chunk: int = 64,
                       chunks: int = 64) -> torch.Tensor:
    """Fused ``inference_state.decayed_sum(u.float(), expand_groups(log_poles, C))``: the hcl modal state after a
    prompt, (B, C, O) fp32, in one pass over ``u`` (any dtype and strides) instead of ~15 small ops per layer."""
    B, C, T = u_BCT.shape
    G, O = log_poles_GO.shape
    if C % G:
        raise ValueError(f"{C} channels are not divisible into {G} filter groups")
    padded = max(16, triton.next_power_of_2(O))  # tl.dot needs >= 16 columns; the padded modes are cut off below
    logp = torch.nn.functional.pad(log_poles_GO.float(), (0, padded - O)).contiguous()
    out = torch.empty((B, C, padded), dtype=torch.float32, device=u_BCT.device)
    _modal_prompt_state[(C, B)](u_BCT, logp, out, C, T, *u_BCT.stride(), C // G, O=padded, CHUNK=chunk,
                                CHUNKS=chunks)
    return out[..., :O]
