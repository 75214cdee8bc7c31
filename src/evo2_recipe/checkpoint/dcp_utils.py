"""Helpers for Megatron-Bridge torch_dist (DCP) checkpoints: locating iterations, reading tensors, atomic output."""

from __future__ import annotations

import contextlib
import io
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

TRACKER = "latest_checkpointed_iteration.txt"


def resolve_iteration_dir(path: str | Path) -> Path:
    """``iter_XXXXXXX`` folder of a checkpoint: the path itself, the tracker's iteration, or the last ``iter_*``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if re.fullmatch(r"iter_\d+", path.name) and (path / ".metadata").is_file():
        return path
    tracker = path / TRACKER
    if tracker.is_file():
        it = tracker.read_text().strip()
        candidate = path / f"iter_{int(it):07d}" if it.isdigit() else None
        if candidate is not None and candidate.is_dir():
            return candidate
    iters = sorted(p for p in path.glob("iter_*") if p.is_dir())
    if not iters:
        raise FileNotFoundError(f"{path} is not a Megatron-Bridge checkpoint: no iter_* folder or {TRACKER}")
    return iters[-1]


def tensor_keys(iter_dir: Path) -> dict[str, TensorStorageMetadata]:
    """Tensor entries of a DCP checkpoint (bytes entries such as RNG state are skipped)."""
    md = dcp.FileSystemReader(str(iter_dir)).read_metadata()
    return {k: v for k, v in md.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}


def stored_keys(iter_dir: Path) -> set[str]:
    """Every entry of a DCP checkpoint, sharded objects under their own key (``name/shard_0_1`` -> ``name``)."""
    md = dcp.FileSystemReader(str(iter_dir)).read_metadata()
    return {k.split("/shard_")[0] for k in md.state_dict_metadata}


@contextlib.contextmanager
def _single_process():
    """``no_dist=True`` is the intent here; torch warns about it on every call."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def load_tensors(iter_dir: Path, keep=lambda key: True) -> dict[str, torch.Tensor]:
    """Load full (unsharded) tensors of ``iter_dir`` whose key passes ``keep``, without a process group."""
    meta = tensor_keys(iter_dir)
    state = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items() if keep(k)}
    with _single_process():
        dcp.load(state, storage_reader=dcp.FileSystemReader(str(iter_dir)), no_dist=True)
    return state


def load_entries(iter_dir: Path, keep=lambda key: True) -> dict:
    """Like :func:`load_tensors` but also keeps non-tensor (bytes) entries, as the Python objects they hold."""
    md = dcp.FileSystemReader(str(iter_dir)).read_metadata()
    state = {}
    for k, m in md.state_dict_metadata.items():
        if not keep(k):
            continue
        state[k] = torch.empty(m.size, dtype=m.properties.dtype) if isinstance(m, TensorStorageMetadata) \
            else io.BytesIO()
    with _single_process():
        dcp.load(state, storage_reader=dcp.FileSystemReader(str(iter_dir)), no_dist=True)
    return state


def save_tensors(state: dict[str, torch.Tensor], iter_dir: Path) -> None:
    iter_dir.mkdir(parents=True, exist_ok=True)
    # flatten_state_dict=False: container values (megatron's ShardedObject payloads) stay single bytes entries.
    with _single_process():
        dcp.save(state, storage_writer=dcp.FileSystemWriter(str(iter_dir), single_file_per_rank=True), no_dist=True,
                 planner=DefaultSavePlanner(flatten_state_dict=False))


@contextlib.contextmanager
def atomic_output_dir(dst: str | Path) -> Iterator[Path]:
    """Yield a temporary folder next to ``dst``; rename it to ``dst`` only if the block succeeds."""
    dst = Path(dst)
    if dst.exists():
        raise FileExistsError(f"output {dst} already exists; choose a new path or remove it")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        yield tmp
        tmp.chmod(0o755)
        tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
