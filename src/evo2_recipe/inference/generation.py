"""Autoregressive generation with cached decoding (Hyena recurrent state + attention KV cache).

Prompts of different lengths share one batch: the common prefix (the shortest prompt) is prefilled in one forward,
then every step feeds one position per sequence - the prompt's own next token while a sequence is still inside its
prompt, the sampled token afterwards - exactly what generating each prompt alone would do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core import tensor_parallel

from evo2_recipe.models.hyena.inference_state import HyenaInferenceContext


@dataclass
class SamplingParams:
    max_new_tokens: int = 100
    temperature: float = 1.0
    top_k: int = 0  # 0: off, 1: greedy
    top_p: float = 0.0  # 0: off
    seed: int | None = None
    stop_at_eod: bool = True

    def validate(self, vocab_size: int) -> None:
        if self.top_k < 0 or self.top_k > vocab_size:
            raise ValueError(f"top_k must be in [0, {vocab_size}], got {self.top_k}")
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"top_p must be in [0, 1], got {self.top_p}")
        if self.top_k > 1 and self.top_p > 0:
            raise ValueError("use either top_k or top_p, not both")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0 (0 means greedy)")
        if self.max_new_tokens < 0:
            raise ValueError("max_new_tokens must be >= 0")


def sample_next(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """Next token ids ``(B,)`` from last-position logits ``(B, V)``."""
    if p.top_k == 1 or p.temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / p.temperature
    if p.top_k > 1:
        kth = logits.topk(p.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p > 0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= p.top_p  # keep the smallest prefix reaching top_p (>= 1 token)
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


@torch.no_grad()
def generate(model, prompts: list[list[int]], params: SamplingParams, *, eod_id: int = 0, vocab_size: int,
             max_seq_length: int | None = None) -> list[dict]:
    """Generate for each prompt; returns ``[{"tokens": [...], "log_probs": [...], "finish_reason": ...}]``."""
    params.validate(vocab_size)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt must have at least one token")
    B = len(prompts)
    lengths = [len(p) for p in prompts]
    total = max(lengths) + params.max_new_tokens
    if max_seq_length is not None and total > max_seq_length:
        raise ValueError(f"longest prompt ({max(lengths)}) + max_new_tokens ({params.max_new_tokens}) = {total} "
                         f"exceeds max_seq_length {max_seq_length}")
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(params.seed if params.seed is not None else 1234)
    ctx = HyenaInferenceContext(max_batch_size=B, max_sequence_length=total)
    seqs = [list(p) for p in prompts]
    out_lp: list[list[float]] = [[] for _ in range(B)]
    done = [params.max_new_tokens == 0] * B
    tokens = torch.tensor([s[:min(lengths)] for s in seqs], device=device)  # common prefix: one prefill
    pos = 0
    while not all(done):
        L = tokens.shape[1]
        positions = torch.arange(pos, pos + L, device=device).expand(B, -1)
        logits = model(tokens, positions, inference_context=ctx)
        logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits)[:, -1].float()[:, :vocab_size]
        ctx.advance(L)
        pos += L  # the logits predict position `pos`
        sampled = sample_next(logits, params, generator)
        log_probs = torch.log_softmax(logits, -1)
        nxt = []
        for b in range(B):
            if pos < lengths[b]:  # still inside its prompt: feed the prompt's own token
                nxt.append(seqs[b][pos])
            elif done[b]:  # finished early: feed a filler; its outputs are never used
                nxt.append(eod_id)
            else:
                tok = int(sampled[b])
                seqs[b].append(tok)
                out_lp[b].append(float(log_probs[b, tok]))
                done[b] = (params.stop_at_eod and tok == eod_id) or len(seqs[b]) - lengths[b] >= params.max_new_tokens
                nxt.append(tok)
        tokens = torch.tensor(nxt, device=device).unsqueeze(1)
    results = []
    for b in range(B):
        gen = seqs[b][lengths[b]:]
        reason = "stop" if gen and gen[-1] == eod_id and params.stop_at_eod else "length"
        results.append({"tokens": gen, "log_probs": out_lp[b], "finish_reason": reason})
    return results
