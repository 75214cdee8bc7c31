"""Window data sources (issue 13 item 6): ``--fasta-data --fasta-file`` and ``--sharded-eden-data`` on real genomes.

The sample layout is checked against the spec's definition written out independently here; the SQLite databases are
built by ``evo2_precompute_windows`` from the bundled phiX174-like genomes, then ``train_evo2`` trains on them.
"""

import math
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from evo2_recipe.data import window_dataset as wd
from evo2_recipe.data.fasta import iter_fasta
from train_helpers import TINY, losses, run_train, val_losses

ROOT = Path(__file__).resolve().parents[1]
PHAGES = ROOT / "examples/data/wichman2005_phix174_like.fasta"
BIN = Path(sys.executable).parent


def test_window_starts_follow_the_spec_count():
    assert wd.window_starts(100, 200, 50) == [0]  # shorter than the window: one window
    assert wd.window_starts(200, 200, 50) == [0]
    assert wd.window_starts(451, 200, 50) == [0, 50, 100, 150, 200, 250]  # 1 + (451 - 200) // 50
    assert wd.window_starts(451, 200, 50, min_length=200) == [0, 50, 100, 150, 200, 250]
    assert wd.window_starts(100, 200, 50, min_length=101) == []


def test_window_sample_layout():
    seq = "ACGTN" * 3  # 15 bases into a 12-token window: 10 bases fit between BOS and EOS
    s = wd.window_sample(seq[:10], 12)
    want = [2] + [ord(c) for c in seq[:10]] + [0]  # BOS, bases, EOS (no padding needed)
    assert s["tokens"].tolist() == want[:12] and s["labels"].tolist() == want[1:12] + [1]
    assert s["loss_mask"].tolist() == [1.0] * 10 + [0.0, 0.0]  # EOS and PAD labels are not predicted
    short = wd.window_sample("ACG", 8)
    assert short["tokens"].tolist() == [2, 65, 67, 71, 0, 1, 1, 1]
    assert short["labels"].tolist() == [65, 67, 71, 0, 1, 1, 1, 1]
    assert short["loss_mask"].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    assert wd.reverse_complement("AACGTN") == "NACGTT"


def test_rc_augmentation_is_deterministic_and_about_half():
    seqs = {"a": "AAAAAAAAAA"}
    ds = wd.WindowDataset([("a", 0)] * 200, lambda k, s, n: seqs[k][s:s + n], 12, rc_aug=True, seed=3)
    flipped = [ds[i]["tokens"][1].item() == ord("T") for i in range(200)]
    assert 60 < sum(flipped) < 140
    assert flipped == [ds[i]["tokens"][1].item() == ord("T") for i in range(200)]


def test_sample_id_and_resampling():
    assert wd.sample_id("BCR__ECT-SAMPLE1__CT1-1") == "SAMPLE1"
    assert wd.sample_id("X__A-b-c__Y") == "b.c"
    with pytest.raises(ValueError, match="does not name its sample"):
        wd.sample_id("plain_contig")
    base = list(range(7))
    r = wd.ResampledDataset(base, 21, shuffle=True, seed=0)
    epochs = [sorted(r[i] for i in range(e * 7, e * 7 + 7)) for e in range(3)]
    assert epochs == [base] * 3  # every epoch is a permutation of the data
    assert [r[i] for i in range(7)] != [r[i] for i in range(7, 14)]  # in a different order


