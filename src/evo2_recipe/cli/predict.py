"""``predict_evo2``: score a FASTA file with a trained checkpoint (logits, log-probabilities or embeddings).

    torchrun --nproc-per-node 2 --no-python predict_evo2 --fasta seqs.fa --ckpt-dir results/evo2/checkpoints \\
        --output-dir preds --output-log-prob-seqs --log-prob-collapse-option sum --context-parallel-size 2

Writes ``predictions__rank_{r}__dp_rank_{d}.pt`` (or one file per batch with ``--write-interval batch``) and
``seq_idx_map.json`` ({record id: index}, ids sorted) into ``--output-dir``.
"""

from __future__ import annotations

import argparse
import os
import json
import logging
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from evo2_recipe.cli.common import add_cpu_flag, add_model_runtime_flags, apply_runtime_mode, setup_logging

logger = logging.getLogger("predict_evo2")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="predict_evo2", description="Score sequences with an Evo 2 checkpoint.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--fasta", required=True, type=Path)
    p.add_argument("--ckpt-dir", required=True, type=Path)
    p.add_argument("--output-dir", type=Path)
    p.add_argument("--write-interval", choices=["epoch", "batch"], default="epoch")
    p.add_argument("--files-per-subdir", type=int, help="batch mode: files k*N..(k+1)*N-1 go to subdir_k")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1, choices=[1])
    p.add_argument("--context-parallel-size", type=int, default=1)
    p.add_argument("--no-sequence-parallel", action="store_true")
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--min-length", type=int, help="pad every batch to at least this length")
    p.add_argument("--prepend-bos", action="store_true",
                   help="prepend the EOD id (0) - the document separator seen in training - so the first base is "
                        "scored; that position itself is masked")
    p.add_argument("--output-log-prob-seqs", action="store_true")
    p.add_argument("--log-prob-collapse-option", choices=["sum", "mean", "per_token"], default="mean")
    p.add_argument("--average-reverse-complement", action="store_true",
                   help="average sequence log-probs with those of the reverse complement (as Arc's evo2 does)")
    p.add_argument("--embedding-layer", type=int, help="return layer k's output (negative: from the end)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--mask-phylogenetic-tags", action="store_true",
                   help="leave positions predicting taxonomy-tag tokens out of the log-probs (as the training loss)")
    p.add_argument("--num-layers", type=int, help="build this many layers (the checkpoint must match)")
    p.add_argument("--hybrid-override-pattern", help="layer pattern, one symbol per layer (S, D, H, *)")
    p.add_argument("--seq-len-interpolation-factor", type=float, help="linear RoPE position interpolation factor")
    p.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=True,
                   help="one GPU (TP=1, CP=1): a batch shape of <= 65,536 tokens met a second time is captured and "
                        "then replayed as one CUDA graph - fixed-length windows score without host overhead; "
                        "--no-cuda-graph runs every forward eagerly")
    p.add_argument("--num-nodes", type=int, default=1, help="checked against the torchrun world size")
    p.add_argument("--devices", type=int, help="processes per node; checked against the torchrun world size")
    p.add_argument("--eden-tokenizer", action="store_true", help=argparse.SUPPRESS)
    add_model_runtime_flags(p)
    add_cpu_flag(p)
    return p


