"""Run a function on N local ranks (gloo, spawned processes) and collect what each returns.

Used by the multi-process CPU tests (TP/CP/PP equivalence) and handy for small local experiments. Each rank enables
CPU mode when asked, initialises ``torch.distributed`` and saves its return value with ``torch.save``.

CPU ranks are forked from a fork server that imported megatron-core and Megatron-Bridge once (a fresh interpreter
spends ~20 s importing them on a 2-core machine); the caller's environment is passed along, since a fork server's
children otherwise see the server's. CUDA ranks are spawned fresh: forking after CUDA initialisation is unsafe.
"""

from __future__ import annotations

import logging
import os
import pickle
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from evo2_recipe.utils.log_filters import dependency_logs_quiet, quiet_dependency_logs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# What the fork server imports before forking ranks (an import that fails here is retried in the rank).
_FORK_SERVER_PRELOAD = ["evo2_recipe.compat.cpu", "evo2_recipe.training.recipe", "evo2_recipe.inference.api"]


def fork_server_context():
    """The multiprocessing context whose processes fork from a server that has imported :data:`_FORK_SERVER_PRELOAD`
    (started on first use, shared by every later process of this interpreter). Not for CUDA work."""
    ctx = mp.get_context("forkserver")
    # Where Transformer Engine is installed the server imports no megatron: its CPU-mode ranks hide TE from megatron,
    # which they can only do before megatron is imported (compat.megatron_fixes.hide_transformer_engine).
    from evo2_recipe.compat.megatron_fixes import transformer_engine_installed

    ctx.set_forkserver_preload(_FORK_SERVER_PRELOAD[:1] if transformer_engine_installed() else _FORK_SERVER_PRELOAD)
    _start_fork_server_without_gpus()
    return ctx


def _start_fork_server_without_gpus() -> None:
    """Start the fork server (if it is not running) with no GPU visible. On a GPU host its imports could initialise
    CUDA, and a child forked from a process with CUDA initialised fails on its first CUDA call ("Cannot re-initialize
    CUDA in forked subprocess", which TorchDynamo's stream lookup makes even in CPU mode: seen on the H200). Children
    get the caller's environment back (:func:`start_like_a_fresh_process`), so they may still use a GPU."""
    from multiprocessing import forkserver

    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    try:
        forkserver.ensure_running()
    finally:
        if saved is None:
            del os.environ["CUDA_VISIBLE_DEVICES"]
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved


def start_like_a_fresh_process(environ: dict[str, str]) -> None:
    """In a fork-server child: the caller's environment and no logging configured, as a new interpreter starts (the
    server's imports configured some - a dependency's ``basicConfig`` on stdout - which would turn the child's own
    ``basicConfig`` into a no-op)."""
    os.environ.clear()
    os.environ.update(environ)
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(logging.WARNING)


def _rank_entry(rank: int, world_size: int, port: int, out_dir: str, cpu: bool, quiet: bool, call: bytes,
                environ: dict[str, str]) -> None:
    start_like_a_fresh_process(environ)
    if quiet:  # spawned processes start with fresh logging: keep the parent's default-verbosity filter
        logging.basicConfig(level=logging.INFO)
        quiet_dependency_logs()
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    from evo2_recipe.compat import cpu as cpu_mode

    cpu_mode.enter_runtime(cpu)  # as the CLIs start: CPU mode or not, with the compat fixes
    # Only now import fn's module (unpickling it does): CPU mode must come before megatron's import to hide TE.
    fn, args = pickle.loads(call)
    dist.init_process_group("gloo" if cpu else "nccl", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def run_on_ranks(fn: Callable[..., Any], world_size: int, *args: Any, cpu: bool = True) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned ranks; return their results in rank order.

    ``fn`` must be importable by name (defined at module level). A failure on any rank raises here.
    """
    if cpu:
        fork_server_context()  # sets what the server imports before it starts
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(
            _rank_entry, args=(world_size, free_port(), out_dir, cpu, dependency_logs_quiet(),
                               pickle.dumps((fn, args)), dict(os.environ)),
            nprocs=world_size, start_method="forkserver" if cpu else "spawn", join=True,
        )
        return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
