"""``evo2_merge_lora --lora-ckpt-dir LORA --dst-ckpt-dir OUT``: a dense checkpoint with the LoRA adapters merged."""

from __future__ import annotations

import argparse
import sys

from evo2_recipe.cli.common import apply_runtime_mode, setup_logging


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="evo2_merge_lora", description=__doc__)
    p.add_argument("--lora-ckpt-dir", required=True, help="checkpoint of a train_evo2 --lora-finetune run")
    p.add_argument("--dst-ckpt-dir", required=True, help="output checkpoint root (must not exist)")
    p.add_argument("-v", "--verbose", action="store_true", help="DEBUG logging and dependency notices")
    args = p.parse_args(argv)
    setup_logging(args.verbose)
    cpu = apply_runtime_mode(args)  # before megatron's import (CPU mode without a GPU or with EVO2_CPU=1)
    from evo2_recipe.checkpoint.lora_merge import merge_lora_checkpoint
    from evo2_recipe.inference.loading import CheckpointError
    from evo2_recipe.utils.distributed import init_distributed, teardown

    init_distributed(cpu=cpu, seed=0)
    try:
        merge_lora_checkpoint(args.lora_ckpt_dir, args.dst_ckpt_dir)
    except (FileNotFoundError, FileExistsError, CheckpointError, ValueError) as e:
        p.exit(2, f"evo2_merge_lora: error: {e}\n")
    finally:
        teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
