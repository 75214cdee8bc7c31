"""Mixed-precision recipe names -> provider settings, through Megatron-Bridge's own recipe registry.

``train_evo2`` hands the recipe to Bridge's ``ConfigContainer``; inference tools call :func:`apply_precision_recipe`
so the same names mean the same thing everywhere (``bf16_mixed``, ``fp16_mixed``, ``bf16_with_fp8_*``, ...), plus
``fp32``. Unknown names are errors listing Bridge's recipes; FP8/FP4 without Transformer Engine is an error raised by
the provider (see :mod:`evo2_recipe.models.hyena.quantization`) - never a silent bf16 run.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)
FP32 = "fp32"
# Models for longer contexts than this run FP8/FP4 inference without Transformer Engine's cache of quantised weights.
FP8_WEIGHT_CACHE_MAX_CONTEXT = 1 << 16


def mixed_precision_config(recipe: str | None):
    """Bridge's ``MixedPrecisionConfig`` for ``recipe`` (None or ``fp32``: None, i.e. full precision)."""
    if recipe is None or recipe.replace("-", "_") in (FP32, "32", "fp32_mixed"):
        return None
    from megatron.bridge.training.mixed_precision import get_mixed_precision_config

    return get_mixed_precision_config(recipe)  # ValueError naming every known recipe


def validate_recipe_name(recipe: str | None) -> None:
    mixed_precision_config(recipe)


def apply_precision_recipe(provider, recipe: str | None, *, on_gpu: bool) -> str:
    """Set dtype / FP8 fields of ``provider`` for inference; returns the recipe in effect.

    ``recipe=None`` means bf16_mixed on GPU and fp32 on CPU. CPU inference always computes in fp32 (bf16/fp16 matmuls
    are slow or missing there): an explicit bf16/fp16 recipe on CPU is logged and run in fp32; FP8/FP4 are refused.
    """
    effective = recipe or ("bf16_mixed" if on_gpu else FP32)
    mp = mixed_precision_config(effective)
    provider.fp8 = provider.fp4 = None
    if mp is None:
        provider.bf16 = provider.fp16 = False
        provider.params_dtype = torch.float32
        return FP32
    mp.finalize()
    mp.setup(provider)
    if not on_gpu and not (mp.fp8 or mp.fp4):
        logger.warning("running on CPU: --mixed-precision-recipe %s is applied on GPU only; computing in fp32",
                       effective)
        provider.bf16 = provider.fp16 = False
        provider.params_dtype = torch.float32
        return FP32
    provider.fp8_param = False  # weights are loaded in high precision; TE quantizes them per GEMM
    # Megatron hands TE's linears `is_first_microbatch`, so TE keeps every layer's quantised weights between forwards
    # (1 byte per parameter: 6 GiB of evo2_7b's FP8 forward at 131,072 tokens, 32.9 GiB in all). A long-context model
    # re-quantises them per forward instead - a few ms against seconds - and a short-context one keeps the cache.
    provider.disable_parameter_transpose_cache = bool((mp.fp8 or mp.fp4)
                                                      and provider.seq_length > FP8_WEIGHT_CACHE_MAX_CONTEXT)
    if mp.fp8 and mp.fp8_recipe == "delayed":
        logger.warning(
            "%s for inference: Transformer Engine updates delayed-scaling factors only while gradients are on, so "
            "scoring and generation use the factors stored with the checkpoint, or 1.0 where it stores none "
            "(converted and bf16-trained checkpoints): on a random-weight evo2_1b_base that left the logits 109%% "
            "off the bf16 ones (benchmarks/RESULTS.md). For FP8 inference use bf16_with_fp8_current_scaling_mixed.",
            effective)
    return effective
