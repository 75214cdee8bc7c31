"""Load a trained Megatron-Bridge checkpoint for inference: provider from ``run_config.yaml``, strict weight loading.

Unlike the reference (``dist_ckpt_strictness="ignore_all"``), every model tensor must be present in the checkpoint
and every checkpoint tensor must be a model, optimizer or RNG entry; anything else is reported by name.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from evo2_recipe.checkpoint.dcp_utils import resolve_iteration_dir
from evo2_recipe.data.tokenizer import NucleotideTokenizer, default_tokenizer_path
from evo2_recipe.models.precision import apply_precision_recipe

logger = logging.getLogger(__name__)
_NON_MODEL_PREFIXES = ("optimizer.", "opt_param_scheduler", "rng_state")
_RUNTIME_MODEL_FIELDS = ("timers", "init_method", "output_layer_init_method", "embedding_init_method",
                         "finalize_model_grads_func", "grad_scale_func", "no_sync_func", "grad_sync_func",
                         "param_sync_func")


class CheckpointError(ValueError):
    """A checkpoint cannot be used as asked; the message says why and what to do."""


@dataclass
class LoadedModel:
    model: torch.nn.Module
    provider: object
    tokenizer: NucleotideTokenizer
    iter_dir: Path
    num_layers: int  # layers actually built (fewer when extracting embeddings)


def find_checkpoint(path: str | Path) -> Path:
    """The ``iter_*`` folder to read (a folder with run_config.yaml, a training root, or a checkpoints folder)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if not path.is_dir():
        raise NotADirectoryError(f"--ckpt-dir must be a directory, got the file {path}")
    if (path / "checkpoints").is_dir() and not any(path.glob("iter_*")):
        path = path / "checkpoints"
    iter_dir = resolve_iteration_dir(path)
    if not (iter_dir / "run_config.yaml").is_file():
        raise CheckpointError(f"{iter_dir} has no run_config.yaml; is it a Megatron-Bridge training checkpoint?")
    return iter_dir


def _provider_from_run_config(iter_dir: Path):
    import evo2_recipe.models.providers  # noqa: F401  (registers the evo2_recipe. target prefix)
    from megatron.bridge.utils.instantiate_utils import instantiate

    run_config = yaml.safe_load((iter_dir / "run_config.yaml").read_text())
    model_cfg = run_config.get("model")
    if not model_cfg or "_target_" not in model_cfg:
        raise CheckpointError(f"{iter_dir}/run_config.yaml has no model section with a _target_")
    # Runtime objects saved with the config (timers) and callables that finalize() rebuilds are not re-created.
    for key in _RUNTIME_MODEL_FIELDS:
        model_cfg.pop(key, None)
    return instantiate(model_cfg), run_config


def _checkpoint_tokenizer(iter_dir: Path, vocab_rows: int | None) -> NucleotideTokenizer:
    tok_dir = iter_dir / "tokenizer"
    if (tok_dir / "tokenizer.json").is_file():
        tok = NucleotideTokenizer(tok_dir)
    else:
        tok = NucleotideTokenizer(default_tokenizer_path(512 if vocab_rows == 512 else 256))
    return tok


