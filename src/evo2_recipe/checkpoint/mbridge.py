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

from evo2_recipe.checkpoint.dcp_utils import TRACKER, atomic_output_dir, load_tensors, resolve_iteration_dir, save_tensors
from evo2_recipe.data.tokenizer import default_tokenizer_path

logger = logging.getLogger(__name__)
_NON_MODEL = ("optimizer.", "opt_param_scheduler", "rng_state")
FP32_SUFFIXES = ("filter.h", "filter.decay", "filter.gamma", "filter.R", "filter.p")


class KeyCoverageError(ValueError):
    """Converted tensors do not cover the model exactly; the message lists missing/unexpected/mis-shaped keys."""


def expected_shapes(model_size: str, vocab_size: int = 512) -> dict[str, tuple[int, ...]]:
    """Global tensor shapes of a model size (built on the meta device; includes the ``decay`` buffers)."""
    return expected_shapes_many([model_size], vocab_size)[model_size]


def expected_shapes_many(model_sizes: list[str], vocab_size: int = 512) -> dict[str, dict[str, tuple[int, ...]]]:
    """:func:`expected_shapes` for several sizes in one helper process (megatron needs a process group)."""
    from evo2_recipe.utils.spawn import run_on_ranks

    (shapes,) = run_on_ranks(_meta_shapes, 1, list(model_sizes), vocab_size, cpu=True)
    return shapes


def _meta_shapes(rank, world, model_sizes, vocab_size):
    from megatron.core import parallel_state, tensor_parallel

    from evo2_recipe.models.providers import get_provider

    parallel_state.initialize_model_parallel()
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    out = {}
    for name in model_sizes:
        p = get_provider(name, vocab_size=vocab_size, use_cpu_initialization=True, perform_initialization=False)
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


def write_model_checkpoint(tensors: dict[str, torch.Tensor], out_dir: str | Path, *, model_size: str,
                           params_dtype: torch.dtype = torch.bfloat16, check: bool = True) -> Path:
    """Write a weights-only Megatron-Bridge checkpoint at ``out_dir`` (must not exist)."""
    from evo2_recipe.training.recipe import TrainSettings, build_config

    vocab = tensors["embedding.word_embeddings.weight"].shape[0]
    if vocab not in (256, 512):
        raise ValueError(f"embedding has {vocab} rows; Evo 2 tokenizers have 256 or 512")
    if check:
        check_coverage(tensors, expected_shapes(model_size, vocab), f"{model_size} checkpoint")
    state = {k: v.to(torch.float32 if k.endswith(FP32_SUFFIXES) else params_dtype).contiguous()
             for k, v in tensors.items()}
    cfg = build_config(TrainSettings(model_size=model_size, mock_data=True, max_steps=10, warmup_steps=1,
                                     constant_steps=0, hf_tokenizer_model_path=str(default_tokenizer_path(vocab))))
    cfg.model.vocab_size = vocab
    with atomic_output_dir(out_dir) as tmp:
        iter_dir = tmp / "iter_0000001"
        save_tensors(state, iter_dir)
        cfg.to_yaml(str(iter_dir / "run_config.yaml"))
        shutil.copytree(default_tokenizer_path(vocab), iter_dir / "tokenizer")
        (tmp / TRACKER).write_text("1\n")
    logger.info("wrote %d tensors (%s) to %s", len(state), model_size, out_dir)
    return Path(out_dir)
