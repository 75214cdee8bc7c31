"""ConfigContainer construction for GPU-style settings (built and finalized on CPU, no training)."""

import pytest
import torch

from evo2_recipe.training.recipe import apply_overrides, evo2_pretrain_config


def mock_config(model_size="evo2_1b_base", **recipe):
    """The recipe's config on mock data, checked as ``train_evo2`` checks it."""
    cfg = evo2_pretrain_config(model_size, **recipe)
    cfg.dataset.mock = True
    return apply_overrides(cfg, [])


def test_bf16_recipe_config_validates():
    cfg = mock_config("evo2_1b_base", mixed_precision_recipe="bf16_mixed", max_steps=20, warmup_steps=2,
                      constant_steps=0)
    cfg.mixed_precision.finalize()
    assert cfg.mixed_precision.bf16 and not cfg.mixed_precision.fp8 and not cfg.mixed_precision.fp8_param
    assert cfg.model.seq_length == 8192 and cfg.scheduler.lr_decay_iters == 18
    assert cfg.model.recompute_granularity == "full" and cfg.model.recompute_num_layers == 5


@pytest.mark.parametrize("world,tp,flag,expected", [(1, 1, None, False), (2, 2, None, False), (4, 2, None, True),
                                                    (4, 1, False, False), (1, 1, True, True)])
def test_fp8_parameters_only_where_they_are_gathered(monkeypatch, world, tp, flag, expected):
    """FP8 recipes keep FP8 parameters (the reference's fp8_param_gather) only with more than one data-parallel rank,
    unless asked: on one rank there is no gather and the per-step re-quantisation only costs."""
    monkeypatch.setenv("WORLD_SIZE", str(world))
    recipe = {} if flag is None else {"fp8_param_gather": flag}
    cfg = evo2_pretrain_config("evo2_1b_base", mixed_precision_recipe="bf16_with_fp8_current_scaling_mixed",
                               tensor_model_parallel_size=tp, **recipe)
    assert cfg.mixed_precision.fp8 and cfg.mixed_precision.fp8_param_gather is expected
    assert cfg.mixed_precision.fp8_param is expected


def test_settings_validation():
    with pytest.raises(ValueError, match="exactly one data source"):
        apply_overrides(evo2_pretrain_config(), [])
    with pytest.raises(ValueError, match="divisible by 2\\*context-parallel-size"):
        mock_config(seq_length=100, context_parallel_size=4)
    cfg = mock_config(mixed_precision_recipe=None, spike_no_more_embedding_init=True,
                      activation_checkpointing="selective")
    assert cfg.model.params_dtype == torch.float32 and not cfg.model.share_embeddings_and_output_weights
    assert cfg.model.recompute_granularity == "selective"
    cfg = evo2_pretrain_config()
    cfg.dataset.mock = True
    profile = ["profiling.use_pytorch_profiler=true", "profiling.profile_step_start=2", "profiling.profile_step_end=3"]
    assert apply_overrides(cfg, profile).profiling.use_pytorch_profiler  # the trace goes beside the TensorBoard logs
    cfg.logger.tensorboard_dir = None  # --disable-tensorboard-logger: Bridge would write to ./torch_profile
    with pytest.raises(ValueError, match="drop --disable-tensorboard-logger"):
        apply_overrides(cfg, profile)


