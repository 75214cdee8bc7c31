"""The examples run end to end at tiny size on CPU (issue 14): outputs exist and their numbers are in range."""

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_example(script: str, *args, home: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``examples/<script>`` as a user would: CPU mode, a clean environment, the venv's tools on PATH."""
    env = {"EVO2_CPU": "1", "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(home),
           "WANDB_MODE": "offline"}
    return subprocess.run([sys.executable, str(ROOT / "examples" / script), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env)


def test_phage_viability_example(tmp_path):
    out = tmp_path / "pv"
    r = run_example("phage_viability.py", "--out-dir", out, "--max-per-class", "8", home=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_viable"] == 8 and summary["n_nonviable"] == 8 and 0.0 <= summary["auroc"] <= 1.0
    rows = list(csv.DictReader(open(out / "scores.tsv"), delimiter="\t"))
    assert len(rows) == 16 and all(-math.log(256) < float(x["mean_log_likelihood"]) < 0 for x in rows)
    for png in ("roc.png", "scores_hist.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"AUROC {summary['auroc']:.3f}" in r.stderr and "Traceback" not in r.stderr


def test_brca1_example_pipeline_on_a_synthetic_reference(tmp_path):
    """Checks the pipeline, not the science: random bases stand in for GRCh37 chr17 (it cannot be bundled), with
    the table's reference base at each selected SNV; a handful of LOF and FUNC variants."""
    import random

    from evo2_recipe.inference import selftest

    rows = list(csv.DictReader(open(ROOT / "examples/data/findlay2018_brca1_sge.tsv"), delimiter="\t"))
    picked = [r for r in rows if r["func_class"] == "LOF"][:5] + [r for r in rows if r["func_class"] == "FUNC"][:5]
    variants = tmp_path / "variants.tsv"
    with open(variants, "w") as f:
        f.write("\t".join(rows[0]) + "\n")
        f.writelines("\t".join(r.values()) + "\n" for r in picked)
    positions = [int(r["position_hg19"]) for r in picked]
    offset = min(positions) - 100
    rng = random.Random(0)
    region = [rng.choice("ACGT") for _ in range(max(positions) - offset + 100)]
    for r in picked:
        region[int(r["position_hg19"]) - 1 - offset] = r["reference"]
    (tmp_path / "chr17_region.fa").write_text(">chr17\n" + "".join(region) + "\n")
    out = tmp_path / "brca1"
    args = ["--ckpt-dir", selftest.CHECKPOINT, "--reference", tmp_path / "chr17_region.fa", "--variants", variants,
            "--window-size", "64"]
    r = run_example("brca1_variant_effects.py", *args, "--reference-offset", offset, "--out-dir", out, home=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_variants"] == 10 and summary["n_lof"] == 5 and 0.0 <= summary["auroc"] <= 1.0
    scores = list(csv.DictReader(open(out / "scores.tsv"), delimiter="\t"))
    assert len(scores) == 10 and all(abs(float(s["delta"])) < 1.0 for s in scores)
    assert any(float(s["delta"]) != 0 for s in scores)  # the alternative base changes the window's score
    for png in ("roc.png", "delta_by_class.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = run_example("brca1_variant_effects.py", *args, "--reference-offset", offset + 1, "--out-dir",
                      tmp_path / "x", home=tmp_path)
    assert bad.returncode != 0 and "is not GRCh37 chr17 or --reference-offset is wrong" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_embeddings_head_example(tmp_path):
    import torch

    out = tmp_path / "eh"
    r = run_example("embeddings_head.py", "--out-dir", out, "--per-class", "24", "--steps", "60", home=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_windows"] == 48 and summary["n_test"] == 12 and summary["embedding_dim"] > 0
    for name in ("model_embeddings", "kmer4_baseline"):
        assert 0 <= summary[name]["accuracy"] <= 1 and 0 <= summary[name]["auroc"] <= 1
        assert summary[name]["train_loss"] < math.log(2)  # the head fits its training windows
    saved = torch.load(out / "embeddings.pt", weights_only=True)
    assert saved["embeddings"].shape == (48, summary["embedding_dim"]) and saved["labels"].sum() == 24
    assert "Traceback" not in r.stderr


def test_finetune_tutorial(tmp_path):
    """Random tiny Savanna stand-in -> convert -> fine-tune on the phage genomes (stopped and resumed) -> curves."""
    work = tmp_path / "ft"
    r = run_example("finetune_tutorial.py", "--work-dir", work, "--steps", "8", "--seq-length", "256",
                    "--micro-batch-size", "2", home=tmp_path, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((work / "summary.json").read_text())
    assert s["final_checkpoint_iteration"] == 8
    assert [step for step, _ in s["train_loss"]] == list(range(1, 9))  # both halves of the run are in the curves
    assert len(s["validation_loss"]) >= 2 and s["train_loss"][-1][1] < s["train_loss"][0][1]
    # a random model scores about -ln(vocab); after fine-tuning on phage genomes phiX174 is far more likely
    assert s["mean_log_likelihood_before"] < -4 < s["mean_log_likelihood_after"] < 0
    assert (work / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "$ train_evo2 -d" in r.stderr and "--early-stop-on-step 4" in r.stderr


def test_lora_classifier_example(tmp_path):
    out = tmp_path / "lc"
    r = run_example("lora_classifier.py", "--out-dir", out, "--per-class", "16", "--steps", "12", home=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    head, lora = s["head_only"], s["lora"]
    assert s["n_windows"] == 32 and s["n_test"] == 8
    assert head["backbone_parameters"] == lora["backbone_parameters"] > lora["trainable_parameters"]
    assert lora["trainable_parameters"] > head["trainable_parameters"] > 0  # adapters on top of the same head
    for run in (head, lora):
        assert 0 <= run["accuracy"] <= 1 and 0 <= run["auroc"] <= 1 and math.isfinite(run["final_train_loss"])
    assert "LoRA: " in r.stderr and "trainable parameters of" in r.stderr and "Traceback" not in r.stderr
