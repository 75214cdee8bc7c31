"""CPU mode runs real megatron-core code: 2-process gloo tensor parallelism and dist_checkpointing."""

import os

import pytest
import torch
import torch.nn.functional as F

from evo2_recipe.compat import cpu as cpu_mode

# Read before this module imports megatron: a CPU rank running one of its functions has to be in CPU mode by then.
_CPU_MODE_BEFORE_MEGATRON = cpu_mode.is_enabled()

from megatron.core import parallel_state, tensor_parallel  # noqa: E402

from evo2_recipe.utils.spawn import run_on_ranks  # noqa: E402

IN, HID = 16, 32
SEQ, BATCH = 6, 2


def _full_weights():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(HID, IN, generator=g), torch.randn(HID, generator=g),
            torch.randn(IN, HID, generator=g), torch.randn(IN, generator=g), torch.randn(SEQ, BATCH, IN, generator=g))


def _tp_column_row(rank, world, sequence_parallel):
    """ColumnParallelLinear -> RowParallelLinear on `world` TP ranks with fixed full weights."""
    from megatron.core import ModelParallelConfig

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    tensor_parallel.model_parallel_cuda_manual_seed(1)
    cfg = ModelParallelConfig(tensor_model_parallel_size=world, sequence_parallel=sequence_parallel,
                              use_cpu_initialization=True, params_dtype=torch.float32)
    init = torch.nn.init.zeros_
    col = tensor_parallel.ColumnParallelLinear(IN, HID, config=cfg, init_method=init, bias=True, gather_output=False)
    row = tensor_parallel.RowParallelLinear(HID, IN, config=cfg, init_method=init, bias=True, input_is_parallel=True,
                                            skip_bias_add=False)
    w1, b1, w2, b2, x = _full_weights()
    shard = HID // world
    with torch.no_grad():
        col.weight.copy_(w1[rank * shard:(rank + 1) * shard])
        col.bias.copy_(b1[rank * shard:(rank + 1) * shard])
        row.weight.copy_(w2[:, rank * shard:(rank + 1) * shard])
        row.bias.copy_(b2)
    if sequence_parallel:
        x = x.chunk(world, dim=0)[rank]
    x = x.clone().requires_grad_(True)
    h, _ = col(x)
    y, _ = row(F.gelu(h))
    (y.square().sum()).backward()
    if sequence_parallel:  # megatron leaves SP bias grads partial; DDP would all-reduce them over TP
        torch.distributed.all_reduce(row.bias.grad, group=parallel_state.get_tensor_model_parallel_group())
    return {"y": y.detach(), "x_grad": x.grad, "w1_grad": col.weight.grad, "b1_grad": col.bias.grad,
            "w2_grad": row.weight.grad, "b2_grad": row.bias.grad}


def _tp_column_row_without_and_with_sp(rank, world):
    """Both sequence-parallel settings in one spawned group (one spawn instead of two)."""
    results = []
    for sp in (False, True):
        results.append(_tp_column_row(rank, world, sp))
        parallel_state.destroy_model_parallel()
    return results


def _reference():
    w1, b1, w2, b2, x = _full_weights()
    params = [t.clone().requires_grad_(True) for t in (w1, b1, w2, b2, x)]
    w1, b1, w2, b2, x = params
    y = F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)
    y.square().sum().backward()
    return y.detach(), [p.grad for p in params]


