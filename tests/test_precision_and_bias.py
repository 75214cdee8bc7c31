"""Review fixes in the model: attention output bias under a TE-style linear, FP8 wiring, fp32 filters, CP filter slices.

Transformer Engine does not run on CPU; where a TE behaviour matters the test uses a stand-in with TE's documented
semantics (a linear returns a bias only if it was built with one), and ``tests/test_gpu.py`` repeats the check with
the real TE spec on the GPU.
"""

import pytest
import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.tensor_parallel import RowParallelLinear

from evo2_recipe.utils.spawn import run_on_ranks
from hyena_helpers import dna_batch, randomise_weights_, tiny_provider


class ConstructionTimeBiasLinear(RowParallelLinear):
    """TE's rule (``te_return_bias`` is fixed in ``__init__``): a bias attached after construction is never returned."""

    def __init__(self, *args, bias, **kwargs):
        super().__init__(*args, bias=bias, **kwargs)
        self.built_with_bias = bias

    def forward(self, x):
        out, bias = super().forward(x)
        return out, (bias if self.built_with_bias else None)


def _te_style_attention_bias(rank, world):
    from evo2_recipe.models.hyena import specs
    from evo2_recipe.models.hyena.local_layers import RMSNorm, RMSNormColumnParallelLinear, SDPAttention
    from evo2_recipe.models.hyena.model import HyenaModel

    parallel_state.initialize_model_parallel()
    tensor_parallel.model_parallel_cuda_manual_seed(5)
    p = tiny_provider("striped_hyena_tiny")
    local = randomise_weights_(p.provide()).eval()
    hyena, attention = specs._layers(RMSNormColumnParallelLinear, ConstructionTimeBiasLinear, SDPAttention)
    te_like = HyenaModel(p, specs.HyenaStackSpec(hyena, attention, RMSNorm), vocab_size=512,
                         max_sequence_length=p.seq_length).eval()
    te_like.load_state_dict(local.state_dict())
    tokens, _ = dna_batch(2, 48)
    with torch.no_grad():
        a, b = local(tokens).float(), te_like(tokens).float()
        bias = te_like.decoder.layers[3].self_attention.linear_proj.bias
        bias.zero_()
        c = te_like(tokens).float()
    return a, b, c


def test_attention_output_bias_reaches_the_output_with_te_style_linears():
    ((local, te_like, no_bias),) = run_on_ranks(_te_style_attention_bias, 1)
    torch.testing.assert_close(te_like, local, rtol=0, atol=1e-6)  # the bias is applied by the TE-style linear
    assert (no_bias - local).abs().max() > 1e-3  # and it matters


def _fp8_contexts(rank, world, recipe):
    from contextlib import contextmanager

    from evo2_recipe.models.hyena import quantization
    from evo2_recipe.models.precision import mixed_precision_config

    parallel_state.initialize_model_parallel()
    tensor_parallel.model_parallel_cuda_manual_seed(5)
    p = tiny_provider("striped_hyena_tiny")
    model = p.provide().eval()
    mp = mixed_precision_config(recipe)
    mp.finalize()
    mp.setup(p)  # the config FP8 training would see (params stay fp32 here: only the contexts are checked)
    calls = []

    @contextmanager
    def recording(config, layer_no=-1, is_init=False):
        calls.append(("fp8", layer_no, is_init))
        yield

    import megatron.core.fp8_utils as fp8_utils

    fp8_utils.get_fp8_context = recording  # megatron's function is a silent no-op without TE; record its calls
    seen = []
    for layer in model.decoder.layers:
        layer.register_forward_pre_hook(lambda m, a, seen=seen: seen.append((m.layer_number - 1, len(calls))))
    with torch.no_grad():
        model(dna_batch(1, 16)[0])
    with quantization.layer_context(p, 0, is_init=True):
        pass
    return calls, seen, p.first_last_layers_bf16


