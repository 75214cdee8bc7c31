"""Self-test of an installed stack against known outputs (like Arc's test harness), and metrics of any checkpoint.

A small reference checkpoint ships with the package (``evo2_recipe/selftest_data/``: ``striped_hyena_tiny`` trained
on the bundled phiX174-like genomes by ``scripts/make_selftest_checkpoint.sh``, command and seed recorded in
``expected.json``) together with the outputs it gave when it was made. :func:`run_metrics` recomputes them in fp32:

* teacher-forced loss (nats/base) and next-token accuracy on held-back sequences (the phiX174 reference genome,
  never trained on);
* the mean log-likelihood of each held-back sequence;
* a greedy generation from a fixed prompt.

:func:`compare` turns the differences into a PASS/FAIL report: every number within its tolerance and at least
``MIN_MATCH`` of the generated nucleotides equal. fp32 on any device agrees with the recorded CPU values to ~1e-5;
the tolerances leave room for that and nothing more (a perturbed weight fails).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parents[1] / "selftest_data"
CHECKPOINT = DATA / "checkpoint"
EXPECTED = DATA / "expected.json"
HELD_OUT = DATA / "phix174_NC_001422.1.fna"
WINDOW, N_WINDOWS = 1000, 4  # held-back windows scored
PROMPT_LENGTH, GENERATE = 200, 100  # greedy generation from the start of the genome
LOSS_TOL, ACC_TOL, SCORE_TOL, MIN_MATCH = 2e-3, 2e-3, 2e-3, 0.98


def held_out_windows() -> list[str]:
    from evo2_recipe.data.fasta import iter_fasta

    (_, genome), = list(iter_fasta(HELD_OUT))
    return [genome[i * WINDOW:(i + 1) * WINDOW].upper() for i in range(N_WINDOWS)]


@torch.no_grad()
def run_metrics(evo) -> dict:
    """Teacher-forced loss/accuracy, per-sequence scores and a greedy generation of a loaded :class:`Evo2`."""
    seqs = held_out_windows()
    logits, tokens, mask = evo.logits(seqs)
    logp = torch.log_softmax(logits[:, :-1].float(), -1)
    target, valid = tokens[:, 1:].to(logp.device), mask[:, 1:].to(logp.device).bool()
    nll = -logp.gather(-1, target[..., None])[..., 0]
    correct = logp.argmax(-1) == target
    scores = evo.score(seqs, reduce="mean")
    prompt = seqs[0][:PROMPT_LENGTH]
    generated = evo.generate([prompt], GENERATE, top_k=1, stop_at_eod=False)[0]["text"]
    return {"loss": float(nll[valid].mean()), "accuracy": float(correct[valid].float().mean()),
            "scores": [float(s) for s in scores], "prompt": prompt, "generated": generated}


@dataclass
class Report:
    lines: list[str]
    passed: bool

    def __str__(self) -> str:
        return "\n".join([*self.lines, "PASS" if self.passed else "FAIL"])


def compare(got: dict, expected: dict) -> Report:
    lines, ok = [], True

    def check(name, a, b, tol):
        nonlocal ok
        good = abs(a - b) <= tol
        ok &= good
        lines.append(f"{name:<22} got {a:.6f}  expected {b:.6f}  |diff| {abs(a - b):.2e} (tol {tol:g})  "
                     f"{'ok' if good else 'MISMATCH'}")

    check("loss (nats/base)", got["loss"], expected["loss"], LOSS_TOL)
    check("next-token accuracy", got["accuracy"], expected["accuracy"], ACC_TOL)
    for i, (a, b) in enumerate(zip(got["scores"], expected["scores"], strict=True)):
        check(f"score of window {i}", a, b, SCORE_TOL)
    want, have = expected["generated"], got["generated"]
    match = sum(x == y for x, y in zip(have, want)) / max(len(want), 1)
    good = match >= MIN_MATCH and len(have) == len(want)
    ok &= good
    lines.append(f"{'greedy generation':<22} {100 * match:.1f}% matching nucleotides over {len(want)} "
                 f"(min {100 * MIN_MATCH:.0f}%)  {'ok' if good else 'MISMATCH'}")
    return Report(lines, ok)


def describe(got: dict) -> str:
    """Metrics of any checkpoint (no expected values)."""
    return "\n".join([f"loss (nats/base)       {got['loss']:.4f}  (ln 4 = 1.3863 for a uniform model)",
                      f"next-token accuracy    {got['accuracy']:.4f}",
                      "window scores          " + ", ".join(f"{s:.4f}" for s in got["scores"]),
                      f"greedy generation      {got['generated'][:60]}..."])


ARC_PROMPTS = DATA / "arc_prompts.csv"
# Teacher-forced loss (nats/base) and next-token accuracy of the public checkpoints on ``arc_prompts.csv``, as
# published with Arc's test harness (bf16); tolerances cover bf16 vs fp32 and kernel differences.
PUBLISHED = {"evo2_1b_base": (0.50195, 0.79556), "evo2_7b": (0.34766, 0.86346), "evo2_40b": (0.21594, 0.91673)}
PUBLISHED_LOSS_TOL, PUBLISHED_ACC_TOL = 0.02, 0.01


@torch.no_grad()
def teacher_forced(evo, seqs: list[str]) -> tuple[float, float]:
    """Mean loss and next-token accuracy over all predicted positions of ``seqs`` (one sequence at a time)."""
    nll_sum, correct, n = 0.0, 0, 0
    for seq in seqs:
        logits, tokens, _ = evo.logits([seq])
        logp = torch.log_softmax(logits[0, :-1].float(), -1)
        target = tokens[0, 1:].to(logp.device)
        nll_sum += float(-logp.gather(-1, target[:, None]).sum())
        correct += int((logp.argmax(-1) == target).sum())
        n += target.numel()
    return nll_sum / n, correct / n


def compare_published(evo, size: str) -> Report:
    import csv

    if size not in PUBLISHED:
        raise ValueError(f"no published values for {size!r}; known: {', '.join(PUBLISHED)}")
    with open(ARC_PROMPTS) as f:
        seqs = [row["Sequence"] for row in csv.DictReader(f)]
    loss, acc = teacher_forced(evo, seqs)
    want_loss, want_acc = PUBLISHED[size]
    ok_loss, ok_acc = abs(loss - want_loss) <= PUBLISHED_LOSS_TOL, abs(acc - want_acc) <= PUBLISHED_ACC_TOL
    return Report([f"{'loss (nats/base)':<22} got {loss:.5f}  published {want_loss:.5f}  (tol {PUBLISHED_LOSS_TOL})  "
                   f"{'ok' if ok_loss else 'MISMATCH'}",
                   f"{'next-token accuracy':<22} got {100 * acc:.3f}%  published {100 * want_acc:.3f}%  "
                   f"(tol {100 * PUBLISHED_ACC_TOL:g}%)  {'ok' if ok_acc else 'MISMATCH'}"], ok_loss and ok_acc)


def load_expected(path: Path = EXPECTED) -> dict:
    return json.loads(path.read_text())