def read_fasta_sorted(path: Path) -> list[tuple[str, str]]:
    from evo2_recipe.data.fasta import iter_fasta

    records = sorted(iter_fasta(path), key=lambda r: r[0])
    if not records:
        raise ValueError(f"{path} contains no FASTA records")
    return records


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    setup_logging(args.verbose)
    if args.embedding_layer is not None and args.output_log_prob_seqs:
        p.error("Cannot use --output-log-prob-seqs with --embedding-layer. Embeddings are not logits.")
    if args.average_reverse_complement and not args.output_log_prob_seqs:
        p.error("--average-reverse-complement needs --output-log-prob-seqs")
    if args.eden_tokenizer:
        p.error("--eden-tokenizer is not supported: the tokenizer comes with the checkpoint (its tokenizer/ folder, "
                "else the nucleotide tokenizer matching its embedding), which is what Eden checkpoints use too")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.devices is not None and args.devices * args.num_nodes != world:
        p.error(f"--num-nodes {args.num_nodes} x --devices {args.devices} != {world} processes; the processes come "
                f"from torchrun: torchrun --nnodes {args.num_nodes} --nproc-per-node {args.devices} ...")
    overrides = {k: v for k, v in (("num_layers", args.num_layers),
                                   ("hybrid_override_pattern", args.hybrid_override_pattern),
                                   ("seq_len_interpolation_factor", args.seq_len_interpolation_factor),
                                   ("use_subquadratic_ops", args.use_subquadratic_ops or None)) if v is not None}
    apply_runtime_mode(args)
    from megatron.core import parallel_state

    from evo2_recipe.data.fasta import FastaFormatError
    from evo2_recipe.inference.api import Evo2
    from evo2_recipe.inference.loading import CheckpointError
    from evo2_recipe.utils.distributed import teardown

    try:
        records = read_fasta_sorted(args.fasta)
        evo = Evo2.from_checkpoint(str(args.ckpt_dir), tp=args.tensor_parallel_size, cp=args.context_parallel_size,
                                   sequence_parallel=False if args.no_sequence_parallel else None,
                                   mixed_precision_recipe=args.mixed_precision_recipe,
                                   vortex_style_fp8=args.vortex_style_fp8 or None,
                                   seed=args.seed, model_overrides=overrides, cuda_graph=args.cuda_graph)
        for name, seq in records:
            evo.tokenizer.tokenize_checked(seq.upper(), f"record '{name}'")  # fail before any work
    except (FastaFormatError, FileNotFoundError, NotADirectoryError, CheckpointError, ValueError) as e:
        p.exit(2, f"predict_evo2: error: {e}\n")
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    writer = (parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0
              and parallel_state.get_context_parallel_rank() == 0 and args.output_dir is not None)
    rank = torch.distributed.get_rank()
    mbs = args.micro_batch_size
    batches = [list(range(i, min(i + mbs, len(records)))) for i in range(0, len(records), mbs)][dp_rank::dp]
    outputs = []
    if writer:
        args.output_dir.mkdir(parents=True, exist_ok=True)
    for b_idx, idx in enumerate(tqdm(batches, desc="predict", disable=rank != 0)):
        seqs = [records[i][1] for i in idx]
        out = _predict_batch(evo, seqs, args)
        out["seq_idx"] = torch.tensor(idx, dtype=torch.long)
        if args.write_interval == "batch" and writer:
            out["batch_idx"] = torch.tensor([b_idx])
            sub = args.output_dir
            if args.files_per_subdir:
                sub = sub / f"subdir_{b_idx // args.files_per_subdir}"
                sub.mkdir(exist_ok=True)
            _atomic_save(out, sub / f"predictions__rank_{rank}__dp_rank_{dp_rank}__batch_{b_idx}.pt")
        else:
            outputs.append(out)
    if writer and outputs:
        path = args.output_dir / f"predictions__rank_{rank}__dp_rank_{dp_rank}.pt"
        _atomic_save(collate(outputs), path)
        logger.info("Inference predictions are stored in %s", path)
    if writer and dp_rank == 0:
        (args.output_dir / "seq_idx_map.json").write_text(json.dumps({n: i for i, (n, _) in enumerate(records)}))
    teardown()
    return 0


def _predict_batch(evo, seqs, args) -> dict:
    if args.embedding_layer is not None:
        embs = evo.embed(seqs, layer=args.embedding_layer, prepend_bos=args.prepend_bos)
        hidden, mask = _pad_stack(embs, args.min_length)
        tokens, _ = _pad_stack([t for t in evo.tokenize(seqs, prepend_bos=args.prepend_bos)], args.min_length)
        return {"hidden_embeddings": hidden, "pad_mask": mask, "tokens": tokens}
    if args.output_log_prob_seqs:
        reduce = args.log_prob_collapse_option
        scores = evo.score(seqs, reduce=reduce, prepend_bos=args.prepend_bos,
                           average_reverse_complement=args.average_reverse_complement, batch_size=len(seqs),
                           mask_phylogenetic_tags=args.mask_phylogenetic_tags)
        if reduce == "per_token":  # --min-length: positions, not values (a causal model's scores ignore padding)
            lp, mask = _pad_stack(scores, args.min_length - 1 if args.min_length else None)
            return {"log_probs_seqs": lp, "loss_mask": mask.bool()}
        return {"log_probs_seqs": torch.tensor(scores, dtype=torch.float32)}
    logits, tokens, mask = evo.logits(seqs, prepend_bos=args.prepend_bos, min_length=args.min_length)
    return {"token_logits": logits.cpu(), "pad_mask": mask, "tokens": tokens}


def _pad_stack(tensors: list[torch.Tensor], min_length: int | None = None):
    L = max(max(t.shape[0] for t in tensors), min_length or 0)
    out = torch.zeros((len(tensors), L, *tensors[0].shape[1:]), dtype=tensors[0].dtype)
    mask = torch.zeros((len(tensors), L), dtype=torch.long)
    for i, t in enumerate(tensors):
        out[i, :t.shape[0]] = t
        mask[i, :t.shape[0]] = 1
    return out, mask


def collate(batches: list[dict]) -> dict:
    """Concatenate per-batch dicts along the batch; sequence dims are zero-padded to the longest."""
    out = {}
    for key in batches[0]:
        ts = [b[key] for b in batches]
        if ts[0].dim() >= 2:
            L = max(t.shape[1] for t in ts)
            ts = [torch.nn.functional.pad(t, (0, 0) * (t.dim() - 2) + (0, L - t.shape[1])) for t in ts]
        out[key] = torch.cat(ts, dim=0)
    return out


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(".pt.tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
