"""Read model tensors from, and write weights-only, Megatron-Bridge checkpoints (the converters' common target).

A written checkpoint has the layout ``train_evo2`` produces (``iter_0000001/`` DCP shards, ``run_config.yaml`` with the
provider of ``--model-size``, ``tokenizer/``, tracker files), so ``predict_evo2``, ``infer_evo2`` and
``train_evo2 --finetune-ckpt-dir`` load it. Every writer checks key coverage and shapes against the model first.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch

from evo2_recipe.checkpoint.dcp_utils import TRACKER, atomic_output_dir, load_tensors, resolve_iteration_dir
from evo2_recipe.data.tokenizer import default_tokenizer_path

logger = logging.getLogger(__name__)
_NON_MODEL = ("optimizer.", "opt_param_scheduler", "rng_state")


class KeyCoverageError(ValueError):
    """Converted tensors do not cover the model exactly; the message lists missing/unexpected/mis-shaped keys."""


def split_fc1(fc1: torch.Tensor, ffn_hidden_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bridge's fused MLP input ``linear_fc1`` [2F, H] -> the two projections [F, H] every other format stores."""
    return fc1[:ffn_hidden_size].clone(), fc1[ffn_hidden_size:].clone()


def join_fc1(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`split_fc1`."""
    return torch.cat([first, second], dim=0)


def expected_shapes(model_size: str, vocab_size: int = 512) -> dict[str, tuple[int, ...]]:
    """Global tensor shapes of a model size (built on the meta device; includes the ``decay`` buffers)."""
    return expected_shapes_many([model_size], vocab_size)[model_size]


def expected_shapes_many(model_sizes: list[str], vocab_size: int = 512) -> dict[str, dict[str, tuple[int, ...]]]:
    """:func:`expected_shapes` for several sizes. Megatron builds models only inside a process group: a process in
    CPU mode without one (the converter CLIs) gets a private single-rank group for the build; anywhere else (a
    running job's ranks, whose TP layout would shard the shapes) the build runs in a helper process."""
    import torch.distributed as dist

    from evo2_recipe.compat import cpu as cpu_mode

    if cpu_mode.is_enabled() and not dist.is_initialized():  # no second interpreter start (~20 s on 2 cores)
        from evo2_recipe.utils.distributed import init_distributed, teardown

        init_distributed(cpu=True, seed=0)
        try:
            return _layout_shapes(model_sizes, vocab_size)
        finally:
            teardown()
    from evo2_recipe.utils.spawn import run_on_ranks

    (shapes,) = run_on_ranks(_meta_shapes, 1, list(model_sizes), vocab_size, cpu=True)
    return shapes


# Layout-only builds on the meta device use the local spec: Transformer Engine's linears copy a CPU init into their
# weights whatever the device. The tensors and their keys are the same under both specs; TE's ``_extra_state`` (FP8
# scaling metadata) is not written, and a TE model loading the checkpoint starts it fresh (megatron loads it as None).
META_BUILD = dict(use_te=False, use_cpu_initialization=True, perform_initialization=False)


def _meta_shapes(rank, world, model_sizes, vocab_size):
    from megatron.core import parallel_state, tensor_parallel

    parallel_state.initialize_model_parallel()
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    return _layout_shapes(model_sizes, vocab_size)


def _layout_shapes(model_sizes, vocab_size) -> dict[str, dict[str, tuple[int, ...]]]:
    from evo2_recipe.models.providers import get_provider

    out = {}
    for name in model_sizes:
        p = get_provider(name, vocab_size=vocab_size, **META_BUILD)
        p.finalize()
        with torch.device("meta"):
            model = p.provide()
        out[name] = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    return out


def check_coverage(tensors: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]], what: str) -> None:
    missing = sorted(set(shapes) - set(tensors))
    unexpected = sorted(set(tensors) - set(shapes))
    bad = sorted(f"{k}: {tuple(tensors[k].shape)} != {shapes[k]}" for k in set(shapes) & set(tensors)
                 if tuple(tensors[k].shape) != shapes[k])
    if missing or unexpected or bad:
        raise KeyCoverageError(f"{what}: {len(missing)} missing {missing[:8]}, {len(unexpected)} unexpected "
                               f"{unexpected[:8]}, {len(bad)} wrong shape {bad[:8]}")


def read_model_tensors(ckpt: str | Path) -> tuple[dict[str, torch.Tensor], Path]:
    """Model tensors (full, unsharded) of a Megatron-Bridge checkpoint; optimizer/RNG entries are skipped."""
    iter_dir = resolve_iteration_dir(ckpt)
    return load_tensors(iter_dir, keep=lambda k: not k.startswith(_NON_MODEL)), iter_dir


