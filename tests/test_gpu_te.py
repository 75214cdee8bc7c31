"""Transformer Engine on the GPU (skipped without CUDA or TE): TE spec == local spec, and FP8 really is entered.

Run on the lent H200 with TE 2.20.2 (``../shared/tools/gpu_te.sh``); results are recorded in benchmarks/RESULTS.md.
"""

import pytest
import torch

pytestmark = pytest.mark.gpu
te = pytest.importorskip("transformer_engine.pytorch") if torch.cuda.is_available() else None


@pytest.fixture
def group():
    from evo2_recipe.utils.distributed import init_distributed, teardown

    init_distributed(seed=3)
    yield
    teardown()


def _build(name, use_te, **overrides):
    from evo2_recipe.models.providers import get_provider

    p = get_provider(name, vocab_size=512, params_dtype=torch.float32, bf16=False, use_te=use_te,
                     recompute_granularity=None, recompute_method=None, recompute_num_layers=None, **overrides)
    p.finalize()
    return p, p.provide().cuda().eval()


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("name", ["striped_hyena_tiny", "striped_hyena_tiny_nv", "evo2_1b_base"])
def test_te_spec_logits_equal_local_spec(group, name):
    from megatron.core.transformer.module import Float16Module

    from hyena_helpers import randomise_weights_

    _, local = _build(name, use_te=False)
    randomise_weights_(local)
    bias = [m.self_attention.linear_proj.bias for m in local.decoder.layers if hasattr(m, "self_attention")]
    assert all(b is not None and b.abs().sum() > 0 for b in bias) == (not name.endswith("_nv"))
    _, ours_te = _build(name, use_te=True)
    missing, unexpected = ours_te.load_state_dict(local.state_dict(), strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)
    tokens = torch.randint(65, 90, (2, 512), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad():
        a, b = local(tokens).float(), ours_te(tokens).float()
    err = (a - b).abs().max().item()
    print(f"{name} fp32 TE vs local: max|diff| {err:.2e}, logit scale {a.abs().max().item():.3f}, rel {_rel(b, a):.2e}")
    assert err <= 1e-5 * max(1.0, a.abs().max().item())
    p16 = {}
    for label, model in (("local", local), ("te", ours_te)):
        model.config.bf16, model.config.params_dtype = True, torch.bfloat16
        with torch.no_grad():
            p16[label] = Float16Module(model.config, model)(tokens).float()
    noise = max(_rel(p16["local"], a), _rel(p16["te"], a))
    print(f"{name} bf16: local vs fp32 {_rel(p16['local'], a):.2e}, TE vs fp32 {_rel(p16['te'], a):.2e}, "
          f"TE vs local {_rel(p16['te'], p16['local']):.2e}")
    assert _rel(p16["te"], p16["local"]) <= 2 * noise + 1e-3


@pytest.mark.parametrize("recipe,expected", [("bf16_with_fp8_current_scaling_mixed", [False, True, True, False]),
                                             ("bf16_with_fp8_delayed_scaling_mixed", [True, True, True, True])])
def test_fp8_is_entered_per_layer_with_transformer_engine(group, recipe, expected):
    from transformer_engine.pytorch.fp8 import FP8GlobalStateManager

    from evo2_recipe.models.precision import apply_precision_recipe
    from evo2_recipe.models.providers import get_provider

    p = get_provider("striped_hyena_tiny", vocab_size=512)
    apply_precision_recipe(p, recipe, on_gpu=True)
    p.finalize()
    from megatron.core.transformer.module import Float16Module

    model = Float16Module(p, p.provide().cuda())  # as Megatron-Bridge wraps bf16 models
    seen = []
    for layer in model.module.decoder.layers:
        layer.register_forward_pre_hook(lambda m, a: seen.append(FP8GlobalStateManager.is_fp8_enabled()))
    tokens = torch.randint(65, 90, (2, 64), device="cuda")
    loss = model(tokens, labels=tokens.roll(-1, 1)).float().mean()
    loss.backward()
    assert seen == expected and torch.isfinite(loss)


def test_vortex_style_fp8_only_on_hyena_input_projections(group):
    from transformer_engine.pytorch.fp8 import FP8GlobalStateManager

    from evo2_recipe.models.providers import get_provider

    from megatron.core.transformer.module import Float16Module

    p = get_provider("striped_hyena_tiny", vocab_size=512, vortex_style_fp8=True)
    p.finalize()
    model = Float16Module(p, p.provide().cuda()).eval()
    seen = {}

    def record(name):
        def hook(module, args):  # returns None: a pre-hook's return value would replace the arguments
            seen.setdefault(name, FP8GlobalStateManager.is_fp8_enabled())
        return hook

    for name, m in model.module.named_modules():
        if name.endswith(("dense_projection", "linear_qkv", "linear_fc1")):
            m.register_forward_pre_hook(record(name))
    with torch.no_grad():
        out = model(torch.randint(65, 90, (1, 37), device="cuda"))  # 37: padded to 48 for the FP8 GEMM, then cut
    assert out.shape == (1, 37, 512) and torch.isfinite(out.float()).all()
    assert {k for k, v in seen.items() if v} == {f"decoder.layers.{i}.mixer.dense_projection" for i in range(3)}

@pytest.mark.parametrize("seq_length,cached", [(8192, True), (1 << 17, False)])
def test_fp8_weight_cache_only_for_short_context_models(group, seq_length, cached):
    """FP8 inference keeps TE's quantised weights between forwards for a short-context model and not for a
    long-context one (``precision.FP8_WEIGHT_CACHE_MAX_CONTEXT``); the logits agree either way."""
    from evo2_recipe.inference.loading import wrap_for_inference
    from evo2_recipe.models.precision import apply_precision_recipe
    from evo2_recipe.models.providers import get_provider

    p = get_provider("striped_hyena_tiny", vocab_size=512, use_te=True, seq_length=seq_length)
    apply_precision_recipe(p, "bf16_with_fp8_current_scaling_mixed", on_gpu=True)
    p.finalize()
    model = wrap_for_inference(p, p.provide().cuda())
    tokens = torch.randint(65, 90, (1, 128), device="cuda")
    with torch.no_grad():
        first, second = model(tokens).float(), model(tokens).float()
    kept = [m for m in model.modules() if getattr(m, "_fp8_workspaces", None)]
    assert bool(kept) is cached
    assert _rel(second, first) <= 1e-6


@pytest.mark.parametrize("recipe,decoupled", [("bf16_mixed", True), ("bf16_with_fp8_delayed_scaling_mixed", True),
                                              ("bf16_with_fp8_current_scaling_mixed", False)])
def test_precision_aware_optimizer_path(recipe, decoupled):
    """With ``--use-precision-aware-optimizer`` megatron's distributed optimizer hands TE's FusedAdam the gradients
    themselves (no fp32 master copy, no per-step fp32 gradient copies) in bf16 and delayed FP8; only FP8 current
    scaling keeps fp32 master copies. The flag megatron reads, computed by Bridge's finalize after it copies the
    precision settings, as train_evo2 builds the config."""
    from evo2_recipe.cli.train import build_parser, config_from_args

    cfg = config_from_args(build_parser().parse_intermixed_args(
        ["--mock-data", "--model-size", "evo2_7b_base", "--use-precision-aware-optimizer",
         "--mixed-precision-recipe", recipe]), cpu=False)
    cfg.mixed_precision.finalize()
    cfg.mixed_precision.setup(cfg.model, cfg.optimizer, cfg.ddp)
    cfg.optimizer.finalize()
    assert cfg.optimizer.use_precision_aware_optimizer_no_fp8_or_ds_fp8 is decoupled
