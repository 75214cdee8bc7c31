"""GPU check that TP/CP runs of a real-width model match TP=1 (bf16, random init, weights shared via dist ckpt).

    torchrun --nproc-per-node 1 benchmarks/parity_parallel.py --model-size evo2_1b_base --dir /tmp/p --save
    torchrun --nproc-per-node 2 benchmarks/parity_parallel.py --model-size evo2_1b_base --dir /tmp/p --cp 2
    (TP=2 needs heads divisible by 2: use striped_hyena_1b_nv_parallel, the 16-head 1b shape.)

Prints the max/relative logit difference and the loss of both runs, and exits non-zero above --rel-tol.
"""

import argparse
import os
import sys

import torch

from evo2_recipe.compat import megatron_fixes

megatron_fixes.apply()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-size", default="evo2_1b_base")
    ap.add_argument("--seq-length", type=int, default=8192)
    ap.add_argument("--dir", required=True)
    ap.add_argument("--save", action="store_true", help="TP=1 reference run: save weights and logits")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--cp", type=int, default=1)
    ap.add_argument("--rel-tol", type=float, default=2e-2)
    args = ap.parse_args()

    from megatron.core import dist_checkpointing, parallel_state, tensor_parallel

    from evo2_recipe.models.hyena.context_parallel import zigzag_split
    from evo2_recipe.models.providers import get_provider
    from evo2_recipe.utils.distributed import init_distributed, teardown

    init_distributed(tp=args.tp, cp=args.cp, seed=7)
    provider = get_provider(args.model_size, vocab_size=512, seq_length=args.seq_length, recompute_granularity=None,
                            recompute_method=None, recompute_num_layers=None, tensor_model_parallel_size=args.tp,
                            context_parallel_size=args.cp, sequence_parallel=args.tp > 1)
    provider.finalize()
    model = provider.provide().cuda().eval()
    ckpt = os.path.join(args.dir, "weights")
    if args.save:
        os.makedirs(ckpt, exist_ok=True)
        dist_checkpointing.save(model.sharded_state_dict(), ckpt)
    else:
        model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), ckpt))
    L = args.seq_length
    g = torch.Generator().manual_seed(0)
    tokens = torch.tensor([65, 67, 71, 84, 97, 99, 103, 116])[torch.randint(0, 8, (1, L + 1), generator=g)].cuda()
    tokens, labels = tokens[:, :-1], tokens[:, 1:]
    cp_rank = parallel_state.get_context_parallel_rank()
    if args.cp > 1:
        tokens, labels = (zigzag_split(t, 1, cp_rank, args.cp) for t in (tokens, labels))
    with torch.no_grad():
        logits = tensor_parallel.gather_from_tensor_model_parallel_region(model(tokens)).float()
        loss = model(tokens, labels=labels).float().sum()
    if args.cp > 1:
        group = parallel_state.get_context_parallel_group()
        pieces = [torch.empty_like(logits) for _ in range(args.cp)]
        torch.distributed.all_gather(pieces, logits, group=group)
        full = torch.empty(1, L, logits.shape[-1], device=logits.device)
        for r, piece in enumerate(pieces):
            full[:, zigzag_split(torch.arange(L), 0, r, args.cp)] = piece
        logits = full
        torch.distributed.all_reduce(loss, group=group)
    loss = loss / L
    rc = 0
    if torch.distributed.get_rank() == 0:
        path = os.path.join(args.dir, "reference.pt")
        if args.save:
            torch.save({"logits": logits.cpu(), "loss": loss.item()}, path)
            print(f"saved reference: loss={loss.item():.5f}")
        else:
            ref = torch.load(path, weights_only=True)
            diff = logits.cpu() - ref["logits"]
            rel = (diff.norm() / ref["logits"].norm()).item()
            print(f"{args.model_size} tp={args.tp} cp={args.cp} vs tp=1: max_abs_logit_diff={diff.abs().max():.4f} "
                  f"rel_l2={rel:.2e} loss={loss.item():.5f} ref_loss={ref['loss']:.5f}")
            rc = 0 if rel < args.rel_tol else 1
    teardown()
    return rc


if __name__ == "__main__":
    sys.exit(main())