@pytest.mark.parametrize("recipe", ["bf16_with_fp8_current_scaling_mixed", "bf16_with_fp8_delayed_scaling_mixed"])
def test_fp8_context_entered_like_megatron_transformer_block(recipe):
    ((calls, seen, first_last_bf16),) = run_on_ranks(_fp8_contexts, 1, recipe)
    if "delayed" in recipe:  # one context around the stack, entered before the first layer
        assert calls[0] == ("fp8", -1, False) and [c for c in calls[:-1] if c[1] >= 0] == []
    else:  # one per layer, with the global layer index (megatron decides first/last bf16 from it)
        assert calls[:-1] == [("fp8", i, False) for i in range(4)]
        assert [n for _, n in seen] == [1, 2, 3, 4]  # each layer's context is entered right before it runs
        assert first_last_bf16
    assert calls[-1] == ("fp8", 0, True)  # build-time context (FP8 parameters) per layer


def test_delayed_scaling_inference_warns_about_uncalibrated_scales(caplog):
    from evo2_recipe.models.precision import apply_precision_recipe
    from evo2_recipe.models.providers import get_provider

    for recipe, warned in (("bf16_with_fp8_delayed_scaling_mixed", True),
                           ("bf16_with_fp8_current_scaling_mixed", False)):
        caplog.clear()
        with caplog.at_level("WARNING", logger="evo2_recipe.models.precision"):
            apply_precision_recipe(get_provider("striped_hyena_tiny", vocab_size=512), recipe, on_gpu=True)
        assert ("use bf16_with_fp8_current_scaling_mixed" in caplog.text) is warned


def test_fp8_inference_caches_quantised_weights_for_short_context_models_only():
    """Transformer Engine's cache of FP8 weights (1 byte per parameter) is left out for long-context models, where
    memory is the limit (``tests/test_gpu_te.py`` checks the TE modules keep no cache then)."""
    from evo2_recipe.models.precision import FP8_WEIGHT_CACHE_MAX_CONTEXT, apply_precision_recipe
    from evo2_recipe.models.providers import get_provider

    for recipe, seq, off in (("bf16_with_fp8_current_scaling_mixed", 8192, False),
                             ("bf16_with_fp8_current_scaling_mixed", FP8_WEIGHT_CACHE_MAX_CONTEXT + 1, True),
                             ("bf16_mixed", 1 << 20, False)):
        p = get_provider("striped_hyena_tiny", vocab_size=512, seq_length=seq)
        apply_precision_recipe(p, recipe, on_gpu=True)
        assert p.disable_parameter_transpose_cache is off, (recipe, seq)


def test_fp8_without_transformer_engine_is_an_error():
    from evo2_recipe.models.precision import apply_precision_recipe, mixed_precision_config
    from evo2_recipe.models.providers import get_provider

    for recipe in ("bf16_with_fp8_current_scaling_mixed", "bf16_with_fp8_delayed_scaling_mixed"):
        p = get_provider("striped_hyena_tiny", vocab_size=512)
        apply_precision_recipe(p, recipe, on_gpu=True)
        assert p.fp8 == "hybrid"
        with pytest.raises(ValueError, match="needs NVIDIA Transformer Engine"):
            p.finalize()
    p = get_provider("striped_hyena_tiny", vocab_size=512, vortex_style_fp8=True)
    with pytest.raises(ValueError, match="vortex_style_fp8 needs NVIDIA Transformer Engine"):
        p.finalize()
    with pytest.raises(ValueError, match="Unknown mixed-precision recipe 'bf16_fp8'.*bf16_mixed"):
        mixed_precision_config("bf16_fp8")
    p = get_provider("striped_hyena_tiny", vocab_size=512)
    assert apply_precision_recipe(p, "fp16_mixed", on_gpu=True) == "fp16_mixed" and p.fp16 and not p.bf16
    assert p.params_dtype == torch.float16  # fp16 is fp16, not a silent bf16/fp32 run
    assert apply_precision_recipe(p, None, on_gpu=False) == "fp32" and p.params_dtype == torch.float32


def test_sequence_padding_for_fp8_gemms_is_exact():
    from evo2_recipe.models.hyena.quantization import pad_sequence_to_multiple

    lin = torch.nn.Linear(8, 5)
    x = torch.randn(13, 2, 8)
    seen = []
    out = pad_sequence_to_multiple(lambda t: (seen.append(t.shape[0]), lin(t))[1], x, 16)
    assert seen == [16] and out.shape == (13, 2, 5)
    torch.testing.assert_close(out, lin(x), rtol=0, atol=0)