def load_for_inference(ckpt_dir: str | Path, *, tp: int = 1, cp: int = 1, pp: int = 1, sequence_parallel=None,
                       mixed_precision_recipe: str | None = None, vortex_style_fp8: bool | None = None,
                       use_fused_kernels: bool | None = None, embedding_layer: int | None = None,
                       tokenizer_path: str | Path | None = None, model_overrides: dict | None = None) -> LoadedModel:
    """Build the model of ``ckpt_dir`` for the current parallel layout and load its weights strictly.

    Call after :func:`evo2_recipe.utils.distributed.init_distributed`. ``embedding_layer`` (negative allowed) builds
    only the first layers and no head, so the model returns that layer's output (before the final norm).
    ``mixed_precision_recipe`` is a Megatron-Bridge recipe name or ``fp32`` (default: bf16_mixed on GPU, fp32 on
    CPU); ``vortex_style_fp8=True`` turns Vortex-style FP8 on (None keeps the checkpoint's setting).
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedObject, ShardedTensor
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.validation import StrictHandling

    from evo2_recipe.checkpoint.dcp_utils import stored_keys, tensor_keys

    iter_dir = find_checkpoint(ckpt_dir)
    provider, run_config = _provider_from_run_config(iter_dir)
    peft = _peft_from_run_config(run_config)
    base_dir = lora_base_checkpoint(iter_dir, run_config) if peft is not None else None
    ckpt_keys = tensor_keys(base_dir or iter_dir)
    emb = ckpt_keys.get("embedding.word_embeddings.weight")
    vocab_rows = emb.size[0] if emb is not None else None
    tokenizer = NucleotideTokenizer(tokenizer_path) if tokenizer_path else _checkpoint_tokenizer(iter_dir, vocab_rows)
    if vocab_rows is not None and vocab_rows < tokenizer.vocab_size:
        raise CheckpointError(f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} tokens but the checkpoint's "
                              f"embedding has {vocab_rows} rows; use the matching tokenizer "
                              f"(nucleotide_fast_tokenizer_{vocab_rows})")
    for name, value in (model_overrides or {}).items():
        if not hasattr(provider, name):
            raise ValueError(f"unknown model setting {name!r}")
        setattr(provider, name, value)
    if len(provider.hybrid_override_pattern) != provider.num_layers:
        raise ValueError(f"the layer pattern {provider.hybrid_override_pattern!r} has "
                         f"{len(provider.hybrid_override_pattern)} symbols but num_layers is {provider.num_layers}; "
                         f"give both --num-layers and --hybrid-override-pattern")
    provider.vocab_size = vocab_rows or tokenizer.vocab_size
    provider.should_pad_vocab = False
    n = provider.num_layers
    post_process = True
    if embedding_layer is not None:
        target = n + embedding_layer + 1 if embedding_layer < 0 else embedding_layer + 1
        if not 1 <= target <= n:
            raise ValueError(f"Invalid embedding_layer={embedding_layer} for model with {n} layers. "
                             f"Valid range: -{n} to {n - 1}.")
        provider.num_layers = target
        provider.hybrid_override_pattern = provider.hybrid_override_pattern[:target]
        post_process = False
        logger.info("Embedding extraction mode: extracting from layer %d (using %d of %d layers, post_process=False)",
                    embedding_layer, target, n)
    provider.tensor_model_parallel_size, provider.context_parallel_size = tp, cp
    provider.pipeline_model_parallel_size = pp
    provider.sequence_parallel = (tp > 1) if sequence_parallel is None else sequence_parallel
    provider.recompute_granularity = provider.recompute_method = provider.recompute_num_layers = None
    recipe = apply_precision_recipe(provider, mixed_precision_recipe, on_gpu=torch.cuda.is_available())
    if vortex_style_fp8:
        provider.vortex_style_fp8 = True
    if use_fused_kernels is not None:
        provider.use_fused_hyena_kernels = use_fused_kernels
    provider.finalize()  # refuses FP8 without Transformer Engine
    from megatron.core import parallel_state

    model = provider.provide(post_process=post_process and parallel_state.is_pipeline_last_stage())
    if peft is not None:  # adapters grafted onto the base (no merge step); base weights keep their names
        model = peft(model, training=False)
    if torch.cuda.is_available():  # after the adapters exist, so that they move too
        model = model.cuda()
    sharded = model.sharded_state_dict()
    model_keys = {t.key for t in nested_values(sharded) if isinstance(t, (ShardedTensor, ShardedTensorFactory))}
    dropped = (lambda k: _is_dropped_layer_key(k, provider.num_layers)) if embedding_layer is not None else None
    if peft is None:
        sources = [(iter_dir, model_keys)]
    else:  # the LoRA checkpoint holds the adapters and any skip-frozen weights; the base holds everything else
        lora_keys = _model_entries(tensor_keys(iter_dir), dropped)
        adapters = {k for k in model_keys if ".adapter." in k}
        _check_keys(iter_dir, adapters, lora_keys, model_keys)
        sources = [(base_dir, model_keys - lora_keys), (iter_dir, lora_keys)]
    # Non-tensor entries (Transformer Engine's per-module ``_extra_state``, FP8 scaling history) come from the first
    # source; checkpoints written without TE (converters, CPU training) lack them, and those modules start fresh.
    objects_from = stored_keys(sources[0][0])
    objects = {k for k, v in sharded.items() if isinstance(v, ShardedObject) and v.key in objects_from}
    fresh = {k for k, v in sharded.items() if isinstance(v, ShardedObject) and k.endswith("_extra_state")} - objects
    loaded: set[str] = set()
    for n_src, (src, want) in enumerate(sources):
        _check_keys(src, want, _model_entries(tensor_keys(src), dropped), model_keys)
        part = {k: v for k, v in sharded.items() if (k in objects and n_src == 0)
                or (not isinstance(v, ShardedObject) and getattr(v, "key", None) in want)}
        state = dist_checkpointing.load(part, str(src), strict=StrictHandling.ASSUME_OK_UNEXPECTED)
        own = model.state_dict().keys()  # drop the checkpoint's common (non-model) entries merged in by load()
        result = model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
        loaded |= set(own) - set(result.missing_keys)
    unloaded = sorted(set(model.state_dict()) - loaded - fresh)
    if unloaded:
        raise CheckpointError(f"{iter_dir}: {len(unloaded)} model entries not loaded: {unloaded[:10]}")
    model = wrap_for_inference(provider, model)
    logger.info("Model initialized with %d layers (%s%s)", provider.num_layers, recipe,
                ", vortex-style FP8" if provider.vortex_style_fp8 else "")
    return LoadedModel(model, provider, tokenizer, iter_dir, provider.num_layers)


def wrap_for_inference(provider, model: torch.nn.Module) -> torch.nn.Module:
    """``model`` as inference runs it: bf16/fp16 weights on GPU (``provide()`` keeps the Hyena filters fp32), FP8/FP4
    sequence padding where the recipe asks for it, eval mode."""
    if (provider.bf16 or provider.fp16) and torch.cuda.is_available():
        from megatron.core.transformer.module import Float16Module

        model = Float16Module(provider, model)
    if provider.fp8 or provider.fp4:
        from megatron.core.fp8_utils import prepare_model_for_fp8_inference

        prepare_model_for_fp8_inference(model)  # pads sequences to what FP8 GEMMs need (decode steps are 1 token)
    return model.eval()


def _model_entries(keys, dropped=None) -> set[str]:
    """Model tensors of a checkpoint (optimizer, scheduler and RNG entries left out)."""
    return {k for k in keys if not k.startswith(_NON_MODEL_PREFIXES) and not (dropped and dropped(k))}


def _check_keys(src: Path, want: set[str], have: set[str], model_keys: set[str]) -> None:
    """Every wanted tensor is in ``src``; every model tensor of ``src`` is one this model has."""
    missing = sorted(want - have)
    if missing:
        raise CheckpointError(f"{src} lacks {len(missing)} model tensor(s) for this model: {missing[:10]}")
    stray = sorted(have - model_keys)
    if stray:
        raise CheckpointError(f"{src} has {len(stray)} tensor(s) this model does not use: {stray[:10]}")


def lora_base_checkpoint(iter_dir: Path, run_config: dict) -> Path:
    base = (run_config.get("checkpoint") or {}).get("pretrained_checkpoint")
    if not base:
        raise CheckpointError(f"{iter_dir} is a LoRA checkpoint without checkpoint.pretrained_checkpoint in its "
                              f"run_config.yaml; it cannot be used without its base model")
    if not Path(base).exists():
        raise CheckpointError(f"{iter_dir} holds LoRA adapters for the base checkpoint {base}, which does not exist; "
                              f"restore it there, or merge the adapters where it exists (evo2_merge_lora)")
    return find_checkpoint(base)


def _peft_from_run_config(run_config: dict):
    from megatron.bridge.utils.instantiate_utils import instantiate

    cfg = run_config.get("peft")
    return instantiate(cfg) if cfg else None


def _is_dropped_layer_key(key: str, kept_layers: int) -> bool:
    if key.startswith(("decoder.final_norm", "output_layer")):
        return True
    if key.startswith("decoder.layers."):
        return int(key.split(".")[2]) >= kept_layers
    return False
