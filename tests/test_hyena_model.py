"""Tiny Hyena model on megatron-core: forward/backward, loss weighting, parameter counts of all 12 sizes, FLOPs."""

import math

import pytest
import torch
from megatron.core import parallel_state, tensor_parallel

from evo2_recipe.utils.spawn import run_on_ranks
from hyena_helpers import dna_batch, tiny_provider

# Spec section 1.6 (V = 512, decay buffer excluded).
PARAM_COUNTS = {
    "evo2_1b_base": 1_108_204_800, "evo2_7b_base": 6_481_649_408, "evo2_7b": 6_582_312_704,
    "evo2_20b": 19_739_697_664, "evo2_40b_base": 40_332_977_152, "evo2_40b": 41_119_409_152,
    "striped_hyena_1b_nv": 1_108_198_016, "striped_hyena_7b_nv": 6_582_294_528,
    "striped_hyena_40b_nv": 41_119_350_784, "striped_hyena_test": 812_001_024,
    "striped_hyena_test_nv": 811_997_184, "striped_hyena_1b_nv_parallel": 1_209_332_736,
}


def _meta_param_counts(rank, world):
    from evo2_recipe.models.providers import get_provider

    parallel_state.initialize_model_parallel()
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    counts, shapes = {}, {}
    for name in PARAM_COUNTS:
        p = get_provider(name, vocab_size=512, use_cpu_initialization=True, perform_initialization=False)
        p.finalize()
        with torch.device("meta"):
            model = p.provide()
        counts[name] = sum(x.numel() for x in model.parameters())
        shapes[name] = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    return counts, shapes


def test_parameter_counts_and_shapes_of_all_sizes():
    ((counts, shapes),) = run_on_ranks(_meta_param_counts, 1)
    assert counts == PARAM_COUNTS
    s = shapes["evo2_1b_base"]  # spot-check spec table 5.3 for 1b: S=0, D=1, H=2, *=3
    assert s["embedding.word_embeddings.weight"] == (512, 1920)
    assert s["decoder.layers.0.mixer.mixer.short_conv.short_conv_weight"] == (128, 1, 7)
    assert s["decoder.layers.1.mixer.mixer.filter.h"] == s["decoder.layers.1.mixer.mixer.filter.decay"] == (128, 128)
    assert s["decoder.layers.2.mixer.mixer.filter.gamma"] == (1920, 16)
    assert s["decoder.layers.2.mixer.hyena_proj_conv.short_conv_weight"] == (5760, 3)
    assert s["decoder.layers.3.self_attention.linear_qkv.weight"] == (5760, 1920)
    assert s["decoder.layers.3.self_attention.linear_proj.bias"] == (1920,)
    assert s["decoder.layers.24.mlp.linear_fc1.weight"] == (10240, 1920)
    assert "output_layer.weight" not in s and "output_layer.weight" in shapes["striped_hyena_1b_nv_parallel"]
    nv = shapes["striped_hyena_1b_nv"]
    assert nv["decoder.layers.0.mixer.mixer.conv_bias"] == (128,)
    assert "decoder.layers.3.self_attention.linear_proj.bias" not in nv
    assert "decoder.layers.0.mixer.mixer.conv_bias" not in s


def _tiny_forward_backward(rank, world, name):
    parallel_state.initialize_model_parallel()
    tensor_parallel.model_parallel_cuda_manual_seed(3)
    torch.manual_seed(3)
    model = tiny_provider(name).provide()
    tokens, labels = dna_batch()
    logits = model(tokens)
    loss = model(tokens, labels=labels)
    loss.sum().backward()
    grads = {n: p.grad is not None and bool(p.grad.abs().sum() > 0) for n, p in model.named_parameters()}
    # Causality: changing the last half of the input must not change the first half's logits.
    t2 = tokens.clone()
    t2[:, 32:] = 65
    with torch.no_grad():
        logits2 = model(t2)
    # Loss weighting by hand: upper-case labels, 0.1 weight on lowercase, renormalised to the token count.
    lower = labels >= 97
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, 512), torch.where(lower, labels - 32, labels).reshape(-1),
                                           reduction="none").reshape(labels.shape)
    w = torch.where(lower, 0.1, 1.0)
    expected = ce * w * (w.numel() / w.sum())
    return {"logits": logits.detach(), "logits2": logits2, "loss": loss.detach(), "expected": expected.detach(),
            "grads": grads}


@pytest.mark.parametrize("name", ["striped_hyena_tiny", "striped_hyena_tiny_nv"])
def test_tiny_forward_backward(name):
    (r,) = run_on_ranks(_tiny_forward_backward, 1, name)
    assert r["logits"].shape == (2, 64, 512) and torch.isfinite(r["logits"]).all()
    assert all(r["grads"].values()), [n for n, ok in r["grads"].items() if not ok]
    torch.testing.assert_close(r["logits2"][:, :32], r["logits"][:, :32], rtol=1e-5, atol=1e-5)
    assert (r["logits2"][:, 32:] - r["logits"][:, 32:]).abs().max() > 1e-3
    torch.testing.assert_close(r["loss"], r["expected"], rtol=1e-5, atol=1e-6)
    assert abs(r["loss"].mean().item() - math.log(512)) < 0.5  # random init: near-uniform predictions


