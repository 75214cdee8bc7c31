"""Scoring and decoding throughput of a trained checkpoint (random-init training checkpoints are fine).

    python benchmarks/bench_inference.py --ckpt-dir results/evo2/checkpoints --seq-length 8192 --score-batch 4 \\
        --decode-batches 1 32 --decode-tokens 128

Scoring: forward passes over random DNA of ``--seq-length`` (log-probs computed), tokens/s. Decoding: greedy cached
generation from a 512-base prompt; prefill (generate 1 token) is timed alone and subtracted, so the decode rate is
generated tokens/s of the decode steps only (all sequences of the batch counted). ``--profile`` prints the torch
profiler's top ops over 16 decode steps of the first batch size. Ours and Arc's Vortex side by side on the same shapes
(random weights, Vortex in the same run): ``python benchmarks/side_by_side.py decode prefill --vortex``.
"""

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt-dir", required=True)
    ap.add_argument("--seq-length", type=int, default=8192)
    ap.add_argument("--score-batch", type=int, default=4)
    ap.add_argument("--score-iters", type=int, default=5)
    ap.add_argument("--decode-batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--prompt-length", type=int, default=512)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()

    from evo2_recipe.inference.api import Evo2

    evo = Evo2.from_checkpoint(args.ckpt_dir)
    g = torch.Generator().manual_seed(0)

    def dna(n, length):
        return ["".join("ACGT"[i] for i in torch.randint(0, 4, (length,), generator=g).tolist()) for _ in range(n)]

    seqs = dna(args.score_batch, args.seq_length)
    evo.score(seqs, reduce="sum", batch_size=args.score_batch)  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.score_iters):
        evo.score(seqs, reduce="sum", batch_size=args.score_batch)
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.score_iters
    print(f"device={torch.cuda.get_device_name()} scoring seq={args.seq_length} batch={args.score_batch}: "
          f"{args.score_batch * args.seq_length / dt:.0f} tokens/s ({dt:.3f} s/batch) "
          f"peak_mem_gib={torch.cuda.max_memory_allocated() / 2**30:.2f}")
    for b in args.decode_batches:
        prompts = dna(b, args.prompt_length)
        evo.generate(prompts, 4, top_k=1, max_batch_size=b)  # warm-up

        def timed(n_new):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = evo.generate(prompts, n_new, top_k=1, stop_at_eod=False, max_batch_size=b)
            torch.cuda.synchronize()
            return time.perf_counter() - t0, sum(len(r["tokens"]) for r in out)

        t_prefill, _ = timed(1)
        t_all, n = timed(args.decode_tokens)
        rate = (n - b) / (t_all - t_prefill)
        print(f"decode batch={b} prompt={args.prompt_length} new={args.decode_tokens}: prefill {t_prefill:.3f} s, "
              f"decode {rate:.1f} tokens/s total ({rate / b:.1f} per sequence, "
              f"{1000 * (t_all - t_prefill) / (args.decode_tokens - 1):.2f} ms/step) "
              f"peak_mem_gib={torch.cuda.max_memory_allocated() / 2**30:.2f}")
        if args.profile and b == args.decode_batches[0]:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                evo.generate(prompts, 17, top_k=1, stop_at_eod=False, max_batch_size=b)
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15))


if __name__ == "__main__":
    main()
