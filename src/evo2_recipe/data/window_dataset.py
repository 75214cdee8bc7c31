"""Window datasets: train straight from a FASTA file (``--fasta-data``) or from Sharded-Eden SQLite data (spec 2.16).

Both cut sequences into fixed windows and build the same sample (spec 2.16 "an item"):

    seq     = sequence[start : start + S - 2].upper()     (reverse-complemented with p=0.5 under ``rc_aug``)
    tokens  = [BOS] + tokenize(seq) + [EOS], right-padded with PAD to S
    labels  = tokens shifted left by one, the last label PAD
    mask    = 0 where the label is BOS/EOS/SEP/PAD, else 1

Window starts are ``0, stride, 2*stride, ...``: one window if the sequence is shorter than the window, else
``1 + (len - window) // stride``, optionally dropping windows whose effective length ``min(window, len - start)`` is
below a threshold. Sharded-Eden stores them in window databases (``metadata`` + ``window_mappings`` tables) next to
per-sample sequence databases ``<sequence_db_dir>/<sample>/glm_dataset_<sample>.sqlite`` with table
``sequences(contig_id, nt_sequence)``; :mod:`evo2_recipe.cli.precompute_windows` writes both. A FASTA file is read
into memory once and its records are split into train/validation/test by a stable hash of the record id.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from evo2_recipe.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, SEP_ID

logger = logging.getLogger(__name__)
_SPECIAL = (BOS_ID, EOS_ID, SEP_ID, PAD_ID)
_COMPLEMENT = bytes.maketrans(b"ACGTacgt", b"TGCAtgca")  # N and other characters unchanged
SPLITS = ("train", "validation", "test")
FASTA_SPLIT_PERCENT = (90, 5, 5)  # train / validation / test share of FASTA records (by hash of the record id)


def window_starts(length: int, window: int, stride: int, min_length: int = 0) -> list[int]:
    """Start of every window of a sequence of ``length`` (spec 2.16's count), short windows dropped."""
    count = 1 if length < window else 1 + (length - window) // stride
    return [i * stride for i in range(count) if min(window, length - i * stride) >= min_length]


def reverse_complement(seq: str) -> str:
    return seq.encode("ascii").translate(_COMPLEMENT)[::-1].decode("ascii")


def window_sample(seq: str, seq_length: int) -> dict[str, torch.Tensor]:
    """The training sample of one window's (already cut, upper-cased) sequence."""
    body = np.frombuffer(seq.encode("ascii"), dtype=np.uint8).astype(np.int64)[:seq_length - 2]
    tokens = np.full(seq_length + 1, PAD_ID, dtype=np.int64)
    tokens[0] = BOS_ID
    tokens[1:1 + body.size] = body
    tokens[1 + body.size] = EOS_ID
    labels = tokens[1:seq_length + 1].copy()
    labels[-1] = PAD_ID
    tokens = torch.from_numpy(tokens[:seq_length].copy())
    labels = torch.from_numpy(labels)
    return {"tokens": tokens, "labels": labels, "loss_mask": (~torch.isin(labels, torch.tensor(_SPECIAL))).float(),
            "position_ids": torch.arange(seq_length)}


class WindowDataset(torch.utils.data.Dataset):
    """Windows ``(sequence key, start)`` of sequences read through ``fetch(key, start, length) -> str``."""

    def __init__(self, windows: list[tuple[str, int]], fetch: Callable[[str, int, int], str], seq_length: int, *,
                 rc_aug: bool = False, seed: int = 1234):
        self.windows, self.fetch, self.seq_length = windows, fetch, seq_length
        self.rc_aug, self.seed = rc_aug, seed

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        key, start = self.windows[idx]
        seq = self.fetch(key, start, self.seq_length - 2).upper()
        # Deterministic per (seed, index): resumed runs and every data-parallel layout see the same augmentation.
        if self.rc_aug and np.random.default_rng((self.seed, int(idx))).random() < 0.5:
            seq = reverse_complement(seq)
        return window_sample(seq, self.seq_length)


class ResampledDataset(torch.utils.data.Dataset):
    """``num_samples`` draws from ``dataset``: whole epochs, each in its own seeded order when ``shuffle``."""

    def __init__(self, dataset: torch.utils.data.Dataset, num_samples: int, *, shuffle: bool, seed: int):
        if len(dataset) == 0:
            raise ValueError("the dataset has no windows; check the input and the window/stride settings")
        self.dataset, self.num_samples, self.shuffle, self.seed = dataset, num_samples, shuffle, seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, idx: int):
        n = len(self.dataset)
        epoch, i = divmod(int(idx), n)
        if self.shuffle:
            i = int(np.random.default_rng((self.seed, epoch)).permutation(n)[i])
        return self.dataset[i]


# ---- FASTA ----------------------------------------------------------------------------------------------------------
def fasta_split(record_id: str) -> str:
    """Split of a FASTA record: stable across runs and machines (CRC32 of the id)."""
    bucket = zlib.crc32(record_id.encode()) % 100
    train, val, _ = FASTA_SPLIT_PERCENT
    return "train" if bucket < train else "validation" if bucket < train + val else "test"


