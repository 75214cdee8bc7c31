"""Fused Triton kernels for the Hyena operators; each has its plain-PyTorch twin in ``operators.py`` as test oracle.

The fused path is chosen automatically on CUDA when Triton imports (``config.use_fused_hyena_kernels=None``);
``use_fused_hyena_kernels=False`` (or ``EVO2_FUSED_KERNELS=0``) turns it off. On CPU the tests run the kernels under
Triton's interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import importlib.util
import os

import torch


def fused_kernels_enabled(config, x: torch.Tensor) -> bool:
    choice = getattr(config, "use_fused_hyena_kernels", None)
    if choice is False or os.environ.get("EVO2_FUSED_KERNELS") == "0":
        return False
    if importlib.util.find_spec("triton") is None:
        return False
    if choice is None:
        return x.is_cuda
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def describe_subquadratic_request() -> str:
    """What ``--use-subquadratic-ops`` (the reference's flag) does here, for the log."""
    if importlib.util.find_spec("subquadratic_ops_torch") is not None:
        return ("--use-subquadratic-ops: subquadratic_ops_torch is installed, but this version runs evo2-recipe's "
                "own fused Triton kernels (the NVIDIA package is not wired in yet)")
    return "--use-subquadratic-ops: subquadratic_ops_torch is not installed; using evo2-recipe's fused Triton kernels"
