"""Shared pieces of the command-line tools: logging setup and the ``--cpu`` switch."""

from __future__ import annotations

import argparse
import logging
import os
import warnings


# Loggers whose sub-WARNING records are dependency chatter. Some reset their own level and attach their own handler
# when imported (megatron.bridge.utils.import_utils logs a traceback per optional import it probes), so a filter on
# the logger object - which survives both - is what silences them; it must be installed before megatron is imported.
_CHATTY = ("megatron.bridge.utils.import_utils", "megatron.bridge.models", "megatron.core.models.mimo",
           "megatron.core.msc_utils", "megatron.core.distributed.fsdp", "torch.distributed")
# Warnings that describe this machine, not a problem: CPU runs have no CUDA runtime; TE/Apex are optional.
_EXPECTED = ("No CUDA runtime is found",)


class _DependencyNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING and record.name.startswith(_CHATTY):
            return False
        return not str(record.msg).startswith(_EXPECTED)


_NOISE = _DependencyNoise()


def setup_logging(verbose: bool = False) -> None:
    """Our INFO lines and real warnings by default; with ``verbose`` everything (DEBUG, dependency notices)."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if verbose:
        return
    for name in (*_CHATTY, "torch.utils.cpp_extension"):
        logging.getLogger(name).addFilter(_NOISE)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_NOISE)
    # Import-time notices about optional accelerators (TE, Apex) and deprecations inside dependencies.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\..*")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"(megatron|torch)\..*")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(megatron|torch)\..*")


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