def checkpoint_tokenizer_dir(tensors: dict[str, torch.Tensor], tokenizer_path: str | Path | None = None) -> Path:
    """The tokenizer a checkpoint of ``tensors`` ships: ``tokenizer_path`` or the bundled one of the embedding's
    vocabulary size, checked against the embedding."""
    from evo2_recipe.data.tokenizer import NucleotideTokenizer

    vocab = tensors["embedding.word_embeddings.weight"].shape[0]
    if vocab not in (256, 512):
        raise ValueError(f"embedding has {vocab} rows; Evo 2 tokenizers have 256 or 512")
    tokenizer_dir = Path(tokenizer_path) if tokenizer_path else default_tokenizer_path(vocab)
    tok_vocab = NucleotideTokenizer(tokenizer_dir).vocab_size
    if tok_vocab != vocab:
        raise ValueError(f"tokenizer {tokenizer_dir} has {tok_vocab} tokens but the embedding has {vocab} rows; use "
                         f"the matching tokenizer (nucleotide_fast_tokenizer_{vocab})")
    return tokenizer_dir


def write_model_checkpoint(tensors: dict[str, torch.Tensor], out_dir: str | Path, *, model_size: str, run_config,
                           tokenizer_dir: str | Path, params_dtype: torch.dtype | None = None) -> Path:
    """Write a weights-only Megatron-Bridge checkpoint at ``out_dir`` (must not exist) from full TP=1 tensors.

    megatron's ``dist_checkpointing.save`` writes the tensors from the sharded state dict of a meta-device model of
    ``model_size`` (so names, shapes and sharding metadata are exactly what training writes and loading expects;
    coverage is checked first). Each tensor keeps its source dtype unless ``params_dtype`` is given; the Hyena filters
    the model keeps in fp32 (``filter.h/decay/p/gamma/R``) are always written in fp32. ``run_config`` (a
    ``ConfigContainer``, built by the caller - see ``training.recipe.converted_checkpoint_config``) is written as
    ``run_config.yaml``: the provider later runs inherit. ``tokenizer_dir`` is copied beside the weights.
    """
    vocab = tensors["embedding.word_embeddings.weight"].shape[0]
    tokenizer_dir = Path(tokenizer_dir)
    with atomic_output_dir(out_dir) as tmp:
        iter_dir = tmp / "iter_0000001"
        _save_with_megatron(tensors, iter_dir, model_size, vocab, params_dtype)
        run_config.to_yaml(str(iter_dir / "run_config.yaml"))
        shutil.copytree(tokenizer_dir, iter_dir / "tokenizer")
        from megatron.bridge.training.state import TrainState

        train_state = TrainState()
        train_state.step = 1
        torch.save(train_state.state_dict(), iter_dir / "train_state.pt")
        shutil.copy2(iter_dir / "train_state.pt", tmp / "latest_train_state.pt")
        (tmp / TRACKER).write_text("1\n")
    logger.info("wrote %d tensors (%s) to %s", len(tensors), model_size, out_dir)
    return Path(out_dir)


def _save_with_megatron(tensors, iter_dir: Path, model_size: str, vocab: int, params_dtype: torch.dtype) -> None:
    import torch.distributed as dist
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    from evo2_recipe.compat import cpu as cpu_mode
    from evo2_recipe.models.providers import get_provider
    from evo2_recipe.utils.distributed import init_distributed, teardown

    own_group = not dist.is_initialized()
    if own_group:  # converters run as plain processes: a 1-process gloo group for megatron's saver
        cpu_mode.maybe_enable(None)
        init_distributed(cpu=True, seed=0)
    try:
        if parallel_state.get_tensor_model_parallel_world_size() * parallel_state.get_pipeline_model_parallel_world_size() \
                * parallel_state.get_context_parallel_world_size() != 1:
            raise RuntimeError("write_model_checkpoint needs a TP=PP=CP=1 layout (it writes full tensors)")
        p = get_provider(model_size, vocab_size=vocab, params_dtype=torch.bfloat16, **META_BUILD)
        p.finalize()
        with torch.device("meta"):
            model = p.provide()
        sharded = model.sharded_state_dict()
        slots = [t for t in nested_values(sharded) if isinstance(t, (ShardedTensor, ShardedTensorFactory))]
        shapes = {t.key: tuple(t.data.shape) for t in slots}
        check_coverage(tensors, shapes, f"{model_size} checkpoint")
        for t in slots:  # the meta model holds fp32 exactly where the model always keeps fp32 (filters)
            dtype = torch.float32 if t.data.dtype == torch.float32 else (params_dtype or tensors[t.key].dtype)
            t.data = tensors[t.key].to(dtype).contiguous()
        iter_dir.mkdir(parents=True)
        dist_checkpointing.save({"model": sharded, "checkpoint_version": 3.0, "iteration": 1,
                                 "content_metadata": {"singleton_local_shards": False,
                                                      "chained_optim_avoid_prefix": True}}, str(iter_dir))
    finally:
        if own_group:
            teardown()
