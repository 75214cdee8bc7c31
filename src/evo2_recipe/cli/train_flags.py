"""``train_evo2``'s flags: one table from each reference flag to where its value goes.

A target is either a key of the ``ConfigContainer`` (``section.field``, set after the recipe builds it), a parameter
of :func:`evo2_recipe.training.recipe.evo2_pretrain_config` (``recipe.name``: settings that shape several keys, such as
``--wd``, which is the optimizer's and the scheduler's weight decay), ``runtime`` (how the process runs: logging,
CPU mode), ``marker`` (a flag that only pairs with another, checked here) or a refusal with its reason. Defaults are
the recipe's, never repeated here: a flag not given leaves the recipe's value (``--print-config`` shows them all).
"""

from __future__ import annotations

import argparse
import inspect
from dataclasses import dataclass
from typing import Any, Callable

_UNSET = object()


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _zero_is_off(text: str) -> int | None:
    return int(text) or None


@dataclass(frozen=True)
class Flag:
    names: tuple[str, ...]
    target: str  # "section.field[.key]" | "recipe.<parameter>" | "runtime" | "marker" | "refused"
    type: Callable | None = None  # None: a switch that writes ``const``
    const: Any = True
    help: str = ""
    group: str | None = None  # flags of one group exclude each other
    choices: tuple | None = None
    nargs: str | None = None
    refuse: str | None = None  # the reason a refused flag gives

    @property
    def dest(self) -> str:
        return self.names[-1].lstrip("-").replace("-", "_")


