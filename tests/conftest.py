"""Test setup: CPU mode for megatron (no GPU in CI) unless CUDA is present; GPU tests skip without CUDA."""

import importlib.util
import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("WANDB_MODE", "offline")

if not torch.cuda.is_available():
    # Triton kernels run on CPU tensors under Triton's interpreter (read once, when triton is first imported).
    os.environ.setdefault("TRITON_INTERPRET", "1")
    from evo2_recipe.compat import cpu

    cpu.enable()
elif importlib.util.find_spec("transformer_engine") is not None:
    # Transformer Engine loads cuDNN through ctypes on first import. Imported after torch has loaded its own cuDNN (a
    # kernel test ran attention first), it picked the H200 image's system libcudnn_heuristic, which failed on the
    # mixed versions ("undefined symbol ... libcudnn_graph.so.9"; thirteenth session): import it before any test.
    import transformer_engine.pytorch  # noqa: F401


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
