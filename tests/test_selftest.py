"""``evo2_selftest`` (issue 14 item 6): the bundled reference checkpoint reproduces its recorded outputs on this
install, and a perturbed weight is caught with a clear report."""

import torch

from cli_helpers import run_cli
from evo2_recipe.inference import selftest


def _run(*args, fresh=False):
    return run_cli("evo2_selftest", "--cpu", *args, timeout=600, fresh=fresh)


def test_bundled_checkpoint_is_small_and_passes():
    size = sum(f.stat().st_size for f in selftest.CHECKPOINT.rglob("*") if f.is_file())
    assert size < 5 * 2**20, size
    expected = selftest.load_expected()
    assert 0.3 < expected["accuracy"] < 1 and expected["loss"] < 1.3  # a trained model, not a random one
    assert "quickstart.sh" in expected["made_by"]
    r = _run(fresh=True)  # the installation check as a user starts it: its whole output
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert r.stdout.strip().endswith("PASS") and "100.0% matching nucleotides" in r.stdout
    assert "Traceback" not in r.stderr


def test_perturbed_weight_fails_with_a_report(tmp_path):
    from evo2_recipe.checkpoint.dcp_utils import load_tensors, resolve_iteration_dir
    from evo2_recipe.checkpoint.remove_optimizer import remove_optimizer

    key = next(k for k in load_tensors(resolve_iteration_dir(selftest.CHECKPOINT), lambda k: "dense.weight" in k))
    weight = load_tensors(resolve_iteration_dir(selftest.CHECKPOINT), lambda k: k == key)[key]
    noisy = weight + 0.5 * weight.std() * torch.randn(weight.shape, generator=torch.Generator().manual_seed(0))
    remove_optimizer(selftest.CHECKPOINT, tmp_path / "perturbed", replace={key: noisy})
    r = _run("--ckpt-dir", str(tmp_path / "perturbed"), "--expected", str(selftest.EXPECTED))
    assert r.returncode == 1, r.stdout + r.stderr[-3000:]
    assert r.stdout.strip().endswith("FAIL") and "MISMATCH" in r.stdout
    plain = _run("--ckpt-dir", str(tmp_path / "perturbed"))  # metrics only
    assert plain.returncode == 0 and "next-token accuracy" in plain.stdout


def _teacher_forced_vs_scores(rank, world):
    import csv

    from evo2_recipe.inference.api import Evo2

    evo = Evo2.from_checkpoint(str(selftest.CHECKPOINT), mixed_precision_recipe="fp32")
    seqs = [row["Sequence"] for row in csv.DictReader(open(selftest.ARC_PROMPTS))][:2]
    loss, acc = selftest.teacher_forced(evo, seqs)
    per_token = torch.cat([t.flatten() for t in evo.score(seqs, reduce="per_token")])
    return loss, acc, float(-per_token.mean())


def test_published_comparison(tmp_path):
    from evo2_recipe.utils.spawn import run_on_ranks

    (loss, acc, from_scores), = run_on_ranks(_teacher_forced_vs_scores, 1)
    assert abs(loss - from_scores) < 1e-5 and 0.2 < acc < 1  # two code paths, one number
    r = _run("--ckpt-dir", str(selftest.CHECKPOINT), "--published", "evo2_1b_base")
    assert r.returncode == 1 and "published 0.50195" in r.stdout and "MISMATCH" in r.stdout  # a tiny model
    bad = _run("--ckpt-dir", str(selftest.CHECKPOINT), "--published", "evo2_3b")
    assert bad.returncode == 2 and "no published values for 'evo2_3b'" in bad.stderr