F = Flag
TRAIN_FLAGS: tuple[Flag, ...] = (
    # data: exactly one source
    F(("-d", "--dataset-config"), "dataset.dataset_config", str, group="data",
      help="blended-dataset YAML (preprocessed .bin/.idx prefixes)"),
    F(("--mock-data",), "dataset.mock", group="data", help="deterministic mock data"),
    F(("--fasta-data",), "marker", group="data",
      help="train on windows of --fasta-file (records split 90/5/5 by a hash of their id)"),
    F(("--sharded-eden-data",), "marker", group="data",
      help="train on Sharded-Eden SQLite windows (--sequence-db-dir and the three window DBs)"),
    F(("--fasta-file",), "dataset.fasta_file", str, help="FASTA (or .fa.gz) for --fasta-data"),
    F(("--sequence-db-dir",), "dataset.sequence_db_dir", str,
      help="Sharded-Eden: directory of <sample>/glm_dataset_<sample>.sqlite"),
    F(("--train-window-db",), "dataset.window_dbs.train", str, help="Sharded-Eden: training window database"),
    F(("--val-window-db",), "dataset.window_dbs.validation", str, help="Sharded-Eden: validation window database"),
    F(("--test-window-db",), "dataset.window_dbs.test", str, help="Sharded-Eden: test window database"),
    F(("--stride",), "dataset.stride", int, help="window stride (must match the window databases)"),
    F(("--window-min-length-threshold",), "dataset.window_min_length_threshold", int,
      help="drop windows shorter than this (must match the window databases when > 0)"),
    F(("--rc-aug",), "dataset.rc_aug", help="window data: reverse-complement each training window with p=0.5"),
    F(("--dataset-dir",), "dataset.dataset_dir", str,
      help="directory that relative dataset_prefix entries resolve against"),
    F(("--dataset-seed",), "dataset.random_seed", int, help="(default: --seed)"),
    F(("--workers",), "recipe.workers", int, help="data-loader workers"),
    F(("--eod-pad-in-loss-mask",), "dataset.eod_pad_in_loss_mask", group="eod",
      help="do not predict EOD/PAD tokens (the default already never predicts them, as in the reference)"),
    F(("--predict-eod",), "dataset.predict_eod", group="eod",
      help="also train on the EOD label ending each document, so generation learns to stop (not in the reference)"),
    # model
    F(("--model-size",), "recipe.model_size", str),
    F(("--seq-length",), "recipe.seq_length", int, help="model and data sequence length"),
    F(("--tensor-model-parallel-size",), "recipe.tensor_model_parallel_size", int),
    F(("--pipeline-model-parallel-size",), "recipe.pipeline_model_parallel_size", int),
    F(("--context-parallel-size",), "recipe.context_parallel_size", int),
    F(("--sequence-parallel",), "model.sequence_parallel", help="(the default when TP > 1)"),
    F(("--use-megatron-comm-overlap-llama3-8k",), "recipe.tp_comm_overlap",
      help="overlap TP communication with GEMMs (Transformer Engine userbuffers; TP > 1 with sequence parallelism)"),
    F(("--tp-comm-overlap-backend",), "recipe.tp_comm_overlap_backend", str, choices=("nccl", "mpi", "gloo"),
      help="bootstrap backend of the userbuffers (default nccl)"),
    F(("--no-sequence-parallel",), "model.sequence_parallel", const=False, help="turn SP off with TP > 1"),
    F(("--num-layers",), "model.num_layers", int),
    F(("--hybrid-override-pattern",), "model.hybrid_override_pattern", str),
    F(("--ffn-hidden-size",), "model.ffn_hidden_size", int),
    F(("--hidden-dropout",), "model.hidden_dropout", float),
    F(("--attention-dropout",), "model.attention_dropout", float),
    F(("--add-bias-output",), "model.add_bias_output"),
    F(("--seq-len-interpolation-factor",), "model.seq_len_interpolation_factor", float),
    F(("--no-fp32-residual-connection",), "model.fp32_residual_connection", const=False),
    F(("--use-subquadratic-ops",), "model.use_subquadratic_ops",
      help="NVIDIA's subquadratic-ops-torch for the Hyena convolutions where it is installed and serves the GPU "
           "(checked against the plain operators at start; else evo2-recipe's own kernels, said in the log)"),
    F(("--spike-no-more-embedding-init",), "recipe.spike_no_more_embedding_init"),
    F(("--no-renormalize-loss",), "model.to_upper", const="weighted"),
    F(("--cross-entropy-loss-fusion",), "model.cross_entropy_loss_fusion"),
    F(("--no-calculate-per-token-loss",), "model.calculate_per_token_loss", const=False),
    F(("--cuda-graph",), "recipe.cuda_graph",
      help="replay each training step as one CUDA graph (GPU; turns off the per-step NaN checks of loss and grads)"),
    F(("--no-activation-checkpointing",), "recipe.activation_checkpointing", const="none", group="ac"),
    F(("--selective-activation-checkpointing",), "recipe.activation_checkpointing", const="selective", group="ac"),
    F(("--activation-checkpoint-recompute-num-layers",), "model.recompute_num_layers", int),
    # precision
    F(("--mixed-precision-recipe",), "recipe.mixed_precision_recipe", str,
      help="Megatron-Bridge recipe name (default bf16_mixed on GPU, fp32 on CPU)"),
    F(("--no-fp8-wgrad",), "recipe.fp8_wgrad", const=False),
    F(("--no-fp8-param-gather",), "recipe.fp8_param_gather", const=False),
    F(("--grad-reduce-in-fp32",), "recipe.grad_reduce_in_fp32", help="(the default)"),
    F(("--no-grad-reduce-in-fp32",), "recipe.grad_reduce_in_fp32", const=False),
    F(("--vortex-style-fp8",), "model.vortex_style_fp8", help="FP8 only for the Hyena input projections"),
    # schedule and optimizer
    F(("--micro-batch-size",), "train.micro_batch_size", int),
    F(("--global-batch-size",), "train.global_batch_size", int),
    F(("--max-steps",), "recipe.max_steps", int),
    F(("--early-stop-on-step",), "train.exit_interval", int, help="stop (after saving) at this step"),
    F(("--warmup-steps",), "recipe.warmup_steps", int),
    F(("--constant-steps",), "recipe.constant_steps", int),
    F(("--decay-steps",), "recipe.decay_steps", int),
    F(("--lr",), "optimizer.lr", float),
    F(("--min-lr",), "optimizer.min_lr", float),
    F(("--eval-interval",), "recipe.eval_interval", int, help="also the checkpoint interval"),
    F(("--eval-iters",), "validation.eval_iters", int),
    F(("--seed",), "recipe.seed", int),
    F(("--wd",), "recipe.wd", float),
    F(("--adam-beta1",), "optimizer.adam_beta1", float),
    F(("--adam-beta2",), "optimizer.adam_beta2", float),
    F(("--adam-eps",), "optimizer.adam_eps", float),
    F(("--clip-grad",), "optimizer.clip_grad", float),
    F(("--use-precision-aware-optimizer",), "optimizer.use_precision_aware_optimizer"),
    F(("--bf16-main-grads",), "optimizer.main_grads_dtype", const="bfloat16"),
    F(("--no-weight-decay-embeddings",), "optimizer_config_override_provider.no_weight_decay_embeddings"),
    F(("--log-num-zeros-in-grad",), "optimizer.log_num_zeros_in_grad"),
    F(("--average-in-collective",), "ddp.average_in_collective"),
    F(("--overlap-param-gather",), "ddp.overlap_param_gather"),
    F(("--overlap-grad-reduce",), "ddp.overlap_grad_reduce"),
    F(("--align-param-gather",), "ddp.align_param_gather"),
    F(("--no-check-for-nan-in-grad",), "ddp.check_for_nan_in_grad", const=False),
    # checkpoints, runs, logging
    F(("--result-dir",), "recipe.result_dir", str),
    F(("--experiment-name",), "recipe.experiment_name", str),
    F(("--finetune-ckpt-dir",), "recipe.finetune_ckpt_dir", str),
    F(("--ckpt-async-save",), "checkpoint.async_save"),
    F(("--ckpt-format",), "checkpoint.ckpt_format", str, choices=("torch_dist", "zarr")),
    F(("--most-recent-k",), "checkpoint.most_recent_k", int),
    F(("--optim-fmt-pre-mcore-014",), "checkpoint.dist_ckpt_save_pre_mcore_014", group="fmt"),
    F(("--optim-full-reshardable",), "checkpoint.dist_ckpt_optim_fully_reshardable", group="fmt"),
    F(("--enable-preemption",), "train.exit_signal_handler"),
    F(("--log-interval",), "logger.log_interval", int),
    F(("--disable-tensorboard-logger",), "logger.tensorboard_dir", const=None),
    F(("--wandb-project",), "logger.wandb_project", str),
    F(("--wandb-entity",), "logger.wandb_entity", str),
    F(("--wandb-run-name",), "logger.wandb_exp_name", str),
    F(("--debug-ddp-parity-freq",), "train.check_weight_hash_across_dp_replicas_interval", _zero_is_off),
    F(("--gc-interval",), "recipe.gc_interval", int),
    F(("--garbage-collect-at-inference",), "recipe.garbage_collect_at_inference"),
    F(("--nsys-profiling",), "recipe.nsys_profiling"),
    F(("--nsys-start-step",), "recipe.nsys_start_step", int),
    F(("--nsys-end-step",), "recipe.nsys_end_step", int),
    F(("--nsys-ranks",), "recipe.nsys_ranks", int, nargs="+"),
    F(("--hf-tokenizer-model-path",), "recipe.tokenizer_path", str, group="tok"),
    # LoRA (with --finetune-ckpt-dir BASE)
    F(("--lora-finetune",), "recipe.lora_finetune", help="train LoRA adapters on a frozen base"),
    F(("--lora-dim",), "recipe.lora_dim", int, help="adapter rank"),
    F(("--lora-alpha",), "recipe.lora_alpha", int, help="adapter scale is alpha/dim"),
    F(("--lora-dropout",), "recipe.lora_dropout", float),
    F(("--lora-target-modules",), "recipe.lora_target_modules", _csv,
      help="comma-separated short names or wildcard paths (default: every linear of every layer)"),
    F(("--lora-skip-freeze-modules",), "recipe.lora_skip_freeze_modules", _csv,
      help="modules left fully trainable (tied embeddings: word_embeddings,output_layer together)"),
    # how the process runs
    F(("--wandb-offline",), "runtime", help="write W&B runs locally (also WANDB_MODE=offline)"),
    F(("-v", "--debug", "--verbose"), "runtime", help="DEBUG logging and dependency notices"),
    F(("--print-config",), "runtime", help="print the resolved ConfigContainer (every default) and exit"),
    F(("--use-targeted-variance-loss",), "refused",
      refuse="the targeted variance loss is not implemented (the reference ignores it too)"),
    F(("--nvidia-fault-tolerance",), "refused", refuse="NVIDIA fault tolerance needs the NVIDIA cluster services"),
    F(("--hf-tokenizer-model-name",), "refused", str, group="tok",
      refuse="it needs a model hub; download the tokenizer and pass --hf-tokenizer-model-path"),
)


