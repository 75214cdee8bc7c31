"""Run train_evo2 as a user would (console script / torchrun) and parse its log."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from cli_helpers import run_cli

BIN = Path(sys.executable).parent
LOSS_RE = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?lm loss: ([0-9.E+-]+)")
VAL_RE = re.compile(r"validation loss at iteration (\d+) \| lm loss value: ([0-9.E+-]+)")

TINY = ["--mock-data", "--model-size", "striped_hyena_tiny", "--seq-length", "64", "--micro-batch-size", "2",
        "--global-batch-size", "4", "--warmup-steps", "1", "--constant-steps", "0", "--eval-iters", "1",
        "--workers", "0", "--log-interval", "1", "--lr", "1e-3", "--cpu"]


def train_cmd(args, nproc=1):
    if nproc == 1:
        return [str(BIN / "train_evo2"), *args]
    return [str(BIN / "torchrun"), "--nproc-per-node", str(nproc), "--master-port", str(_port()), "--no-python",
            str(BIN / "train_evo2"), *args]


def _port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_train(args, nproc=1, timeout=600, check=True, fresh=False):
    """train_evo2 on ``nproc`` ranks (torchrun), or as one process forked from the warm server (``fresh``: a new
    interpreter, for checks of its whole output; see cli_helpers)."""
    env = {"EVO2_CPU": "1", "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    if nproc == 1:
        proc = run_cli("train_evo2", *args, env=env, timeout=timeout, fresh=fresh)
    else:
        proc = subprocess.run(train_cmd(args, nproc), capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **env})
    if check and proc.returncode != 0:
        raise AssertionError(f"train_evo2 failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def losses(text):
    return {int(i): float(v) for i, v in LOSS_RE.findall(text)}


def val_losses(text):
    return {int(i): float(v) for i, v in VAL_RE.findall(text)}


def fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    return path
