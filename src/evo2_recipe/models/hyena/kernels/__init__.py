"""Fused Triton kernels for the Hyena operators; each has its plain-PyTorch twin in ``operators.py`` as test oracle.

On by default on CUDA (:func:`fused_kernels_enabled`), each measured faster than its plain twin on an H200
(benchmarks/RESULTS.md): the hcs/hcm/hcl prologue and epilogue (``gating.py``), the hcl modal filter
(``modal_filter.py``), the one-token decode step (``hyena_decode.py``), the residual join (``residual.py``), the MLP
gates (``glu.py``), the local spec's RoPE (``rope.py``) and, for inference (no autograd), hcm as blocked Toeplitz
GEMMs with the gate fused (``medium_conv.py``, 4.3x the FFT path at 8,192 tokens), hcl as a chunked scan over its 16
modes instead of the FFT (``modal_conv.py``, 3.2-9.2x), the local spec's norms reading the fp32 stream directly
(``rms_norm.py``) and the residual join with the MLP's norm (``residual.py``). Under autograd hcm/hcl's FFT
convolution takes a hand-derived backward (``fft_conv.py``, torch's FFTs; the one member that is not Triton).
Opt-in (:func:`opt_in_kernels_enabled`): the split-KV decode attention (``decode_attention.py``), slower than the
masked SDPA at every cache depth measured. ``use_fused_hyena_kernels=False`` on the provider or
``EVO2_FUSED_KERNELS=0`` turns every kernel off (the plain operators); ``True`` / ``=1`` also turns on the opt-in one.
``--use-subquadratic-ops`` (``use_subquadratic_ops``) hands the Hyena convolutions to NVIDIA's package where it serves
(``subquadratic.py``). On CPU the tests run the kernels under Triton's interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import importlib.util
import os

import torch


def _asked(config) -> bool | None:
    """The user's kernel choice: False (provider flag False or ``EVO2_FUSED_KERNELS=0``), True (flag True or
    ``EVO2_FUSED_KERNELS=1``), or None (no choice)."""
    choice = getattr(config, "use_fused_hyena_kernels", None)
    env = os.environ.get("EVO2_FUSED_KERNELS")
    if choice is False or env == "0":
        return False
    return True if (choice or env == "1") else None


def opt_in_kernels_enabled(config, x: torch.Tensor) -> bool:
    """The kernel not measured faster than its plain twin on an H200 - the split-KV decode attention: only when asked
    for (and on CUDA, or under the Triton interpreter)."""
    if not _asked(config) or importlib.util.find_spec("triton") is None:
        return False
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def fused_kernels_enabled(config, x: torch.Tensor) -> bool:
    """The Hyena kernels (prologue/epilogue, modal filter, one-token decode step, inference hcm/hcl convolutions),
    each measured faster than its plain twin on the GPU: on for CUDA tensors unless turned off
    (``use_fused_hyena_kernels=False`` or ``EVO2_FUSED_KERNELS=0``); on the CPU only when asked for under the Triton
    interpreter (tests)."""
    asked = _asked(config)
    if asked is False or importlib.util.find_spec("triton") is None:
        return False
    if x.is_cuda:
        return True
    return bool(asked) and os.environ.get("TRITON_INTERPRET") == "1"