def test_flops_formula():
    from evo2_recipe.models.providers import get_provider, num_floating_point_operations

    p = get_provider("evo2_1b_base", vocab_size=512)
    B, L, H, F, V = 1, 8192, 1920, 5120, 512
    by_hand = 3 * (2 * B * L * H * V + 25 * (8 * B * L * H * H + 6 * B * L * F * H) + 4 * 4 * B * H * L * L
                   + 21 * 6 * B * L * 3 * H + 7 * 2 * B * L * 7 * H + 7 * 2 * B * L * 128 * H
                   + 7 * 10 * B * L * 13 * H)
    assert num_floating_point_operations(p, B, L) == pytest.approx(by_hand, rel=1e-12)


def test_bad_configurations():
    from evo2_recipe.models.providers import get_provider

    with pytest.raises(ValueError, match="unknown model size"):
        get_provider("evo2_2b")
    with pytest.raises(ValueError, match="unknown HyenaModelProvider field"):
        get_provider("striped_hyena_tiny", num_layer=3)
    from evo2_recipe.models.hyena.config import parse_pattern

    with pytest.raises(ValueError, match="unknown layer letters"):
        parse_pattern("SDX*", 4)
    with pytest.raises(ValueError, match="num_layers is 5"):
        parse_pattern("SDH*", 5)


def _grads_with_recompute(rank, world, method):
    parallel_state.initialize_model_parallel()
    tensor_parallel.model_parallel_cuda_manual_seed(4)
    torch.manual_seed(4)
    extra = dict(recompute_granularity="full", recompute_method=method, recompute_num_layers=2) \
        if method else {}
    model = tiny_provider(**extra).provide()
    tokens, labels = dna_batch()
    model(tokens, labels=labels).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("method", ["uniform", "block"])
def test_full_activation_recompute_gives_identical_gradients(method):
    (plain,) = run_on_ranks(_grads_with_recompute, 1, None)
    (recomputed,) = run_on_ranks(_grads_with_recompute, 1, method)
    assert plain.keys() == recomputed.keys()
    for k in plain:
        torch.testing.assert_close(recomputed[k], plain[k], rtol=1e-6, atol=1e-7)


def _build_bad(rank, world, overrides):
    parallel_state.initialize_model_parallel()
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    try:
        tiny_provider(**overrides).provide()
    except ValueError as e:
        return str(e)
    return "no error"


def test_impossible_group_configuration_is_rejected():
    (msg,) = run_on_ranks(_build_bad, 1, {"num_groups_hyena_short": 3})
    assert msg.startswith("hidden_size 64 is not divisible by num_groups_hyena_short=3")


def _hyena_params_with_passed_groups(rank, world):
    """parallel_state says TP=1; the provider is handed a collection whose TP group holds both ranks."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection

    from hyena_helpers import tiny_provider

    parallel_state.initialize_model_parallel()
    whole = {n: p.detach().clone() for n, p in tiny_provider().provide().named_parameters() if ".mixer.mixer." in n or "hyena_proj_conv" in n}
    pg = ProcessGroupCollection.use_mpu_process_groups()
    pg.tp = dist.new_group([0, 1])
    provider = tiny_provider(tp=2)
    provider._pg_collection = pg  # what Megatron-Bridge's provide_distributed_model sets
    model = provider.provide()
    dense = model.decoder.layers[0].mixer.dense_projection.weight.shape
    return dense, {n: (p.detach(), whole[n]) for n, p in model.named_parameters() if n in whole}


def test_model_uses_the_process_groups_it_is_given():
    """Issue 13 item 5: the TP group comes from the ProcessGroupCollection handed to the provider (Bridge's
    ``_pg_collection``), not from parallel_state's globals: each rank holds its TP=2 slice of every Hyena parameter
    (equal to that slice of the same model built unsharded) and a half-width input projection."""
    from evo2_recipe.utils.spawn import run_on_ranks

    for rank, (dense_shape, params) in enumerate(run_on_ranks(_hyena_params_with_passed_groups, 2)):
        assert len(params) >= 9  # 3 Hyena layers: proj conv + filter/bias tensors of hcs, hcm, hcl
        for name, (mine, whole) in params.items():
            rows = whole.shape[0] // 2
            assert mine.shape[0] == rows, name
            torch.testing.assert_close(mine, whole[rank * rows:(rank + 1) * rows], rtol=0, atol=0, msg=name)
        assert dense_shape[0] == 3 * 64 // 2  # (3H/TP, H): megatron's linear also took the passed group