def fasta_window_datasets(fasta_file: str, seq_length: int, stride: int, *, min_length: int = 0,
                          rc_aug: bool = False, seed: int = 1234) -> dict[str, WindowDataset]:
    """Train/validation/test :class:`WindowDataset` of a FASTA file (a split without records uses all records)."""
    from evo2_recipe.data.fasta import iter_fasta

    records = dict(iter_fasta(fasta_file))
    by_split = {s: [r for r in records if fasta_split(r) == s] for s in SPLITS}
    for split, ids in by_split.items():
        if not ids:
            logger.warning("%s: no record hashes into the %s split (%d records); it uses every record",
                           fasta_file, split, len(records))
            by_split[split] = list(records)

    def fetch(key: str, start: int, length: int) -> str:
        return records[key][start:start + length]

    def windows(ids):
        return [(r, start) for r in ids for start in window_starts(len(records[r]), seq_length, stride, min_length)]

    return {split: WindowDataset(windows(ids), fetch, seq_length, rc_aug=rc_aug and split == "train", seed=seed)
            for split, ids in by_split.items()}


# ---- Sharded Eden ---------------------------------------------------------------------------------------------------
def sample_id(contig_id: str) -> str:
    """Sample of a contig id (spec 2.16): ``BCR__ECT-SAMPLE1__CT1-1`` -> ``SAMPLE1``."""
    parts = contig_id.split("__")
    if len(parts) < 2 or "-" not in parts[1]:
        raise ValueError(f"contig id {contig_id!r} does not name its sample as <x>__<y>-<sample>__<z>")
    return ".".join(parts[1].split("-")[1:])


def _read_only(path: Path) -> sqlite3.Connection:
    if not path.is_file():
        raise FileNotFoundError(f"SQLite database not found: {path}")
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)


class SequenceDatabases:
    """Read-only access to ``<root>/<sample>/glm_dataset_<sample>.sqlite``; connections opened per process."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.files = sorted(self.root.glob("*/glm_dataset_*.sqlite"))
        if not self.files:
            raise FileNotFoundError(f"--sequence-db-dir {root}: no <sample>/glm_dataset_<sample>.sqlite databases")
        self._conns: dict[Path, sqlite3.Connection] = {}

    def __getstate__(self):  # dataloader workers open their own connections
        return {"root": self.root, "files": self.files, "_conns": {}}

    def _db(self, contig_id: str) -> sqlite3.Connection:
        path = self.files[0] if len(self.files) == 1 else \
            self.root / (s := sample_id(contig_id)) / f"glm_dataset_{s}.sqlite"
        if path not in self._conns:
            self._conns[path] = _read_only(path)
        return self._conns[path]

    def __call__(self, contig_id: str, start: int, length: int) -> str:
        row = self._db(contig_id).execute("SELECT substr(nt_sequence, ?, ?) FROM sequences WHERE contig_id = ?",
                                          (start + 1, length, contig_id)).fetchone()
        if row is None:
            raise KeyError(f"contig {contig_id!r} is not in the sequence databases under {self.root}")
        return row[0]


def read_window_db(path: str | Path, seq_length: int, stride: int, min_length: int = 0) -> list[tuple[str, int]]:
    """Windows ``(contig_id, start)`` of a window database, after checking its metadata against the run's settings."""
    with contextlib.closing(_read_only(Path(path))) as conn:
        meta = dict(conn.execute("SELECT key, value FROM metadata").fetchall())
        checks = [("window_size", seq_length, "--seq-length"), ("stride", stride, "--stride")]
        for key, want, flag in checks:
            if key not in meta or int(meta[key]) != want:
                raise ValueError(f"{path}: window database has {key}={meta.get(key)} but {flag} is {want}; use the "
                                 f"same value or precompute the windows again")
        stored = int(meta.get("window_min_length_threshold", 0) or 0)
        if stored != min_length:
            raise ValueError(f"{path}: window database was built with window_min_length_threshold={stored} but "
                             f"--window-min-length-threshold is {min_length}; they must match")
        rows = conn.execute("SELECT sequence_id, window_in_seq_idx FROM window_mappings ORDER BY window_idx")
        return [(seq_id, int(w) * stride) for seq_id, w in rows]


def write_window_db(path: str | Path, lengths: dict[str, int], window: int, stride: int, min_length: int = 0) -> int:
    """Write a window database for contigs of the given lengths (sorted by id); returns the number of windows."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} already exists; choose a new path or remove it")
    tmp = path.with_name(path.name + ".partial")
    tmp.unlink(missing_ok=True)
    with contextlib.closing(sqlite3.connect(tmp)) as conn:
        conn.execute("CREATE TABLE metadata (key TEXT PRIMARY KEY, value TEXT)")
        conn.execute("CREATE TABLE window_mappings (window_idx INTEGER PRIMARY KEY, sequence_id TEXT, "
                     "window_in_seq_idx INTEGER)")
        rows, n = [], 0
        for contig in sorted(lengths):
            for start in window_starts(lengths[contig], window, stride, min_length):
                rows.append((n, contig, start // stride))
                n += 1
        conn.executemany("INSERT INTO window_mappings VALUES (?, ?, ?)", rows)
        conn.execute("CREATE INDEX idx_sequence_id ON window_mappings(sequence_id)")
        meta = {"window_size": window, "stride": stride, "total_windows": n, "distinct_sequences": len(lengths)}
        if min_length:
            meta["window_min_length_threshold"] = min_length
        conn.executemany("INSERT INTO metadata VALUES (?, ?)", [(k, str(v)) for k, v in meta.items()])
        conn.commit()
    tmp.rename(path)
    return n


def eden_window_datasets(sequence_db_dir: str, window_dbs: dict[str, str], seq_length: int, stride: int, *,
                         min_length: int = 0, rc_aug: bool = False, seed: int = 1234) -> dict[str, WindowDataset]:
    fetch = SequenceDatabases(sequence_db_dir)
    return {split: WindowDataset(read_window_db(db, seq_length, stride, min_length), fetch, seq_length,
                                 rc_aug=rc_aug and split == "train", seed=seed)
            for split, db in window_dbs.items()}
