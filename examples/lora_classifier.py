"""LoRA sequence classifier: a LoRA-tuned Evo 2 backbone vs a head-only baseline on coding vs non-coding windows.

    python examples/lora_classifier.py [--ckpt-dir CKPT] [--fasta genome.fa --annotation genes.gff3]
        [--layer -2] [--window 128] [--per-class 96] [--steps 150] [--lora-dim 8] [--out-dir outputs/lora_classifier]

Both runs put the same classification head (mean-pooled output of layer ``--layer`` ->
``Linear-GELU-Dropout-Linear-LayerNorm`` projector -> linear) on the same frozen backbone; the LoRA run also trains
adapters on every GEMM of every layer (Megatron-Bridge's PEFT ``LoRA`` through :class:`evo2_recipe.models.lora.
Evo2LoRA`, default targets). Windows and labels are those of ``embeddings_head.py`` (inside a CDS vs touching none of
the bundled *Dimorphilus* annotation), 75 % for training. Reported: trainable parameters, test accuracy and AUROC of
each run (``summary.json``). The reference ships the same comparison as a notebook on splice sites.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from embeddings_head import ROOT, Projector, labelled_windows  # noqa: E402  (the sibling example)

logger = logging.getLogger("lora_classifier")


class Classifier(nn.Module):
    """Backbone layer ``layer`` -> mean over real positions -> :class:`Projector` head."""

    def __init__(self, backbone: nn.Module, hidden: int, layer: int):
        super().__init__()
        self.backbone, self.layer = backbone, layer
        self.head = Projector(hidden)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.backbone(tokens, hidden_layer=self.layer).transpose(0, 1).float()  # (B, L, H)
        pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return self.head(pooled)


def run(ckpt: str, lora_dim: int | None, tokens, mask, y, train, args) -> dict:
    from sklearn.metrics import roc_auc_score

    from evo2_recipe.inference.api import Evo2
    from evo2_recipe.models.lora import Evo2LoRA

    torch.manual_seed(args.seed)
    evo = Evo2.from_checkpoint(ckpt, mixed_precision_recipe="fp32")
    backbone = evo.model
    base_parameters = sum(p.numel() for p in backbone.parameters())
    for p in backbone.parameters():
        p.requires_grad = False
    if lora_dim:  # adapters on every linear of every layer; base weights stay frozen
        backbone = Evo2LoRA(dim=lora_dim, alpha=2 * lora_dim, dropout=0.0)(backbone, training=True)
    model = Classifier(backbone, evo.model.config.hidden_size, args.layer)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=args.lr)
    g = torch.Generator().manual_seed(args.seed)
    idx = torch.nonzero(train)[:, 0]
    for step in range(args.steps):
        model.train()
        batch = idx[torch.randint(len(idx), (args.batch_size,), generator=g)]
        loss = nn.functional.cross_entropy(model(tokens[batch], mask[batch]), y[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % max(1, args.steps // 5) == 0:
            logger.info("%s step %d/%d: loss %.4f", "lora" if lora_dim else "head-only", step + 1, args.steps,
                        float(loss.detach()))
    model.eval()
    with torch.no_grad():
        prob = model(tokens[~train], mask[~train]).softmax(-1)[:, 1]
    test_y = y[~train]
    return {"trainable_parameters": sum(p.numel() for p in params),
            "backbone_parameters": base_parameters,
            "accuracy": float(((prob > 0.5).long() == test_y).float().mean()),
            "auroc": float(roc_auc_score(test_y.numpy(), prob.numpy())), "final_train_loss": float(loss.detach())}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt-dir", help="default: the bundled self-test checkpoint")
    p.add_argument("--fasta", type=Path, default=ROOT / "tests/data/dimorphilus/ncbi.fasta")
    p.add_argument("--annotation", type=Path, default=ROOT / "tests/data/dimorphilus/ncbi.gff.gz")
    p.add_argument("--layer", type=int, default=-2)
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--per-class", type=int, default=96)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--lora-dim", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path, default=Path("outputs/lora_classifier"))
    args = p.parse_args(argv)
    from evo2_recipe.cli.common import apply_runtime_mode, setup_logging

    setup_logging()
    apply_runtime_mode()  # first, before megatron's import: the fixes, and CPU mode (hiding TE) without a GPU
    from evo2_recipe.data.tokenizer import NucleotideTokenizer
    from evo2_recipe.inference import selftest

    pairs = labelled_windows(args.fasta, args.annotation, args.window, args.per_class, args.seed)
    tok = NucleotideTokenizer()
    tokens = torch.stack([torch.from_numpy(tok.tokenize_checked(s.upper())) for s, _ in pairs])  # equal lengths
    mask = torch.ones(tokens.shape, dtype=torch.float32)
    y = torch.tensor([label for _, label in pairs])
    train = torch.zeros(len(pairs), dtype=torch.bool)
    train[torch.randperm(len(pairs), generator=torch.Generator().manual_seed(args.seed))[:int(0.75 * len(pairs))]] = 1
    ckpt = args.ckpt_dir or str(selftest.CHECKPOINT)
    results = {"head_only": run(ckpt, None, tokens, mask, y, train, args),
               "lora": run(ckpt, args.lora_dim, tokens, mask, y, train, args)}
    summary = {**results, "n_windows": len(pairs), "n_test": int((~train).sum()), "layer": args.layer,
               "window": args.window, "lora_dim": args.lora_dim, "steps": args.steps}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    for name, r in results.items():
        logger.info("%-9s %s trainable parameters, test accuracy %.3f, AUROC %.3f", name,
                    f"{r['trainable_parameters']:,}", r["accuracy"], r["auroc"])
    return summary


if __name__ == "__main__":
    main()