def add_flags(p: argparse.ArgumentParser, flags: tuple[Flag, ...] = TRAIN_FLAGS) -> None:
    """Every flag with ``default=SUPPRESS``: what the user did not give is absent from the namespace."""
    groups: dict[str, Any] = {}
    for f in flags:
        where = p
        if f.group:
            if f.group not in groups:
                groups[f.group] = p.add_mutually_exclusive_group(required=f.group == "data")
            where = groups[f.group]
        kw: dict[str, Any] = dict(dest=f.dest, default=argparse.SUPPRESS)
        if f.refuse:
            kw["help"] = argparse.SUPPRESS
        elif f.target not in ("runtime", "marker"):
            kw["help"] = f"{f.help} [{f.target}]".strip()
        else:
            kw["help"] = f.help
        if f.type is None:
            kw.update(action="store_const", const=f.const)
        else:
            kw.update(type=f.type, choices=f.choices, nargs=f.nargs)
        where.add_argument(*f.names, **kw)


def split_args(args: argparse.Namespace, flags: tuple[Flag, ...] = TRAIN_FLAGS,
               prog: str = "train_evo2") -> tuple[dict[str, Any], dict[str, Any]]:
    """The given flags as (recipe keyword arguments, {config key: value}); refused flags and unpaired markers exit
    with a message naming the flag."""
    given = vars(args)
    recipe, keys = {}, {}
    for f in flags:
        if f.dest not in given:
            continue
        value = given[f.dest]
        if f.target == "refused":
            if f.choices and value == f.choices[0]:  # the reference's default value is harmless
                continue
            raise SystemExit(f"{prog}: {f.names[-1]} is not supported: {f.refuse}")
        if f.target.startswith("recipe."):
            recipe[f.target.removeprefix("recipe.")] = value
        elif f.target not in ("runtime", "marker"):
            keys[f.target] = value
    if ("fasta_data" in given) != ("dataset.fasta_file" in keys):
        raise SystemExit(f"{prog}: --fasta-data and --fasta-file FILE go together")
    eden = [k for k in keys if k == "dataset.sequence_db_dir" or k.startswith("dataset.window_dbs.")]
    if ("sharded_eden_data" in given) != bool(eden) or ("sharded_eden_data" in given and len(eden) != 4):
        raise SystemExit(f"{prog}: --sharded-eden-data needs --sequence-db-dir, --train-window-db, --val-window-db "
                         f"and --test-window-db (and they mean nothing without it)")
    return recipe, keys


def set_key(cfg: Any, key: str, value: Any) -> None:
    """``cfg.a.b = value`` for ``key="a.b"``; dict-valued fields (``dataset.window_dbs.train``) are created as needed;
    a key that does not exist is an error (a typo in the table must not pass silently)."""
    import torch

    *path, last = key.split(".")
    node = cfg
    for i, part in enumerate(path):
        child = node.get(part) if isinstance(node, dict) else getattr(node, part, _UNSET)
        if child is _UNSET:
            raise KeyError(f"config has no key {'.'.join(path[:i + 1])}")
        if child is None:  # an optional dict field not set yet
            child = {}
            setattr(node, part, child)
        node = child
    if isinstance(node, dict):
        node[last] = value
        return
    if not hasattr(node, last):
        raise KeyError(f"config has no key {key}")
    if isinstance(value, str) and value in ("bfloat16", "float32") and "dtype" in last:
        value = getattr(torch, value)
    setattr(node, last, value)


def recipe_defaults() -> dict[str, Any]:
    """The recipe's keyword defaults (one place: the signature of ``evo2_pretrain_config``)."""
    from evo2_recipe.training.recipe import evo2_pretrain_config

    return {n: p.default for n, p in inspect.signature(evo2_pretrain_config).parameters.items()}
