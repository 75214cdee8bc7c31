"""Cached decoding (Hyena recurrent state + attention KV cache) equals the full forward pass (fp32)."""

import os

import pytest
import torch
from megatron.core import parallel_state, tensor_parallel

from evo2_recipe.models.hyena.inference_state import HyenaInferenceContext
from evo2_recipe.utils.spawn import run_on_ranks
from hyena_helpers import dna_batch, tiny_provider


def _decode_vs_full(rank, world, name, prompt_len, total, chunks, fused_step=False, bounded=False):
    parallel_state.initialize_model_parallel()
    tensor_parallel.model_parallel_cuda_manual_seed(5)
    torch.manual_seed(5)
    model = tiny_provider(name).provide().eval()
    tokens, _ = dna_batch(2, total, seed=9)
    with torch.no_grad():
        full = model(tokens)
        if fused_step:  # one-token steps through the Triton kernels (interpreter on CPU); full forward stays plain
            os.environ["EVO2_FUSED_KERNELS"] = "1"
        ctx = HyenaInferenceContext(max_batch_size=2, max_sequence_length=total)
        pieces, pos = [], 0
        for size in [prompt_len] + chunks:
            if bounded:  # attention reads only the cache positions below a power-of-two bound (8, 16, 32, 64, 72)
                ctx.limit_attention(pos + size, minimum=8)
            pieces.append(model(tokens[:, pos:pos + size], inference_context=ctx))
            ctx.advance(size)
            pos += size
        # generation's contexts ask for the last position's logits only: the last layer's MLP runs on it alone
        last_only = HyenaInferenceContext(max_batch_size=2, max_sequence_length=total,
                                          materialize_only_last_token_logits=True)
        lasts = []
        for a, b in ((0, prompt_len), (prompt_len, prompt_len + 5)):
            lasts.append(model(tokens[:, a:b], inference_context=last_only))
            last_only.advance(b - a)
    return full, torch.cat(pieces, dim=1), torch.cat(lasts, dim=1)


@pytest.mark.parametrize("name,prompt_len,fused_step,bounded", [  # 3: shorter than the 7-tap hcs window
    ("striped_hyena_tiny", 3, False, True), ("striped_hyena_tiny", 40, False, False),
    ("striped_hyena_tiny_nv", 3, False, False), ("striped_hyena_tiny_nv", 40, False, True),
    ("striped_hyena_tiny_nv", 40, True, True)])  # NV: hcs bias folded in the kernel; fused: the prompt through the
# fused forward (state taken from its tail; the 3-token prompts, shorter than every window, share that code on the
# plain path), the steps through the decode kernel and the split-KV attention
def test_cached_decode_equals_full_forward(name, prompt_len, fused_step, bounded):
    total = 72
    chunks = [1] * (total - prompt_len - 5) + [5]  # token by token, then one multi-token chunk
    ((full, cached, lasts),) = run_on_ranks(_decode_vs_full, 1, name, prompt_len, total, chunks, fused_step, bounded)
    assert cached.shape == full.shape
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lasts, full[:, [prompt_len - 1, prompt_len + 4]], rtol=1e-5, atol=1e-5)


def _last_position_vs_full(rank, world, pattern, fused):
    parallel_state.initialize_model_parallel()
    tensor_parallel.model_parallel_cuda_manual_seed(5)
    model = tiny_provider(hybrid_override_pattern=pattern, num_layers=len(pattern)).provide().eval()
    tokens, _ = dna_batch(2, 24, seed=3)
    with torch.no_grad():
        full = model(tokens)
        if fused:  # the prefill through the kernels (interpreter on CPU); the full forward stays plain
            os.environ["EVO2_FUSED_KERNELS"] = "1"
        ctx = HyenaInferenceContext(max_batch_size=2, max_sequence_length=24, materialize_only_last_token_logits=True)
        last = model(tokens, inference_context=ctx)
    return full, last


@pytest.mark.parametrize("pattern,fused", [("SDH*S", False), ("*SDH", False), ("SDH*", False), ("*SDH", True)])
def test_prefill_last_position_only_equals_full_forward(pattern, fused):
    """Last layer hcs, hcl, attention (last query only); fused: each Hyena layer's last join applies the next norm,
    the last one the final norm on the last position alone."""
    ((full, last),) = run_on_ranks(_last_position_vs_full, 1, pattern, fused)
    assert last.shape == (2, 1, full.shape[-1])
    torch.testing.assert_close(last, full[:, -1:], rtol=1e-5, atol=1e-5)
