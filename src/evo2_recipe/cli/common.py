"""Shared pieces of the command-line tools: logging setup and the ``--cpu`` switch."""

from __future__ import annotations

import argparse
import logging
import os

from evo2_recipe.utils.log_filters import quiet_dependency_logs


def setup_logging(verbose: bool = False) -> None:
    """Our INFO lines and real warnings by default; with ``verbose`` everything (DEBUG, dependency notices)."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not verbose:
        quiet_dependency_logs()


def add_model_runtime_flags(p: argparse.ArgumentParser) -> None:
    """Precision, kernel and verbosity flags shared by the tools that run a checkpoint (predict, infer)."""
    p.add_argument("--mixed-precision-recipe",
                   help="Megatron-Bridge recipe (bf16_mixed, fp16_mixed, bf16_with_fp8_current_scaling_mixed, ...) or "
                        "fp32; default bf16_mixed on GPU, fp32 on CPU. FP8 recipes need Transformer Engine")
    p.add_argument("--vortex-style-fp8", action="store_true",
                   help="FP8 (delayed scaling) for the Hyena input projections only, as Arc ran the FP8-sensitive "
                        "original 1b/40b checkpoints; use with bf16_mixed. Needs Transformer Engine")
    p.add_argument("--use-subquadratic-ops", action="store_true",
                   help="NVIDIA's subquadratic-ops-torch for the Hyena convolutions where it is installed and serves "
                        "the GPU (checked at start; else evo2-recipe's own kernels, said in the log)")
    p.add_argument("-v", "--verbose", action="store_true", help="DEBUG logging and dependency notices")


def add_cpu_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cpu", action="store_true",
                        help="run on CPU with the gloo backend (also: EVO2_CPU=1; automatic when no GPU is present)")


def apply_runtime_mode(args: argparse.Namespace | None = None) -> bool:
    """CPU mode when asked for (``args.cpu``, ``EVO2_CPU=1``) or when no GPU is present, then the megatron fixes; for
    scripts too, before they import megatron (CPU mode hides Transformer Engine from it). Returns True for CPU."""
    from evo2_recipe.compat import cpu

    if getattr(args, "cpu", False):
        os.environ["EVO2_CPU"] = "1"
    return cpu.enter_runtime(None)
