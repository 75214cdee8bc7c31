"""NeMo2 -> Megatron-Bridge (spec 5.4): ``<ckpt>/weights`` is a torch_dist checkpoint whose model keys carry a
``module.`` prefix; the prefix is stripped, nothing else changes. ``context/`` is not needed (the model comes from
``--model-size``)."""

from __future__ import annotations

from pathlib import Path

import torch

from evo2_recipe.checkpoint.dcp_utils import load_tensors


def read_nemo2_model_tensors(ckpt_dir: str | Path) -> dict[str, torch.Tensor]:
    weights = Path(ckpt_dir) / "weights"
    if not (weights / ".metadata").is_file():
        raise FileNotFoundError(f"{ckpt_dir} is not a NeMo2 checkpoint: expected {weights}/.metadata "
                                f"(a torch_dist checkpoint under weights/)")
    state = load_tensors(weights, keep=lambda k: k.startswith("module."))
    if not state:
        raise ValueError(f"{weights} has no 'module.'-prefixed model tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}
