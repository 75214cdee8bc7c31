"""``evo2_remove_optimizer``: copy a Megatron-Bridge checkpoint without optimizer, scheduler and RNG state.

The result is a weights-only checkpoint with the same layout (``iter_XXXXXXX/``, tracker files, ``run_config.yaml``,
``train_state.pt``, ``tokenizer/``) that ``train_evo2 --finetune-ckpt-dir``, ``predict_evo2`` and ``infer_evo2``
accept. Written to a temporary folder and renamed when complete.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch

from evo2_recipe.checkpoint.dcp_utils import (
    TRACKER,
    atomic_output_dir,
    load_entries,
    resolve_iteration_dir,
    save_tensors,
)

logger = logging.getLogger(__name__)
DROP_PREFIXES = ("optimizer.", "opt_param_scheduler", "rng_state")
COPY_FILES = ("run_config.yaml", "train_state.pt", "metadata.json")


def remove_optimizer(src: str | Path, dst: str | Path, replace: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``dst`` (must not exist) holding only the model tensors of checkpoint ``src``. Returns ``dst``.

    ``replace`` swaps in new values for existing model tensors (same key, shape; cast to the stored dtype).
    """
    iter_dir = resolve_iteration_dir(src)
    root = iter_dir.parent
    # Model tensors plus non-optimizer bytes entries (e.g. the common state Megatron-Bridge reads back on load).
    state = load_entries(iter_dir, keep=lambda k: not k.startswith(DROP_PREFIXES))
    if not any(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{iter_dir} holds no model tensors")
    for key, value in (replace or {}).items():
        old = state.get(key)
        if not isinstance(old, torch.Tensor) or old.shape != value.shape:
            raise ValueError(f"{iter_dir}: cannot replace {key} ({None if old is None else tuple(old.shape)}) with "
                             f"a {tuple(value.shape)} tensor")
        state[key] = value.detach().to("cpu", old.dtype).contiguous()
    with atomic_output_dir(dst) as tmp:
        out_iter = tmp / iter_dir.name
        save_tensors(state, out_iter)
        for name in COPY_FILES:
            if (iter_dir / name).exists():
                shutil.copy2(iter_dir / name, out_iter / name)
        if (iter_dir / "tokenizer").is_dir():
            shutil.copytree(iter_dir / "tokenizer", out_iter / "tokenizer")
        if (iter_dir / "common.pt").exists():
            common = torch.load(iter_dir / "common.pt", weights_only=True)
            common.pop("optimizer", None)
            common.pop("opt_param_scheduler", None)
            common.get("content_metadata", {}).pop("distrib_optim_sharding_type", None)
            torch.save(common, out_iter / "common.pt")
        (tmp / TRACKER).write_text(str(int(iter_dir.name.split("_")[1])) + "\n")
        if (root / "latest_train_state.pt").exists():
            shutil.copy2(root / "latest_train_state.pt", tmp / "latest_train_state.pt")
    logger.info("wrote %d entries of %s to %s", len(state), iter_dir, dst)
    return Path(dst)
