"""FP8 / FP4 contexts for the Hyena stack, entered exactly where megatron's ``TransformerBlock`` enters them.

megatron only enters its quantization contexts inside ``TransformerBlock``; a custom stack must do it itself or an
FP8 recipe silently runs in bf16. The rules copied here (megatron-core 0.19 ``transformer_block.py``):

* build time: each layer is built under ``get_fp8_context(config, layer_no, is_init=True)`` (FP8 parameters);
* delayed scaling: one context around the whole stack (amax reduction needs every layer in one context);
* any other FP8 recipe, and FP4: one context per layer, so ``first_last_layers_bf16`` keeps the ends in bf16.

Vortex-style FP8 (``vortex_style_fp8``, spec 2.7/2.13) is how Arc ran the FP8-sensitive checkpoints: only each
Hyena layer's input projection (``dense_projection``) runs in FP8 with ``DelayedScaling(HYBRID, amax history 16,
"max")``; the sequence is zero-padded to a multiple of 16 for the FP8 GEMM and trimmed after.

Without Transformer Engine megatron's ``get_fp8_context`` is a silent no-op, so every FP8/FP4 request is refused
here with a message naming Transformer Engine.
"""

from __future__ import annotations

import functools
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from evo2_recipe.compat.megatron_fixes import transformer_engine_available

# FP8 GEMMs in Transformer Engine need the flattened token dimension divisible by 8 (16 is safe for every recipe).
FP8_SEQUENCE_MULTIPLE = 16


def low_precision_request(config) -> str | None:
    """A short description of the FP8/FP4 work ``config`` asks for, or None."""
    asked = [name for name, on in (("fp8=" + str(config.fp8), bool(getattr(config, "fp8", None))),
                                   ("fp4=" + str(getattr(config, "fp4", None)), bool(getattr(config, "fp4", None))),
                                   ("vortex_style_fp8", bool(getattr(config, "vortex_style_fp8", False)))) if on]
    return ", ".join(asked) or None


def require_transformer_engine(config) -> None:
    """Refuse FP8/FP4 without Transformer Engine (megatron would silently run in bf16)."""
    asked = low_precision_request(config)
    if asked and not transformer_engine_available():
        raise ValueError(f"{asked} needs NVIDIA Transformer Engine (transformer_engine.pytorch), which does not "
                           f"import here. Install it (pip install transformer-engine[pytorch], or use an NGC PyTorch "
                           f"container), or choose a recipe without FP8/FP4 such as bf16_mixed.")
    if asked and getattr(config, "use_te", None) is False:  # local layers ignore TE's FP8 contexts
        raise ValueError(f"{asked} needs the Transformer Engine layer spec; it cannot run with use_te=False")


def _is_delayed(config) -> bool:
    from megatron.core.enums import Fp8Recipe

    return config.fp8_recipe == Fp8Recipe.delayed


def stack_context(config):
    """Context around the whole stack: FP8 delayed scaling only."""
    if config.fp8 and _is_delayed(config):
        from megatron.core.fp8_utils import get_fp8_context

        return get_fp8_context(config)
    return nullcontext()


def layer_context(config, layer_no: int, *, is_init: bool = False):
    """Context around one layer (``layer_no`` is the 0-based global index), at build time or in the forward pass."""
    if config.fp8 and (is_init or not _is_delayed(config)):
        from megatron.core.fp8_utils import get_fp8_context

        return get_fp8_context(config, layer_no, is_init=is_init)
    if getattr(config, "fp4", None):
        from megatron.core.fp4_utils import get_fp4_context

        return get_fp4_context(config, layer_no, is_init=is_init)
    return nullcontext()


def pad_sequence_to_multiple(fn, x_LBH: torch.Tensor, multiple: int):
    """``fn(x)`` with ``x`` zero-padded along the sequence (dim 0) to a multiple, outputs trimmed back.

    Exact for row-wise maps such as a linear layer: padded rows never mix with real ones.
    """
    L = x_LBH.shape[0]
    pad = -L % multiple
    if pad == 0:
        return fn(x_LBH)
    out = fn(F.pad(x_LBH, (0, 0, 0, 0, 0, pad)))
    if isinstance(out, tuple):
        return (out[0][:L], *out[1:])
    return out[:L]


@functools.cache
def _vortex_recipe():
    from transformer_engine.common.recipe import DelayedScaling, Format

    return DelayedScaling(fp8_format=Format.HYBRID, amax_history_len=16, amax_compute_algo="max")


def hyena_input_projection(config, projection, x_LBH: torch.Tensor):
    """``projection(x)``; in FP8 delayed scaling with sequence padding when ``config.vortex_style_fp8``."""
    if not getattr(config, "vortex_style_fp8", False):
        return projection(x_LBH)
    import transformer_engine.pytorch as te
    from megatron.core import parallel_state

    group = (parallel_state.get_amax_reduction_group(with_context_parallel=True)
             if parallel_state.model_parallel_is_initialized() else None)
    with te.fp8_autocast(enabled=True, fp8_recipe=_vortex_recipe(), fp8_group=group):
        if config.sequence_parallel:  # the input is this rank's slice; the all-gathered length must already fit
            full = x_LBH.shape[0] * parallel_state.get_tensor_model_parallel_world_size()
            if full % FP8_SEQUENCE_MULTIPLE:
                raise ValueError(f"vortex_style_fp8 with sequence parallelism needs the sequence length "
                                 f"({full}) to be a multiple of {FP8_SEQUENCE_MULTIPLE}")
            return projection(x_LBH)
        return pad_sequence_to_multiple(projection, x_LBH, FP8_SEQUENCE_MULTIPLE)


def recompute_checkpoint(config, fn, *args):
    """Activation recompute of ``fn(*args)``: TE's checkpoint under FP8/FP4 (it replays the FP8 scaling state, as
    megatron's ``TransformerBlock`` does), megatron's ``tensor_parallel.checkpoint`` otherwise."""
    from megatron.core import parallel_state, tensor_parallel

    if config.fp8 or getattr(config, "fp4", None):
        from megatron.core.extensions.transformer_engine import te_checkpoint

        return te_checkpoint(fn, config.distribute_saved_activations, tensor_parallel.random.get_cuda_rng_tracker,
                             parallel_state.get_tensor_model_parallel_group(), *args)
    return tensor_parallel.checkpoint(fn, config.distribute_saved_activations, *args)
