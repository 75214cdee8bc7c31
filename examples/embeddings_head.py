"""Embeddings to a downstream head: integration code to copy. Coding vs non-coding windows of a real annotated genome.

    python examples/embeddings_head.py [--ckpt-dir CKPT] [--fasta genome.fa --annotation genes.gff3]
        [--layer -2] [--window 128] [--per-class 96] [--out-dir outputs/embeddings_head]

1. Windows of ``--window`` bases are cut from the genome: inside a CDS (label 1) or touching none (label 0), the
   same number of each (seeded).
2. Each window is embedded with ``Evo2.embed(layer=...)``: mean-pooled over positions and averaged with the
   reverse complement's (strand-independent features), computed once (the backbone stays frozen).
3. A small projector ``Linear-GELU-Dropout-Linear-LayerNorm`` and a linear classifier are trained on 75 % of the
   windows (Adam, full batch) and evaluated on the rest: accuracy and AUROC, next to the same head on 4-mer counts
   (a baseline that knows nothing of the model). Results in ``summary.json``, embeddings in ``embeddings.pt``.

Defaults: the bundled self-test checkpoint (a tiny model trained on phage genomes only) and the bundled
*Dimorphilus gyrociliatus* genome subset with its GFF3 annotation (``tests/data/dimorphilus``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import random
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
logger = logging.getLogger("embeddings_head")


class Projector(nn.Module):
    """``Linear-GELU-Dropout-Linear-LayerNorm`` to ``dim`` features, then a linear classifier."""

    def __init__(self, in_dim: int, dim: int = 64, classes: int = 2, dropout: float = 0.1):
        super().__init__()
        self.project = nn.Sequential(nn.Linear(in_dim, dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(dim, dim),
                                     nn.LayerNorm(dim))
        self.classify = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.project(x))


def labelled_windows(fasta: Path, annotation: Path, window: int, per_class: int, seed: int):
    """``(sequence, label)`` pairs: windows inside a CDS (1) and windows overlapping no CDS (0)."""
    import gffutils

    from evo2_recipe.data.fasta import iter_fasta

    genome = dict(iter_fasta(fasta))
    db = gffutils.create_db(str(annotation), ":memory:", merge_strategy="create_unique")
    cds: dict[str, list[tuple[int, int]]] = {}
    for f in db.features_of_type("CDS"):
        cds.setdefault(f.seqid, []).append((f.start - 1, f.end))  # 0-based, end exclusive
    coding, noncoding = [], []
    for contig, seq in genome.items():
        spans = cds.get(contig, [])
        for start in range(0, len(seq) - window + 1, window // 2):
            end = start + window
            if any(a <= start and end <= b for a, b in spans):
                coding.append(seq[start:end])
            elif not any(start < b and a < end for a, b in spans):
                noncoding.append(seq[start:end])
    rng = random.Random(seed)
    n = min(per_class, len(coding), len(noncoding))
    if n < 8:
        raise SystemExit(f"only {len(coding)} coding and {len(noncoding)} non-coding windows of {window} bases")
    pairs = [(s, 1) for s in rng.sample(coding, n)] + [(s, 0) for s in rng.sample(noncoding, n)]
    rng.shuffle(pairs)
    return pairs


def embed_windows(evo, seqs: list[str], layer: int, batch: int = 16) -> torch.Tensor:
    """Mean-pooled embeddings ``(N, H)`` of ``seqs`` averaged with their reverse complements'."""
    from evo2_recipe.data.window_dataset import reverse_complement

    out = []
    for i in range(0, len(seqs), batch):
        chunk = [s.upper() for s in seqs[i:i + batch]]
        fwd = [e.mean(0) for e in evo.embed(chunk, layer=layer)]
        rev = [e.mean(0) for e in evo.embed([reverse_complement(s) for s in chunk], layer=layer)]
        out += [(a + b) / 2 for a, b in zip(fwd, rev)]
    return torch.stack(out).float()


def kmer_counts(seqs: list[str], k: int = 4) -> torch.Tensor:
    index = {"".join(p): i for i, p in enumerate(itertools.product("ACGT", repeat=k))}
    x = torch.zeros(len(seqs), len(index))
    for row, s in enumerate(seqs):
        s = s.upper()
        for j in range(len(s) - k + 1):
            if s[j:j + k] in index:
                x[row, index[s[j:j + k]]] += 1
    return x / x.sum(1, keepdim=True).clamp(min=1)


def train_head(x: torch.Tensor, y: torch.Tensor, train: torch.Tensor, steps: int, seed: int) -> dict:
    from sklearn.metrics import roc_auc_score

    torch.manual_seed(seed)
    mean, std = x[train].mean(0), x[train].std(0).clamp(min=1e-6)  # standardise with training statistics only
    x = (x - mean) / std
    head = Projector(x.shape[1])
    opt = torch.optim.Adam(head.parameters(), lr=3e-3, weight_decay=1e-4)
    for _ in range(steps):
        head.train()
        loss = nn.functional.cross_entropy(head(x[train]), y[train])
        opt.zero_grad()
        loss.backward()
        opt.step()
    head.eval()
    with torch.no_grad():
        prob = head(x[~train]).softmax(-1)[:, 1]
    test_y = y[~train]
    return {"accuracy": float(((prob > 0.5).long() == test_y).float().mean()),
            "auroc": float(roc_auc_score(test_y.numpy(), prob.numpy())), "train_loss": float(loss.detach())}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt-dir", help="default: the bundled self-test checkpoint")
    p.add_argument("--fasta", type=Path, default=ROOT / "tests/data/dimorphilus/ncbi.fasta")
    p.add_argument("--annotation", type=Path, default=ROOT / "tests/data/dimorphilus/ncbi.gff.gz")
    p.add_argument("--layer", type=int, default=-2, help="embedding layer (negative counts from the end)")
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--per-class", type=int, default=96)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path, default=Path("outputs/embeddings_head"))
    args = p.parse_args(argv)
    from evo2_recipe.cli.common import apply_runtime_mode, setup_logging

    setup_logging()
    apply_runtime_mode()  # first, before megatron's import: the fixes, and CPU mode (hiding TE) without a GPU
    from evo2_recipe.inference import selftest
    from evo2_recipe.inference.api import Evo2

    pairs = labelled_windows(args.fasta, args.annotation, args.window, args.per_class, args.seed)
    seqs, y = [s for s, _ in pairs], torch.tensor([label for _, label in pairs])
    evo = Evo2.from_checkpoint(args.ckpt_dir or str(selftest.CHECKPOINT))
    logger.info("embedding %d windows of %d bases (layer %d, RC-averaged)", len(seqs), args.window, args.layer)
    emb = embed_windows(evo, seqs, args.layer)
    train = torch.zeros(len(seqs), dtype=torch.bool)
    train[torch.randperm(len(seqs), generator=torch.Generator().manual_seed(args.seed))[:int(0.75 * len(seqs))]] = 1
    results = {"model_embeddings": train_head(emb, y, train, args.steps, args.seed),
               "kmer4_baseline": train_head(kmer_counts(seqs), y, train, args.steps, args.seed)}
    summary = {**results, "n_windows": len(seqs), "n_test": int((~train).sum()), "embedding_dim": emb.shape[1],
               "layer": args.layer, "window": args.window}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"embeddings": emb, "labels": y, "train": train}, args.out_dir / "embeddings.pt")
    (args.out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    for name, r in results.items():
        logger.info("%-16s test accuracy %.3f, AUROC %.3f", name, r["accuracy"], r["auroc"])
    return summary


if __name__ == "__main__":
    main()
