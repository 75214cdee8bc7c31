"""Batched scoring under TP/CP: logits, log-probabilities and layer embeddings for token sequences.

Batches are right-padded to a common length; with context parallelism the length is also padded up to a multiple of
``2*CP`` (the reference errors instead), split zigzag across CP ranks, and gathered back in natural order. The model
is causal, so right padding never changes the values at real positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel

from evo2_recipe.models.hyena.config import HYENA
from evo2_recipe.models.hyena.context_parallel import gathered_shards_to_natural, zigzag_split


def cp_min_length(cp: int) -> int:
    """Shortest padded length that context parallelism handles: each of the ``2*cp`` zigzag chunks must hold the
    widest causal-conv halo (the 7-tap hcs filter needs 6 samples of left context from its neighbour)."""
    if cp <= 1:
        return 1
    hc = HYENA
    return 2 * cp * (max(hc.hyena_short_conv_len, hc.short_conv_L) - 1)


def pad_batch(seqs: list[torch.Tensor], pad_id: int, min_length: int | None = None, multiple: int = 1):
    """Right-pad 1-D token tensors into ``(B, L)`` tokens and a 0/1 mask of real positions."""
    L = max(max(len(s) for s in seqs), min_length or 0)
    L = -(-L // multiple) * multiple
    tokens = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, :len(s)] = s
        mask[i, :len(s)] = 1
    return tokens, mask


def _unzigzag(local: torch.Tensor, dim: int) -> torch.Tensor:
    """All-gather zigzag shards along ``dim`` over CP and restore natural order."""
    cp = parallel_state.get_context_parallel_world_size()
    pieces = [torch.empty_like(local) for _ in range(cp)]
    torch.distributed.all_gather(pieces, local.contiguous(), group=parallel_state.get_context_parallel_group())
    return gathered_shards_to_natural(torch.stack(pieces), dim)


# Per-token log-probabilities go through the positions in chunks of about this many (batch x position x vocabulary)
# fp32 elements (128 MiB), so full-length fp32 logits and log-softmax never exist: at 1,048,576 tokens they would be
# 2 GiB each on top of the model-dtype logits (1 GiB), next to a forward that already peaks at ~127 GiB (evo2_7b).
LOG_PROB_CHUNK_ELEMENTS = 1 << 25


@torch.no_grad()
def forward_full(model, tokens: torch.Tensor, *, hidden: bool = False, hidden_layer: int | None = None,
                 fp32: bool = True, graphs=None) -> torch.Tensor:
    """Run ``model`` on ``(B, L)`` tokens under the current TP/CP layout; return full-sequence outputs on every rank.

    Logits come back ``(B, L, V)`` (gathered over the TP vocabulary shards); with ``hidden=True`` (a model built
    without a head) or ``hidden_layer=k`` (the output of layer ``k`` of a full model) the layer output comes back
    ``(B, L, H)``, gathered over sequence-parallel and CP shards. ``graphs`` (a ``graphed.GraphedForward`` of
    ``model``, single-rank only) replays shapes seen before from CUDA graphs.
    """
    hidden = hidden or hidden_layer is not None
    cp = parallel_state.get_context_parallel_world_size()
    B, L = tokens.shape
    device = next(model.parameters()).device
    tokens = tokens.to(device)
    positions = torch.arange(L, device=device).expand(B, -1)
    if cp > 1:
        rank = parallel_state.get_context_parallel_rank()
        tokens, positions = zigzag_split(tokens, 1, rank, cp), zigzag_split(positions, 1, rank, cp)
    options = {} if hidden_layer is None else {"hidden_layer": hidden_layer}
    out = (graphs or model)(tokens, positions, **options)
    if fp32:
        out = out.float()
    if hidden:  # (L_local[/TP under SP], B, H)
        if getattr(_config(model), "sequence_parallel", False):
            out = tensor_parallel.gather_from_sequence_parallel_region(out, tensor_parallel_output_grad=False)
        out = out.transpose(0, 1)  # (B, L_local, H)
    else:
        out = tensor_parallel.gather_from_tensor_model_parallel_region(out)  # (B, L_local, V)
    if cp > 1:
        out = _unzigzag(out, 1)
    return out


def _config(model):
    from megatron.core.utils import get_model_config

    return get_model_config(model)


def token_log_probs(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor,
                    chunk_elements: int = LOG_PROB_CHUNK_ELEMENTS) -> tuple[torch.Tensor, ...]:
    """Log-probability of each next token ``(B, L-1)`` fp32 and the mask of scored positions ``(B, L-1)``, from
    logits ``(B, L, V)`` of any dtype: the fp32 log-softmax is taken a chunk of positions at a time."""
    B, L, V = logits.shape
    target = tokens[:, 1:].to(logits.device)
    per_token = torch.empty(B, L - 1, dtype=torch.float32, device=logits.device)
    step = max(1, chunk_elements // max(B * V, 1))
    for a in range(0, L - 1, step):
        b = min(a + step, L - 1)
        lp = F.log_softmax(logits[:, a:b].float(), dim=-1)
        per_token[:, a:b] = lp.gather(-1, target[:, a:b].unsqueeze(-1)).squeeze(-1)
    scored = mask[:, 1:].to(logits.device).bool()
    return per_token * scored, scored


def reduce_log_probs(per_token: torch.Tensor, scored: torch.Tensor, reduce: str):
    if reduce == "per_token":
        return per_token
    total = per_token.sum(-1)
    if reduce == "sum":
        return total
    if reduce == "mean":
        return total / scored.sum(-1).clamp(min=1)
    raise ValueError(f"reduce must be 'sum', 'mean' or 'per_token', got {reduce!r}")