def test_precision_aware_optimizer_settings():
    """The 7b-on-one-GPU setup (TE FusedAdam, bf16 moments, flags and overrides interleaved) builds. Without FP8 the
    recipe drops Bridge's default FP8 recipe, so megatron's optimizer takes its decoupled-gradient path (no fp32
    copies of gradients and weights each step); on that path, as with delayed FP8, bf16 gradients crash TE's
    grad-norm kernel, and the recipe says so before anything runs."""
    from evo2_recipe.cli.train import build_parser, config_from_args

    def config(*argv):
        return config_from_args(build_parser().parse_intermixed_args(
            ["--mock-data", "--model-size", "evo2_7b_base", "optimizer.exp_avg_dtype=torch.bfloat16",
             "--use-precision-aware-optimizer", "optimizer.exp_avg_sq_dtype=torch.bfloat16", *argv]), cpu=False)

    def decoupled(cfg):
        """The inputs of megatron's ``use_precision_aware_optimizer_no_fp8_or_ds_fp8`` (fp32 master weights, no
        offload) once Bridge has copied the precision settings; Bridge's config computes it at finalize."""
        cfg.mixed_precision.setup(cfg.model, cfg.optimizer, cfg.ddp)
        o = cfg.optimizer
        assert hasattr(o, "finalize") and o.main_params_dtype == torch.float32 and not o.optimizer_cpu_offload
        return o.use_precision_aware_optimizer and o.fp8_recipe in (None, "delayed")

    cfg = config("--no-activation-checkpointing")  # bf16
    assert cfg.optimizer.use_precision_aware_optimizer and cfg.ddp.grad_reduce_in_fp32
    assert cfg.optimizer.exp_avg_dtype == cfg.optimizer.exp_avg_sq_dtype == torch.bfloat16
    assert cfg.model.recompute_granularity is None
    assert cfg.mixed_precision.fp8_recipe is None and decoupled(cfg)
    fp8 = ("--mixed-precision-recipe", "bf16_with_fp8_delayed_scaling_mixed")
    assert config(*fp8).ddp.grad_reduce_in_fp32 and decoupled(config(*fp8))  # the default: fp32 gradients
    current = config("--mixed-precision-recipe", "bf16_with_fp8_current_scaling_mixed", "--no-grad-reduce-in-fp32")
    assert current.mixed_precision.fp8_recipe == "tensorwise" and not decoupled(current)  # fp32 master copies
    for argv in [(), fp8, ("optimizer.main_params_dtype=torch.float16",)]:
        with pytest.raises(ValueError, match="drop --no-grad-reduce-in-fp32"):
            config(*argv, "--no-grad-reduce-in-fp32")


def test_weight_decay_groups():
    """Biases, modal-filter params, hcs filters and every 1-D parameter get no weight decay (spec 2.6)."""
    from megatron.core.optimizer.optimizer_config import ParamKey

    from evo2_recipe.training.recipe import HyenaOptimizerConfigOverrideProvider

    class Ctx:
        optimizer_config = type("O", (), {"decoupled_lr": None})()

    (key,) = HyenaOptimizerConfigOverrideProvider().build_config_overrides(Ctx()).keys()
    p2 = torch.nn.Parameter(torch.zeros(4, 3))
    p1 = torch.nn.Parameter(torch.zeros(4))
    assert key.matches(p2, "decoder.layers.2.mixer.mixer.filter.R")
    assert key.matches(p2, "decoder.layers.0.mixer.mixer.short_conv.short_conv_weight")
    assert key.matches(p1, "decoder.final_norm.weight")
    assert not key.matches(p2, "decoder.layers.1.mixer.mixer.filter.h")  # medium filter is decayed (reference)
    assert not key.matches(p2, "decoder.layers.0.mixer.dense_projection.weight")
    assert isinstance(key, ParamKey)

    class WithDecayedFilters(Ctx):  # the provider's hyena_filter_no_wd=False puts the modal filters back
        model = [type("M", (), {"config": type("C", (), {"hyena_filter_no_wd": False})()})()]

    (key,) = HyenaOptimizerConfigOverrideProvider().build_config_overrides(WithDecayedFilters()).keys()
    assert not key.matches(p2, "decoder.layers.2.mixer.mixer.filter.R")
    assert key.matches(p2, "decoder.layers.0.mixer.mixer.short_conv.short_conv_weight")


def _output_bias_model(rank, world):
    from megatron.core import parallel_state, tensor_parallel

    from hyena_helpers import dna_batch, tiny_provider

    parallel_state.initialize_model_parallel()
    tensor_parallel.model_parallel_cuda_manual_seed(1)
    model = tiny_provider(add_bias_output=True).provide().eval()
    tokens, _ = dna_batch(1, 16)
    with torch.no_grad():
        before = model(tokens)
        model.output_layer.bias.fill_(0.5)
        after = model(tokens)
    return model.output_layer.bias.shape, (after - before)