def test_precompute_windows_and_metadata_checks(tmp_path):
    tool = str(BIN / "evo2_precompute_windows")
    subprocess.run([tool, "sequences", str(PHAGES), str(tmp_path / "db"), "--sample-id", "phage"], check=True,
                   capture_output=True)
    r = subprocess.run([tool, "precompute", str(tmp_path / "db/phage.parquet"), str(tmp_path / "w.sqlite"),
                        "--window-size", "2048", "--stride", "2000"], capture_output=True, text=True, check=True)
    records = dict(iter_fasta(PHAGES))
    expected = sum(len(wd.window_starts(len(s), 2048, 2000)) for s in records.values())
    assert f"Wrote {expected} window(s) of {len(records)} contig(s)" in r.stdout
    windows = wd.read_window_db(tmp_path / "w.sqlite", 2048, 2000)
    assert len(windows) == expected
    fetch = wd.SequenceDatabases(tmp_path / "db")
    contig, start = windows[1]
    assert fetch(contig, start, 2046) == records[contig][start:start + 2046]  # SQLite substr is 1-based
    with pytest.raises(ValueError, match="window_size=2048 but --seq-length is 1024"):
        wd.read_window_db(tmp_path / "w.sqlite", 1024, 2000)
    with pytest.raises(ValueError, match="window_min_length_threshold=0 but --window-min-length-threshold is 5"):
        wd.read_window_db(tmp_path / "w.sqlite", 2048, 2000, 5)
    again = subprocess.run([tool, "precompute", str(tmp_path / "db/phage.parquet"), str(tmp_path / "w.sqlite")],
                           capture_output=True, text=True)
    assert again.returncode == 1 and "already exists" in again.stderr
    with sqlite3.connect(tmp_path / "w.sqlite") as conn:
        assert dict(conn.execute("SELECT key, value FROM metadata"))["total_windows"] == str(expected)


def _train(tmp_path, name, data_flags):
    flags = [f for f in TINY if f != "--mock-data"]
    flags[flags.index("--seq-length") + 1] = "256"
    return run_train([*data_flags, *flags, "--max-steps", "6", "--eval-interval", "3", "--stride", "200",
                      "--result-dir", str(tmp_path / name), "--disable-tensorboard-logger"])


def test_train_from_fasta_file_and_from_sharded_eden(tmp_path):
    fasta = _train(tmp_path, "fasta", ["--fasta-data", "--fasta-file", str(PHAGES), "--rc-aug"])
    tool = str(BIN / "evo2_precompute_windows")
    subprocess.run([tool, "sequences", str(PHAGES), str(tmp_path / "db"), "--sample-id", "phage"], check=True,
                   capture_output=True)
    for split in ("train", "val", "test"):  # the same contigs in each split: this checks the pipeline
        subprocess.run([tool, "precompute", str(tmp_path / "db/phage.parquet"), str(tmp_path / f"{split}.sqlite"),
                        "--window-size", "256", "--stride", "200"], check=True, capture_output=True)
    eden = _train(tmp_path, "eden", ["--sharded-eden-data", "--sequence-db-dir", str(tmp_path / "db"),
                                     *[a for s in ("train", "val", "test")
                                       for a in (f"--{s}-window-db", str(tmp_path / f"{s}.sqlite"))]])
    for run in (fasta, eden):
        l, v = losses(run.stdout), val_losses(run.stdout)
        assert sorted(l) == list(range(1, 7)) and all(math.isfinite(x) for x in l.values())
        # real DNA from a random init: the loss starts near ln(vocab) and falls towards ln(4) = 1.39
        assert l[6] < l[1] and sorted(v) == [3, 6] and v[6] < 5.6, (l, v)
        assert "windows of 256 tokens" in run.stdout + run.stderr
    bad = run_train(["--sharded-eden-data", "--sequence-db-dir", str(tmp_path / "db"), *TINY[1:],
                     "--max-steps", "2", "--result-dir", str(tmp_path / "bad")], check=False)
    assert bad.returncode != 0 and "--train-window-db" in bad.stderr


def test_window_dataset_matches_direct_slicing():
    records = dict(iter_fasta(PHAGES))
    splits = wd.fasta_window_datasets(str(PHAGES), 512, 400)
    assert {len(ds) for ds in splits.values()} and all(len(ds) for ds in splits.values())
    ds = splits["train"]
    for i in (0, len(ds) // 2, len(ds) - 1):
        contig, start = ds.windows[i]
        body = records[contig][start:start + 510].upper()
        tokens = ds[i]["tokens"]
        assert tokens[0] == 2 and bytes(tokens[1:1 + len(body)].tolist()).decode() == body
        assert torch.equal(ds[i]["labels"][:-1], tokens[1:])
