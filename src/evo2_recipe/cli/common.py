"""Shared pieces of the command-line tools: logging setup and the ``--cpu`` switch."""

from __future__ import annotations

import argparse
import logging
import os
import warnings


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("megatron.bridge.models", "megatron.bridge.utils.import_utils", "megatron.core.models.mimo",
                  "megatron.core.msc_utils", "megatron.core.distributed.fsdp", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Import-time notices about optional accelerators (TE, Apex) that are expected without them.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\..*")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit.*")


def add_cpu_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cpu", action="store_true",
                        help="run on CPU with the gloo backend (also: EVO2_CPU=1; automatic when no GPU is present)")


def apply_runtime_mode(args: argparse.Namespace) -> bool:
    """Apply the megatron fixes, and CPU mode when asked for or when no GPU is present. Returns True for CPU."""
    from evo2_recipe.compat import cpu, megatron_fixes

    megatron_fixes.apply()
    if getattr(args, "cpu", False):
        os.environ["EVO2_CPU"] = "1"
    return cpu.maybe_enable(None)
