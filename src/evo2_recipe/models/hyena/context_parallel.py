"""Context-parallel communication for Hyena (spec section 2.11), kept out of the mixer math.

Data arrive zigzag-split: with ``N = 2*CP`` equal chunks, rank ``r`` holds chunks ``r`` and ``N-1-r`` (in that
order) concatenated along the sequence, which balances causal attention. Two mechanisms:

* :func:`halo_left_context` - the causal FIRs (K=3 projection conv, K=7 hcs, K=128 hcm when a chunk holds at least
  127 samples) need the last ``K-1`` samples before each local chunk. Every rank all-gathers the ``K-1``-sample
  tails of its two chunks (tiny) and picks its left neighbours: chunk ``r`` follows chunk ``r-1`` (rank ``r-1``'s
  first chunk; zeros for ``r = 0``) and chunk ``N-1-r`` follows chunk ``N-2-r`` (rank ``r+1``'s second chunk, or the
  rank's own first chunk when ``r = CP-1``).
* :func:`seq_to_channel_split` / :func:`channel_to_seq_split` - hcl's filter spans the whole sequence, so an
  all-to-all turns ``(B, C, L/CP)`` (sequence split, zigzag) into ``(B, C/CP, L)`` (channel split, natural order)
  and back. Every collective has its adjoint as backward, so gradients are exact.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def active_group(group):
    """``group`` when it really splits the sequence (size > 1), else None: the one test every CP branch makes."""
    return group if group is not None and group.size() > 1 else None


def zigzag_chunk_ids(rank: int, cp_size: int) -> tuple[int, int]:
    """Global chunk indices (out of ``2*cp_size``) held by ``rank``."""
    return rank, 2 * cp_size - 1 - rank


class _AllGather(torch.autograd.Function):
    """all_gather along a new leading dim; backward reduce-scatters (sums) the gradients."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        world = dist.get_world_size(group)
        out = torch.empty((world * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
        dist.all_gather_into_tensor(out, x.contiguous(), group=group)
        return out.view(world, *x.shape)

    @staticmethod
    def backward(ctx, grad):
        out = torch.empty(grad.shape[1:], dtype=grad.dtype, device=grad.device)
        dist.reduce_scatter_tensor(out, grad.reshape(-1, *grad.shape[2:]).contiguous(), group=ctx.group)
        return out, None


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` on dim 0 (split into world equal parts); its own adjoint."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.contiguous()  # empty_like must not inherit a permuted layout: the collective writes raw memory
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        out = torch.empty_like(grad)
        dist.all_to_all_single(out, grad, group=ctx.group)
        return out, None


def all_gather_cp(x: torch.Tensor, group) -> torch.Tensor:
    """Differentiable all-gather of ``x`` over ``group``: returns ``(world, *x.shape)``."""
    return _AllGather.apply(x, group)


def halo_left_context(x_BCL: torch.Tensor, halo: int, group) -> tuple[torch.Tensor, torch.Tensor]:
    """Left context ``(B, C, halo)`` for each of the two local zigzag chunks of ``x``."""
    rank, cp = dist.get_rank(group), dist.get_world_size(group)
    chunk_a, chunk_b = x_BCL.chunk(2, dim=-1)
    if chunk_a.shape[-1] < halo:
        raise ValueError(f"context-parallel chunk length {chunk_a.shape[-1]} is shorter than the conv halo {halo}")
    tails = torch.stack([chunk_a[..., -halo:], chunk_b[..., -halo:]])  # (2, B, C, halo)
    all_tails = all_gather_cp(tails, group)  # (CP, 2, B, C, halo)
    left_a = all_tails[rank - 1, 0] if rank > 0 else torch.zeros_like(tails[0])
    left_b = all_tails[rank + 1, 1] if rank < cp - 1 else all_tails[rank, 0]
    return left_a, left_b


def seq_to_channel_split(x_BCL: torch.Tensor, group) -> torch.Tensor:
    """``(B, C, L/CP)`` zigzag sequence shard -> ``(B, C/CP, L)`` natural-order full sequence of a channel slice."""
    cp = dist.get_world_size(group)
    B, C, Ll = x_BCL.shape
    if C % cp:
        raise ValueError(f"{C} channels per tensor-parallel rank are not divisible by context parallel size {cp}")
    # (CP target ranks, B, C/CP, Ll): slice j of the channels goes to rank j.
    send = x_BCL.reshape(B, cp, C // cp, Ll).permute(1, 0, 2, 3)
    recv = _AllToAll.apply(send, group)  # recv[i] = rank i's two chunks for my channel slice
    return gathered_shards_to_natural(recv.reshape(cp, B, C // cp, Ll), dim=-1)


def gathered_shards_to_natural(shards: torch.Tensor, dim: int) -> torch.Tensor:
    """``(CP, *shard)``: every rank's zigzag shard -> the whole tensor in natural order along the shard's ``dim``."""
    cp = shards.shape[0]
    order = [None] * (2 * cp)
    for i in range(cp):
        a, b = zigzag_chunk_ids(i, cp)
        order[a], order[b] = shards[i].chunk(2, dim=dim)
    return torch.cat(order, dim=dim)


def channel_to_seq_split(y_BcL: torch.Tensor, group) -> torch.Tensor:
    """Inverse of :func:`seq_to_channel_split`: ``(B, C/CP, L)`` -> ``(B, C, L/CP)`` zigzag shard."""
    cp, rank = dist.get_world_size(group), dist.get_rank(group)
    B, c, L = y_BcL.shape
    pieces = y_BcL.chunk(2 * cp, dim=-1)
    # For each target rank i: its two chunks of my channel slice.
    send = torch.stack([torch.cat([pieces[a], pieces[b]], dim=-1)
                        for a, b in (zigzag_chunk_ids(i, cp) for i in range(cp))])  # (CP, B, c, L/CP)
    recv = _AllToAll.apply(send, group)  # recv[j] = channel slice j of my two chunks
    del rank
    return recv.permute(1, 0, 2, 3).reshape(B, cp * c, L // cp)


def zigzag_split(x: torch.Tensor, dim: int, rank: int, cp_size: int) -> torch.Tensor:
    """This rank's zigzag shard of a full-length tensor (for tests and data loading)."""
    chunks = x.chunk(2 * cp_size, dim=dim)
    a, b = zigzag_chunk_ids(rank, cp_size)
    return torch.cat([chunks[a], chunks[b]], dim=dim)