def test_add_bias_output_reaches_the_model():
    from evo2_recipe.utils.spawn import run_on_ranks

    from evo2_recipe.cli.train import build_parser, config_from_args

    cfg = config_from_args(build_parser().parse_args(["--mock-data", "--model-size", "striped_hyena_tiny",
                                                      "--add-bias-output"]), cpu=True)
    assert cfg.model.add_bias_output
    ((shape, delta),) = run_on_ranks(_output_bias_model, 1)
    assert tuple(shape) == (512,) and torch.allclose(delta, torch.full_like(delta, 0.5))


@pytest.mark.parametrize("te_written", [False, True])
def test_finetune_from_a_base_without_te_metadata(tmp_path, te_written):
    """A base written without Transformer Engine (converted, CPU-trained) lacks the FP8 metadata of TE's norms: the
    fine-tune load must skip those entries (on the GPU, with TE, strict loading failed on
    ``decoder.final_norm._extra_state``); a TE-written base keeps megatron's default strictness."""
    import io

    import torch.distributed.checkpoint as dcp

    state = {"decoder.final_norm.weight": torch.ones(4), "decoder.layers.0.mixer.dense._extra_state": io.BytesIO()}
    if te_written:
        state["decoder.final_norm._extra_state"] = io.BytesIO()
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(tmp_path / "iter_0000001")), no_dist=True)
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("1")
    cfg = mock_config(mixed_precision_recipe=None, finetune_ckpt_dir=str(tmp_path))
    assert cfg.checkpoint.pretrained_checkpoint == str(tmp_path.resolve())
    assert cfg.checkpoint.dist_ckpt_strictness == ("assume_ok_unexpected" if te_written else "log_unexpected")


def test_cuda_graph_config():
    """``--cuda-graph``: megatron's full-iteration graph, one memory pool per capture, and the host-side NaN checks
    (not capturable) off - the combination Megatron-Bridge's validation accepts; refused on CPU."""
    from megatron.bridge.utils.cuda_graph import is_full_iteration_cuda_graph

    plain = mock_config()
    assert plain.rerun_state_machine.check_for_nan_in_loss and plain.ddp.check_for_nan_in_grad
    assert plain.ddp.grad_reduce_in_fp32 and not plain.ddp.overlap_grad_reduce  # the recipe's, not DDP's defaults
    assert evo2_pretrain_config(grad_reduce_in_fp32=False).ddp.grad_reduce_in_fp32 is False
    assert not is_full_iteration_cuda_graph(plain.model)
    cfg = mock_config(cuda_graph=True)
    assert is_full_iteration_cuda_graph(cfg.model) and not cfg.model.cuda_graph_use_single_mempool
    assert not cfg.rerun_state_machine.check_for_nan_in_loss and not cfg.ddp.check_for_nan_in_grad
    with pytest.raises(ValueError, match="needs a GPU"):
        evo2_pretrain_config(cuda_graph=True, cpu=True)


def test_the_recipe_function_installs_the_megatron_fixes_for_a_scripts_own_pretrain():
    """A script that builds its config with ``evo2_pretrain_config`` and calls Bridge's ``pretrain`` itself gets the
    fixes train_evo2 gets. A fresh interpreter (this process's conftest installed them already): before the call
    megatron's plain optimizer checkpoints with its own method, after it with the fp32-filter-aware one."""
    import subprocess
    import sys

    code = ("from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params as F\n"
            "from evo2_recipe.training.recipe import evo2_pretrain_config\n"
            "mark = lambda: getattr(F.sharded_state_dict, '_evo2_mixed_dtype', False)\n"
            "before = mark(); evo2_pretrain_config('striped_hyena_tiny', mixed_precision_recipe=None, cpu=True)\n"
            "print(before, mark())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == ["False", "True"], out.stdout
