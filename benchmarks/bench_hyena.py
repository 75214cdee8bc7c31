"""Forward+backward throughput of a Hyena model (random init): tokens/s/GPU, TFLOP/s/GPU, MFU, peak memory.

    torchrun --nproc-per-node 1 benchmarks/bench_hyena.py --model-size evo2_1b_base --seq-length 8192
    torchrun --nproc-per-node 2 benchmarks/bench_hyena.py --model-size evo2_1b_base --seq-length 8192 --cp 2

Measures the model alone (no optimizer step): ``--steps`` timed iterations after ``--warmup``. MFU uses the
recipe's model-FLOPs formula (``num_floating_point_operations``) and the GPU's dense bf16 peak.
"""

import argparse
import time

import torch

from evo2_recipe.compat import megatron_fixes

megatron_fixes.apply()

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-size", default="evo2_1b_base")
    ap.add_argument("--seq-length", type=int, default=8192)
    ap.add_argument("--micro-batch-size", type=int, default=1)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--cp", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--recompute", action="store_true", help="full activation recompute (the size's default)")
    ap.add_argument("--vocab-size", type=int, default=512)
    ap.add_argument("--use-subquadratic-ops", action="store_true", help="NVIDIA's subquadratic-ops-torch where it serves")
    ap.add_argument("--profile", action="store_true", help="torch-profiler table (GPU time) of one step, rank 0")
    args = ap.parse_args()

    from megatron.core import parallel_state

    from evo2_recipe.models.providers import get_provider, num_floating_point_operations
    from evo2_recipe.utils.distributed import init_distributed, teardown

    init_distributed(tp=args.tp, cp=args.cp)
    extra = {} if args.recompute else dict(recompute_granularity=None, recompute_method=None,
                                           recompute_num_layers=None)
    provider = get_provider(args.model_size, vocab_size=args.vocab_size, seq_length=args.seq_length,
                            tensor_model_parallel_size=args.tp, context_parallel_size=args.cp,
                            sequence_parallel=args.tp > 1, use_subquadratic_ops=args.use_subquadratic_ops, **extra)
    provider.finalize()
    model = provider.provide().cuda()
    B, L = args.micro_batch_size, args.seq_length
    cp_rank = parallel_state.get_context_parallel_rank()
    tokens = torch.randint(65, 90, (B, L), device="cuda")
    if args.cp > 1:
        from evo2_recipe.models.hyena.context_parallel import zigzag_split

        tokens = zigzag_split(tokens, 1, cp_rank, args.cp)
    labels = tokens.roll(-1, 1)

    def step():
        loss = model(tokens, labels=labels).float().mean()
        loss.backward()
        return loss

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.steps
    world = torch.distributed.get_world_size()
    tokens_per_s_gpu = B * L / dt / world
    flops = num_floating_point_operations(provider, B, L, args.vocab_size)
    tflops_gpu = flops / dt / world / 1e12
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    if torch.distributed.get_rank() == 0:
        print(f"device={name} world={world} model={args.model_size} seq={L} mbs={B} tp={args.tp} cp={args.cp} "
              f"recompute={args.recompute}")
        print(f"step_time_s={dt:.4f} tokens_per_s_per_gpu={tokens_per_s_gpu:.0f} tflops_per_gpu={tflops_gpu:.1f} "
              f"mfu={'%.3f' % (tflops_gpu / peak) if peak else 'n/a'} "
              f"peak_mem_gib={torch.cuda.max_memory_allocated() / 2**30:.2f} loss={loss.item():.4f}")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        if torch.distributed.get_rank() == 0:
            print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30), flush=True)
    teardown()


if __name__ == "__main__":
    main()
