"""``infer_evo2``: generate DNA from prompts with cached (recurrent-state) decoding.

    infer_evo2 --ckpt-dir results/evo2/checkpoints --prompt ATGGTTCGT --max-new-tokens 200 --top-k 4 \\
        --output-file generated.jsonl

Prompts are upper-cased (the model was trained on upper-case inputs). ``--prompt-file`` takes FASTA, JSONL
(``{"id"?, "prompt"}`` per line) or one prompt per line; up to ``--max-batch-size`` prompts decode together and a
finished sequence's slot goes to the next waiting prompt (continuous batching). ``--stream`` prints tokens as they
come. Output: one JSON line per prompt with ``id, prompt, completion, finish_reason, usage`` (and
``logprobs.completion_logprobs`` with ``--return-log-probs``).
"""

from __future__ import annotations

import argparse
import os
import json
import logging
import sys
import time
from pathlib import Path

from evo2_recipe.cli.common import add_cpu_flag, add_model_runtime_flags, apply_runtime_mode, setup_logging

logger = logging.getLogger("infer_evo2")
DEFAULT_PROMPT = ("|d__Bacteria;p__Pseudomonadota;c__Gammaproteobacteria;o__Enterobacterales;f__Enterobacteriaceae;"
                  "g__Escherichia;s__Escherichia|")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="infer_evo2", description="Generate DNA with an Evo 2 checkpoint.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt-dir", required=True, type=Path)
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--prompt-file", type=Path,
                   help='FASTA, JSONL (one {"id"?: str, "prompt": str} per line) or one prompt per line')
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 off, 1 greedy")
    p.add_argument("--top-p", type=float, default=0.0, help="0 off")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default 1234; 0 is a valid seed)")
    p.add_argument("--return-log-probs", action="store_true")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1, choices=[1])
    p.add_argument("--context-parallel-size", type=int, default=1, choices=[1],
                   help="cached decoding runs without context parallelism")
    p.add_argument("--output-file", type=Path)
    p.add_argument("--max-seq-length", type=int, default=_env_int("EVO2_MAX_SEQ_LEN"),
                   help="longest prompt + new tokens allowed (default: $EVO2_MAX_SEQ_LEN, else no limit)")
    p.add_argument("--prompt-segmentation-threshold", type=int, default=_env_int("EVO2_PST"),
                   help="prefill at most this many prompt tokens at once, the rest one per step (bounds prefill "
                        "memory for long prompts; default: $EVO2_PST, else the whole prompt)")
    p.add_argument("--max-batch-size", type=int, default=1,
                   help="sequences decoded together; a finished one's slot goes to the next waiting prompt")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated (one prompt)")
    p.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=True,
                   help="replay each decode step as one CUDA graph (GPU, TP=1; default on, falls back to eager if "
                        "capture fails; --no-cuda-graph decodes eagerly)")
    add_model_runtime_flags(p)
    add_cpu_flag(p)
    return p


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise SystemExit(f"infer_evo2: error: environment variable {name}={value!r} is not an integer") from None


def read_prompts(args) -> list[dict]:
    if args.prompt_file is None:
        return [{"id": "0", "prompt": args.prompt}]
    path = args.prompt_file
    if not path.is_file():
        raise FileNotFoundError(f"--prompt-file not found: {path}")
    text = path.read_text()
    first = next((line for line in text.splitlines() if line.strip()), "")
    if first.startswith(">"):
        from evo2_recipe.data.fasta import iter_fasta

        prompts = [{"id": name, "prompt": seq} for name, seq in iter_fasta(path)]
    elif first.lstrip().startswith("{"):
        prompts = []
        for i, line in enumerate(text.splitlines()):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i + 1}: not JSON ({e}); each line must be {{\"prompt\": ...}}")
            if "prompt" not in rec:
                raise ValueError(f"{path}:{i + 1}: missing \"prompt\"")
            prompts.append({"id": str(rec.get("id", i)), "prompt": rec["prompt"]})
    else:
        prompts = [{"id": str(i), "prompt": line.strip()} for i, line in enumerate(text.splitlines()) if line.strip()]
    if not prompts:
        raise ValueError(f"{path} has no prompts")
    return prompts


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    setup_logging(args.verbose)
    apply_runtime_mode(args)
    import torch

    from evo2_recipe.inference.api import Evo2
    from evo2_recipe.inference.loading import CheckpointError
    from evo2_recipe.utils.distributed import teardown

    try:
        prompts = read_prompts(args)
        if args.stream and len(prompts) > 1:
            raise ValueError("--stream prints one sequence as it grows; give a single prompt")
        evo = Evo2.from_checkpoint(str(args.ckpt_dir), tp=args.tensor_parallel_size, sequence_parallel=False,
                                   mixed_precision_recipe=args.mixed_precision_recipe,
                                   vortex_style_fp8=args.vortex_style_fp8 or None,
                                   model_overrides={"use_subquadratic_ops": True} if args.use_subquadratic_ops
                                   else None)
        evo.tokenize([r["prompt"] for r in prompts])
    except (FileNotFoundError, NotADirectoryError, CheckpointError, ValueError) as e:
        p.exit(2, f"infer_evo2: error: {e}\n")
    is_writer = torch.distributed.get_rank() == 0
    def print_text(_, text):
        sys.stdout.write(text)
        sys.stdout.flush()

    on_text = print_text if args.stream and is_writer else None
    t0 = time.perf_counter()
    try:
        outs = evo.generate([r["prompt"] for r in prompts], args.max_new_tokens, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p, seed=args.seed, max_seq_length=args.max_seq_length,
                            max_batch_size=args.max_batch_size, on_text=on_text, cuda_graph=args.cuda_graph,
                            prompt_segmentation_threshold=args.prompt_segmentation_threshold)
    except ValueError as e:
        p.exit(2, f"infer_evo2: error: {e}\n")
    if on_text is not None:
        sys.stdout.write("\n")
    records, n_new = [], 0
    for rec, out in zip(prompts, outs):
        n_prompt, n_gen = len(rec["prompt"]), len(out["tokens"])
        n_new += n_gen
        item = {"id": rec["id"], "prompt": rec["prompt"], "completion": out["text"],
                "finish_reason": out["finish_reason"],
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_gen, "total_tokens": n_prompt + n_gen}}
        if args.return_log_probs:
            item["logprobs"] = {"completion_logprobs": out["log_probs"]}
        records.append(item)
    dt = time.perf_counter() - t0
    if is_writer:
        logger.info("[PERF] %d completion tokens in %.2fs (%.1f tok/s)", n_new, dt, n_new / max(dt, 1e-9))
        for r in records if not args.stream else ():
            print(f"\n=== [{r['id']}] Generated Text ===\n{r['completion']}")
        if args.output_file:
            args.output_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = args.output_file.with_suffix(args.output_file.suffix + ".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
            tmp.replace(args.output_file)
    teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