def _bf16_model_filters(rank, world):
    from megatron.core.transformer.module import Float16Module

    from evo2_recipe.models.hyena.mixer import keep_hyena_filters_fp32

    parallel_state.initialize_model_parallel()
    tensor_parallel.model_parallel_cuda_manual_seed(5)
    p = tiny_provider("striped_hyena_tiny")
    p.params_dtype, p.bf16 = torch.bfloat16, True
    model = randomise_weights_(p.provide())
    ref = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("filter.R")}
    model = Float16Module(p, keep_hyena_filters_fp32(model))  # what inference does for bf16
    dtypes = {k: v.dtype for k, v in model.module.state_dict().items() if not k.endswith("_extra_state")}
    exact = all(torch.equal(model.module.state_dict()[k], ref[k]) for k in ref if k.endswith("filter.R"))
    return dtypes, exact


def test_bf16_inference_keeps_hyena_filters_fp32():
    ((dtypes, exact),) = run_on_ranks(_bf16_model_filters, 1)
    fp32 = {k for k, d in dtypes.items() if d == torch.float32}
    expected = {k for k in dtypes if k.endswith(("filter.h", "filter.decay", "filter.p", "filter.gamma", "filter.R"))}
    assert fp32 == expected and len(expected) == 5  # hcm h + decay, hcl p, gamma, R
    assert dtypes["decoder.layers.0.mixer.dense_projection.weight"] == torch.bfloat16
    assert exact  # built in fp32, never rounded through bf16


def test_filter_of_a_channel_slice_equals_the_slice_of_the_full_filter():
    from evo2_recipe.models.hyena import operators as ops

    g = torch.Generator().manual_seed(0)
    G, O, C, L = 8, 16, 32, 300
    p, gamma, R = (torch.randn(G, O, generator=g) * 0.3 for _ in range(3))
    full = ops.expand_groups(ops.modal_filter(p, gamma, R, L), C)
    t = torch.arange(L, dtype=torch.float32)
    dense = torch.einsum("go,got->gt", R, torch.exp(ops.modal_log_poles(p, gamma)[..., None] * t))
    torch.testing.assert_close(ops.modal_filter(p, gamma, R, L), dense, rtol=1e-5, atol=1e-6)
    for start, stop in ((0, 16), (16, 32), (5, 27), (31, 32)):
        groups, within = ops.groups_of_channels(start, stop, C, G)
        part = ops.expand_groups(ops.modal_filter(p[groups], gamma[groups], R[groups], L),
                                 (groups.stop - groups.start) * (C // G))[within]
        assert groups.stop - groups.start <= (stop - start) // (C // G) + 2  # only the groups it needs
        torch.testing.assert_close(part, full[start:stop], rtol=0, atol=0)


def _chunked_long_conv(rank, world):
    from evo2_recipe.models.hyena import mixer, specs

    parallel_state.initialize_model_parallel()
    tensor_parallel.model_parallel_cuda_manual_seed(5)
    model = randomise_weights_(tiny_provider("striped_hyena_tiny").provide()).eval()
    tokens, _ = dna_batch(2, 50)
    with torch.no_grad():
        whole = model(tokens)
        mixer.INFERENCE_CHUNK_ELEMENTS = 2 * 50 * 8  # 8 channels at a time (per group: 64 / 16 = 4)
        conv_chunked = model(tokens)
        specs.MLP_INFERENCE_CHUNK_TOKENS = 2 * 16  # MLPs over 16 positions x 2 sequences at a time, the last 2 short
        both_chunked = model(tokens)
    return whole, conv_chunked, both_chunked


def test_inference_long_convolution_in_channel_chunks_and_mlp_in_sequence_chunks_equal_whole():
    ((whole, conv_chunked, both_chunked),) = run_on_ranks(_chunked_long_conv, 1)
    torch.testing.assert_close(conv_chunked, whole, rtol=1e-6, atol=1e-6)
    # GEMMs over fewer rows may sum in another order: a few fp32 ulps of the largest logit
    torch.testing.assert_close(both_chunked, whole, rtol=1e-6, atol=1e-6 * whole.abs().max().item())
