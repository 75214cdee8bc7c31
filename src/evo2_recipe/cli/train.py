"""``train_evo2``: train an Evo 2 / StripedHyena 2 model with Megatron-Bridge's ``pretrain``.

    torchrun --nproc-per-node 8 --no-python train_evo2 -d data.yaml --model-size evo2_1b_base \\
        --micro-batch-size 2 --global-batch-size 64 model.num_layers=4 optimizer.lr=3e-4

Flags follow the reference recipe and are listed, with where each value goes, in ``cli/train_flags.py``; trailing
``KEY=VALUE`` pairs are Hydra overrides on the ``ConfigContainer`` that ``evo2_pretrain_config`` returns. Flags the
reference accepts but ignores either work here or are refused with an explanation.
"""

from __future__ import annotations

import argparse
import logging
import sys

from evo2_recipe.cli.common import add_cpu_flag, apply_runtime_mode, setup_logging
from evo2_recipe.cli.train_flags import add_flags, recipe_defaults, set_key, split_args

logger = logging.getLogger("train_evo2")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train_evo2", description="Train an Evo2/Hyena-family model. Each flag's help "
                                "ends with where its value goes: a ConfigContainer key or a parameter of the recipe "
                                "function evo2_pretrain_config, whose defaults apply to flags not given "
                                "(--print-config shows the resolved config).")
    add_flags(p)
    add_cpu_flag(p)
    p.add_argument("overrides", nargs="*", help="Hydra-style overrides, e.g. model.num_layers=4 optimizer.lr=3e-4")
    return p


def config_from_args(args: argparse.Namespace, cpu: bool):
    """The recipe's ``ConfigContainer`` with the given flags and Hydra overrides applied, checked."""
    from evo2_recipe.training.recipe import apply_overrides, default_run_name, evo2_pretrain_config

    recipe, keys = split_args(args)
    for o in args.overrides:
        if "=" not in o:
            raise SystemExit(f"train_evo2: unrecognised argument {o!r} (overrides look like section.key=value)")
    recipe.setdefault("mixed_precision_recipe", None if cpu else "bf16_mixed")
    cfg = evo2_pretrain_config(**recipe, cpu=cpu)
    for key, value in keys.items():
        set_key(cfg, key, value)
    if "logger.wandb_exp_name" not in keys:  # the name reflects the flags
        cfg.logger.wandb_exp_name = default_run_name(
            cfg, recipe.get("model_size", recipe_defaults()["model_size"]), recipe["mixed_precision_recipe"],
            recipe.get("activation_checkpointing", "default"), recipe.get("spike_no_more_embedding_init", False))
    return apply_overrides(cfg, args.overrides)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)  # section.key=value overrides may sit among flags
    setup_logging(getattr(args, "verbose", False))
    if getattr(args, "wandb_offline", False):
        import os

        os.environ["WANDB_MODE"] = "offline"
    cpu = apply_runtime_mode(args)
    from megatron.bridge.training.pretrain import pretrain

    from evo2_recipe.training.forward_step import hyena_forward_step

    try:
        cfg = config_from_args(args, cpu)
    except (ValueError, FileNotFoundError, KeyError) as e:
        raise SystemExit(f"train_evo2: error: {e}") from None
    if getattr(args, "print_config", False):
        cfg.print_yaml()
        return 0
    logger.info("model size %s, run directory %s", getattr(args, "model_size", recipe_defaults()["model_size"]),
                str(cfg.checkpoint.save).removesuffix("/checkpoints"))
    from evo2_recipe.training.metrics import ThroughputCallback

    pretrain(cfg, hyena_forward_step, callbacks=[ThroughputCallback()])
    if not cfg.checkpoint.async_save:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
