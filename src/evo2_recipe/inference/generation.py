"""Autoregressive generation: per-slot cached decoding with sampling on the device and continuous batching.

Waiting prompts are prefilled into free slots of a :class:`HyenaInferenceContext` (one forward per run of
consecutive free slots whose prompts have one length), then all occupied slots advance one token per step together.
Sampling (greedy, temperature, top-k, top-p) and the log-probabilities happen on the device; the host looks at the
results only every ``sync_every`` steps, to retire finished sequences and hand their slots to waiting prompts. Each
sequence gets what it would get alone: slots never interact (a prompt prefilled with others goes through GEMMs of
more rows, which may round differently in the last bits; sampled tokens depend on the shared generator).
"""

from __future__ import annotations

import functools
import gc
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from megatron.core import parallel_state, tensor_parallel

from evo2_recipe.inference.graphed import capture
from evo2_recipe.models.hyena.inference_state import HyenaInferenceContext

logger = logging.getLogger(__name__)

PREFILL_BATCH_TOKENS = 65_536  # prompt tokens prefilled in one forward when several equal-length prompts wait


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

    @property
    def greedy(self) -> bool:
        return self.top_k == 1 or self.temperature == 0


def sample_next(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """Next token ids ``(B,)`` from last-position logits ``(B, V)``, on the logits' device (no host round trip)."""
    if p.greedy:
        return logits.argmax(-1)
    logits = logits.float() / p.temperature
    if p.top_k > 1:
        kth = logits.topk(p.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p > 0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= p.top_p  # keep the smallest prefix reaching top_p (>= 1 token)
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def _last_logits(model, tokens, ctx, vocab_size):
    logits = model(tokens, inference_context=ctx)
    logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits)
    return logits[:, -1].float()[:, :vocab_size]


def _cyclic_gc_paused(fn):
    """Run ``fn`` with Python's cyclic garbage collector paused (reference counting still frees every per-step
    object). Generation is bound by host time for small models; a collection landing inside a prefill or decode loop
    stalls the GPU for milliseconds (inference servers freeze the GC for the same reason)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            if was_enabled:
                gc.enable()
    return wrapper


@_cyclic_gc_paused
@torch.no_grad()
def generate(model, prompts: list[list[int]], params: SamplingParams, *, eod_id: int = 0, vocab_size: int,
             max_seq_length: int | None = None, max_batch_size: int | None = None, sync_every: int = 16,
             on_tokens: Callable[[int, list[int]], None] | None = None, cuda_graph: bool = True,
             prompt_segmentation_threshold: int | None = None) -> list[dict]:
    """Generate for each prompt; returns ``[{"tokens": [...], "log_probs": [...], "finish_reason": ...}]``.

    ``max_batch_size`` slots decode together (default: all prompts at once); a finished sequence's slot is given to
    the next waiting prompt; waiting prompts of one length are prefilled together. ``on_tokens(prompt_index,
    new_tokens)`` streams tokens as they are retired.
    ``cuda_graph`` replays the decode step as one CUDA graph on a GPU (11x faster than eager for evo2_1b_base at
    batch 1 on an H200, same tokens; see benchmarks/RESULTS.md); ignored on the CPU and under tensor parallelism
    (collectives stay eager), and a failed capture falls back to eager.
    ``prompt_segmentation_threshold`` prefills at most that many prompt tokens at once, the rest token by token.
    """
    if prompt_segmentation_threshold is not None and prompt_segmentation_threshold < 1:
        raise ValueError(f"prompt_segmentation_threshold must be >= 1, got {prompt_segmentation_threshold}")
    params.validate(vocab_size)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt must have at least one token")
    longest = max(len(p) for p in prompts) + params.max_new_tokens
    if max_seq_length is not None and longest > max_seq_length:
        raise ValueError(f"longest prompt ({longest - params.max_new_tokens}) + max_new_tokens "
                         f"({params.max_new_tokens}) = {longest} exceeds max_seq_length {max_seq_length}")
    results = [{"tokens": [], "log_probs": [], "finish_reason": "length"} for _ in prompts]
    if params.max_new_tokens == 0:
        return results
    device = next(model.parameters()).device
    slots = min(max_batch_size or len(prompts), len(prompts))
    generator = torch.Generator(device=device).manual_seed(params.seed if params.seed is not None else 1234)
    ctx = HyenaInferenceContext(max_batch_size=slots, max_sequence_length=longest,
                               materialize_only_last_token_logits=True)
    n = params.max_new_tokens
    out_tokens = torch.zeros(slots, n, dtype=torch.long, device=device)  # this sequence's new tokens so far
    out_lp = torch.zeros(slots, n, dtype=torch.float32, device=device)
    count = torch.zeros(slots, dtype=torch.long, device=device)  # tokens generated per slot
    done = torch.ones(slots, dtype=torch.bool, device=device)
    last = torch.zeros(slots, dtype=torch.long, device=device)  # token fed at the next step
    owner: list[int | None] = [None] * slots  # prompt index in each slot
    waiting = list(range(len(prompts)))
    rows = torch.arange(slots, device=device)

    def record(slot_rows, logits):
        """Sample from ``logits`` for ``slot_rows`` and write token + log-prob where those slots are not done."""
        tok = sample_next(logits, params, generator)
        lp = torch.log_softmax(logits, -1).gather(-1, tok[:, None])[:, 0]
        live = ~done[slot_rows]
        idx = count[slot_rows].clamp(max=n - 1)
        out_tokens[slot_rows, idx] = torch.where(live, tok, out_tokens[slot_rows, idx])
        out_lp[slot_rows, idx] = torch.where(live, lp, out_lp[slot_rows, idx])
        count[slot_rows] += live.long()
        finished = count[slot_rows] >= n
        if params.stop_at_eod:
            finished |= live & (tok == eod_id)
        done[slot_rows] |= finished
        last[slot_rows] = tok

    def admit(first: int, k: int) -> None:
        """Prefill the next ``k`` waiting prompts (all of one length) into slots ``first .. first+k-1`` at once."""
        taken = [waiting.pop(0) for _ in range(k)]
        owner[first:first + k] = taken
        ctx.reset_slots(first, first + k)
        count[first:first + k].zero_()  # in-place kernels: assigning Python scalars would synchronise with the host
        done[first:first + k].zero_()
        view = ctx.slots(first, first + k)
        ctx.limit_attention(ctx.max_sequence_length)  # the prompt's positions are past the decode loop's bound
        prompt = torch.from_numpy(np.asarray([prompts[i] for i in taken], dtype=np.int64)).to(device)  # not a list:
        # torch.tensor on 8k Python ints costs ~2 ms of host time, while the GPU waits
        head = prefill_length(prompt.shape[1])
        logits = _last_logits(model, prompt[:, :head], view, vocab_size)
        view.advance(head)
        for t in range(head, prompt.shape[1]):
            logits = _last_logits(model, prompt[:, t:t + 1], view, vocab_size)
            view.advance(1)
        record(rows[first:first + k], logits)

    def prefill_length(length: int) -> int:
        # Prompt segmentation (the reference's PST): prefill the first `pst` tokens in one forward, then feed the
        # rest one per step through the cache, bounding prefill activation memory for long prompts.
        return length if not prompt_segmentation_threshold else min(prompt_segmentation_threshold, length)

    def admit_free(free: list[int]) -> None:
        """Fill the free slots with waiting prompts. Consecutive free slots whose prompts have the same length are
        prefilled together (one forward instead of one per prompt: prefill of small models is bound by host time),
        up to PREFILL_BATCH_TOKENS prompt tokens per forward."""
        j = 0
        while j < len(free) and waiting:
            length, k = len(prompts[waiting[0]]), 1
            while (j + k < len(free) and k < len(waiting) and free[j + k] == free[j] + k
                   and len(prompts[waiting[k]]) == length
                   and (k + 1) * prefill_length(length) <= PREFILL_BATCH_TOKENS):
                k += 1
            admit(free[j], k)
            for slot in range(free[j], free[j] + k):
                age[slot], emitted[slot] = 0, 0
            j += k

    def sync() -> None:
        """The only host synchronisation: stream new tokens, retire finished slots, hand free slots to prompts."""
        finished, counts = done.tolist(), count.tolist()
        for slot, i in enumerate(owner):
            if i is None:
                continue
            if on_tokens is not None and counts[slot] > emitted[slot]:
                on_tokens(i, out_tokens[slot, emitted[slot]:counts[slot]].tolist())
                emitted[slot] = counts[slot]
            if finished[slot]:
                toks = out_tokens[slot, :counts[slot]].tolist()
                results[i].update(tokens=toks, log_probs=out_lp[slot, :counts[slot]].tolist(),
                                  finish_reason="stop" if params.stop_at_eod and toks and toks[-1] == eod_id
                                  else "length")
                owner[slot] = None
        admit_free([slot for slot in range(slots) if owner[slot] is None])

    age = [0] * slots  # decode steps since each slot's prompt was admitted (host-side: no sync to know it)
    emitted = [0] * slots  # tokens of each slot already streamed
    admit_free(list(range(slots)))
    def step() -> None:  # static shapes, device-only work: the unit a CUDA graph captures
        logits = _last_logits(model, last[:, None], ctx, vocab_size)  # every slot advances; done ones idle
        ctx.advance(1)
        record(rows, logits)

    use_graph = cuda_graph and device.type == "cuda" and parallel_state.get_tensor_model_parallel_world_size() == 1
    graphs: dict[int, Callable[[], None]] = {}  # one captured step per attention read bound
    pool = torch.cuda.graph_pool_handle() if use_graph else None  # shared by those graphs: one runs at a time
    since_sync = 0
    while True:
        # a slot admitted `age` steps ago has count == age + 1 tokens: certainly done once age >= n - 1
        if since_sync >= sync_every or any(o is not None and age[s] >= n - 1 for s, o in enumerate(owner)):
            sync()
            since_sync = 0
            if all(o is None for o in owner):
                break
        # Cache attention reads only up to the furthest live position (slot s is at len(prompt) + age[s]).
        bound = ctx.limit_attention(1 + max(len(prompts[o]) + age[s] for s, o in enumerate(owner) if o is not None))
        if bound in graphs:
            graphs[bound]()
        else:
            step()
            if use_graph:  # after one eager step at this bound has allocated every buffer
                captured = capture(step, pool, generator)
                graphs[bound] = captured[0].replay if captured else step
        since_sync += 1
        age = [a + 1 for a in age]
    return results