def test_tensor_parallel_linear_matches_single_process():
    (one,) = run_on_ranks(_tp_column_row, 1, False)
    y_ref, (g_w1, g_b1, g_w2, g_b2, g_x) = _reference()
    # gradients: atol 1e-4 on values of magnitude ~5 - fp32 sums in another order (gloo reduction, CPU kernels)
    torch.testing.assert_close(one["y"], y_ref, rtol=1e-5, atol=1e-5)
    per_rank = run_on_ranks(_tp_column_row_without_and_with_sp, 2)
    for i, sp in enumerate((False, True)):
        ranks = [r[i] for r in per_rank]
        cat_seq = (lambda k: torch.cat([r[k] for r in ranks], dim=0)) if sp else (lambda k: ranks[0][k])
        torch.testing.assert_close(cat_seq("y"), one["y"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cat_seq("x_grad"), one["x_grad"], rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(torch.cat([r["w1_grad"] for r in ranks]), one["w1_grad"], rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(torch.cat([r["b1_grad"] for r in ranks]), one["b1_grad"], rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(torch.cat([r["w2_grad"] for r in ranks], 1), one["w2_grad"], rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(ranks[0]["b2_grad"], one["b2_grad"], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(one["w1_grad"], g_w1, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(one["x_grad"], g_x, rtol=1e-5, atol=1e-4)


def _gpt_logits_and_checkpoint(rank, world, ckpt_dir, mode, seed):
    """Tiny megatron GPTModel (local spec): save its dist checkpoint or load one, and return full logits."""
    from megatron.core import dist_checkpointing
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    cfg = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, use_cpu_initialization=True,
                            tensor_model_parallel_size=world, normalization="RMSNorm", bias_activation_fusion=False,
                            masked_softmax_fusion=False, bias_dropout_fusion=False, apply_rope_fusion=False,
                            gradient_accumulation_fusion=False, persist_layer_norm=False)
    torch.manual_seed(seed)
    model = GPTModel(cfg, get_gpt_layer_local_spec(normalization="RMSNorm"), vocab_size=64, max_sequence_length=16,
                     position_embedding_type="rope")
    if mode == "load":
        state = dist_checkpointing.load(model.sharded_state_dict(), ckpt_dir)
        model.load_state_dict(state)
    tokens = torch.arange(24).reshape(2, 12) % 64
    positions = torch.arange(12).expand(2, 12)
    model.eval()
    with torch.no_grad():
        logits = model(tokens, positions, attention_mask=None)
    logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits)
    if mode == "save":
        dist_checkpointing.save(model.sharded_state_dict(), ckpt_dir)
    return logits


def _fresh_then_loaded(rank, world, ckpt_dir, seed):
    """One process: a model of another seed, then the same model with the checkpoint loaded."""
    fresh = _gpt_logits_and_checkpoint(rank, world, ckpt_dir, "none", seed)
    parallel_state.destroy_model_parallel()
    return fresh, _gpt_logits_and_checkpoint(rank, world, ckpt_dir, "load", seed)


def test_dist_checkpointing_round_trip_across_tp(tmp_path):
    saved = run_on_ranks(_gpt_logits_and_checkpoint, 2, str(tmp_path), "save", 7)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name == "metadata.json") == ["metadata.json"]
    torch.testing.assert_close(saved[0], saved[1])
    ((fresh, loaded),) = run_on_ranks(_fresh_then_loaded, 1, str(tmp_path), 99)
    assert (fresh - saved[0]).abs().max() > 1e-3  # a different seed gives different weights ...
    torch.testing.assert_close(loaded, saved[0], rtol=1e-5, atol=1e-5)  # ... until TP=2 weights are loaded at TP=1


# Every megatron / Megatron-Bridge attribute the compat layer replaces or relies on (module, attribute). If an upgrade
# renames one, this fails loudly instead of the patch being silently skipped.
PATCH_TARGETS = [
    ("megatron.core.tensor_parallel.random", "_get_cuda_rng_state"),
    ("megatron.core.tensor_parallel.random", "_set_cuda_rng_state"),
    ("megatron.core.datasets.utils", "compile_helpers"),
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer"),
    ("megatron.core.optimizer.distrib_optimizer", "HAVE_APEX_OR_TE"),
    ("megatron.core.optimizer.optimizer", "Float16OptimizerWithFloat16Params"),
    ("megatron.core.dist_checkpointing.optimizer", "get_param_id_to_sharded_param_map"),
    ("megatron.core.dist_checkpointing.optimizer", "make_sharded_optimizer_tensor"),
    ("megatron.core.dist_checkpointing.optimizer", "optim_state_to_sharding_state"),
    ("megatron.bridge.training.initialize", "initialize_megatron"),
    ("megatron.bridge.training.initialize", "_set_random_seed"),
    ("megatron.bridge.training.initialize", "compile_helpers"),
    ("megatron.bridge.training.setup", "initialize_megatron"),
    ("megatron.bridge.peft.utils", "HAVE_TE"),
    ("megatron.core.extensions.transformer_engine", "HAVE_TE"),
]


@pytest.mark.parametrize("module,attribute", PATCH_TARGETS)
def test_compat_patch_targets_exist_in_the_installed_versions(module, attribute):
    import importlib

    from evo2_recipe.compat import megatron_fixes

    megatron_fixes.apply()
    assert hasattr(importlib.import_module(module), attribute), \
        f"{module}.{attribute} is gone: update evo2_recipe.compat for this megatron / Megatron-Bridge version"
    if module.endswith("distrib_optimizer") and attribute == "DistributedOptimizer":
        assert hasattr(importlib.import_module(module).DistributedOptimizer, "state_dict")


def test_importing_library_modules_patches_nothing():
    """Importing providers / recipe / lora leaves megatron as installed; an entry point (``apply``) patches it."""
    import subprocess
    import sys

    code = (
        "import megatron.core.datasets.utils as du\n"
        "original = du.compile_helpers\n"
        "import evo2_recipe.models.providers, evo2_recipe.training.recipe, evo2_recipe.models.lora\n"
        "from megatron.core.optimizer import distrib_optimizer as dopt\n"
        "import torch\n"
        "assert du.compile_helpers is original, 'compile_helpers patched at import'\n"
        "assert not getattr(dopt.DistributedOptimizer.state_dict, '_evo2', False), 'optimizer patched at import'\n"
        "assert torch.cuda.is_available.__module__.startswith('torch'), 'torch.cuda patched at import'\n"
        "from evo2_recipe.compat import megatron_fixes\n"
        "megatron_fixes.apply()\n"
        "assert du.compile_helpers is not original\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "EVO2_CPU"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_te_spec_is_the_default_only_with_a_visible_gpu(monkeypatch):
    """A GPU host with TE installed but no GPU visible (CUDA_VISIBLE_DEVICES="", CPU ranks) builds the local spec:
    TE's layers raise "TransformerEngine needs CUDA" (H200, fork-server ranks of test_hyena_decode)."""
    from evo2_recipe.compat import megatron_fixes
    from evo2_recipe.models.providers import get_provider

    monkeypatch.setattr(megatron_fixes, "transformer_engine_available", lambda: True)
    for gpu in (False, True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda gpu=gpu: gpu)
        assert megatron_fixes.te_spec_by_default() is gpu
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    p = get_provider("striped_hyena_tiny", vocab_size=512)
    p.finalize()
    assert p.use_te is False


def test_cpu_mode_hides_an_installed_transformer_engine_from_megatron(tmp_path):
    """``--cpu`` on a host with Transformer Engine: megatron binds TE's Adam and multi-tensor kernels at import, and
    those take CUDA tensors only. A stand-in TE package on the path records its import: without CPU mode megatron
    imports it (the control); after train_evo2's runtime setup with ``--cpu`` it never runs, megatron takes torch's
    optimizer and the models TE's absence; CPU mode chosen after the import says so. With torch.cuda standing in for
    a GPU host, CPU mode says no GPU is there, as on CI (H200: TorchDynamo's Triton probe and TorchInductor's cache
    key behind megatron's fused bias-dropout looked up the properties of CUDA device "cpu")."""
    import subprocess
    import sys

    (tmp_path / "site" / "transformer_engine").mkdir(parents=True)
    marker = tmp_path / "imported"
    (tmp_path / "site" / "transformer_engine" / "__init__.py").write_text(f"open({str(marker)!r}, 'a').write('x')\n")
    env = {**os.environ, "EVO2_CPU": "0",
           "PYTHONPATH": os.pathsep.join(p for p in (str(tmp_path / "site"), os.environ.get("PYTHONPATH")) if p)}

    def run(code, check=True):
        marker.unlink(missing_ok=True)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
        assert out.returncode == 0 or not check, out.stderr[-3000:]
        ours = [w for line in out.stdout.splitlines() if line.startswith("R:") for w in line.split()[1:]]
        return ours, marker.exists(), out.stderr

    _, imported, _ = run("import megatron.core.optimizer", check=False)  # (megatron then fails on the stand-in)
    assert imported  # the stand-in is found where a real TE would be
    out, imported, _ = run(
        "import argparse, torch\nfrom evo2_recipe.cli.common import apply_runtime_mode\n"
        "torch.cuda.is_available, torch.cuda.device_count = lambda: True, lambda: 1\n"  # a GPU host
        "torch.cuda._lazy_init = lambda: None\n"
        "print('R:', apply_runtime_mode(argparse.Namespace(cpu=True)), torch.cuda.is_available(),\n"
        "      torch.cuda.device_count())\n"
        "try:\n    torch.cuda.get_device_properties(torch.cuda.current_device())\n"
        "except RuntimeError:\n    print('R: no-device')\n"
        "import megatron.core.optimizer as o\nfrom evo2_recipe.compat import megatron_fixes as f\n"
        "print('R:', o.USING_PYTORCH_OPTIMIZER, f.transformer_engine_available(), f.te_spec_by_default(),\n"
        "      f.transformer_engine_installed())\n"
        "try:\n    import transformer_engine\nexcept ImportError:\n    print('R: hidden')\n")
    assert out == ["True", "False", "0", "no-device", "True", "False", "False", "True", "hidden"] and not imported, out
    _, imported, err = run("import transformer_engine\nfrom evo2_recipe.compat import cpu\ncpu.enable()", check=False)
    assert imported and "CPU mode chosen after Transformer Engine was imported" in err, err[-2000:]


def _cpu_mode_when_this_module_imported_megatron(rank, world):
    return _CPU_MODE_BEFORE_MEGATRON


def test_a_cpu_rank_enters_cpu_mode_before_importing_the_module_of_its_function():
    """A rank imports its function's module - here one that imports megatron at the top, as tests and scripts do -
    only after entering CPU mode, which hides Transformer Engine: before, megatron bound TE in such ranks on the H200
    and a local-spec GPT ran TE's CUDA-only RMSNorm on CPU tensors (test_dist_checkpointing_round_trip_across_tp)."""
    assert run_on_ranks(_cpu_mode_when_this_module_imported_megatron, 1) == [True]


def test_the_fork_server_preloads_megatron_unless_te_is_installed():
    """CPU ranks fork from a server that imported megatron (~20 s saved per rank on 2 cores), except where TE is
    installed: there each rank hides TE before importing megatron itself. TE hidden in this process still counts as
    installed, and TE absent (CI) as absent (an import finder that hides TE answers ``find_spec`` for it)."""
    from multiprocessing import forkserver

    from evo2_recipe.compat.megatron_fixes import transformer_engine_installed
    from evo2_recipe.utils.spawn import _FORK_SERVER_PRELOAD, fork_server_context

    fork_server_context()
    preload = forkserver._forkserver._preload_modules
    assert preload == (_FORK_SERVER_PRELOAD[:1] if transformer_engine_installed() else _FORK_SERVER_PRELOAD)
    if not torch.cuda.is_available():  # the CPU machines: no TE there
        assert preload == _FORK_SERVER_PRELOAD
