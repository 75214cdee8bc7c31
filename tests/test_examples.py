"""The examples run end to end at tiny size on CPU (issue 14): outputs exist and their numbers are in range."""

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_phage_viability_example(tmp_path):
    out = tmp_path / "pv"
    r = subprocess.run([sys.executable, str(ROOT / "examples/phage_viability.py"), "--out-dir", str(out),
                        "--max-per-class", "8"], capture_output=True, text=True, timeout=600,
                       env={"EVO2_CPU": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_viable"] == 8 and summary["n_nonviable"] == 8 and 0.0 <= summary["auroc"] <= 1.0
    rows = list(csv.DictReader(open(out / "scores.tsv"), delimiter="\t"))
    assert len(rows) == 16 and all(-math.log(256) < float(x["mean_log_likelihood"]) < 0 for x in rows)
    for png in ("roc.png", "scores_hist.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"AUROC {summary['auroc']:.3f}" in r.stderr
