"""``evo2_merge_lora``: fold a LoRA checkpoint's adapters into its base and write a dense checkpoint.

The LoRA model is loaded as predict/infer load it (base + grafted adapters, strictly), each adapter is folded into
its base weight (``W + alpha/dim * B @ A``; TP-aware, so a checkpoint trained at any TP merges in one process), and
the base checkpoint is copied with the merged weights - and any skip-frozen weights the LoRA run trained - put in
place, in the base's dtypes. The result has no PEFT section and is used like any trained checkpoint (predict, infer,
fine-tuning, the Vortex exporter).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


def merge_lora_checkpoint(lora_ckpt: str | Path, dst: str | Path) -> Path:
    """Write the merged dense checkpoint of ``lora_ckpt`` to ``dst`` (must not exist). Call after init_distributed."""
    from evo2_recipe.checkpoint.dcp_utils import tensor_keys
    from evo2_recipe.checkpoint.remove_optimizer import DROP_PREFIXES, remove_optimizer
    from evo2_recipe.inference.loading import (
        CheckpointError,
        find_checkpoint,
        load_for_inference,
        lora_base_checkpoint,
    )
    from evo2_recipe.models.lora import merge_lora_

    import yaml

    iter_dir = find_checkpoint(lora_ckpt)
    run_config = yaml.safe_load((iter_dir / "run_config.yaml").read_text())
    if not run_config.get("peft"):
        raise CheckpointError(f"{iter_dir} is not a LoRA checkpoint (its run_config.yaml has no peft section)")
    base = lora_base_checkpoint(iter_dir, run_config)
    loaded = load_for_inference(lora_ckpt, mixed_precision_recipe="fp32")  # merge in fp32, store in base dtypes
    n = merge_lora_(loaded.model)
    state = {k: v for k, v in loaded.model.state_dict().items() if not k.endswith("_extra_state")}
    stored = {k for k in tensor_keys(base) if not k.startswith(DROP_PREFIXES)}
    if stored - set(state):
        raise CheckpointError(f"merged model lacks {sorted(stored - set(state))[:10]} of base checkpoint {base}")
    out = remove_optimizer(base, dst, replace={k: state[k] for k in stored})
    logger.info("merged %d LoRA adapters of %s into the weights of %s: %s", n, iter_dir, base, out)
    return out
