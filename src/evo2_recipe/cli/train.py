"""``train_evo2``: train an Evo 2 / StripedHyena 2 model with Megatron-Bridge's ``pretrain``.

    torchrun --nproc-per-node 8 --no-python train_evo2 -d data.yaml --model-size evo2_1b_base \\
        --micro-batch-size 2 --global-batch-size 64 model.num_layers=4 optimizer.lr=3e-4

Flags follow the reference recipe; trailing ``KEY=VALUE`` pairs are Hydra overrides on the ``ConfigContainer``.
Flags the reference accepts but ignores either work here or are rejected with an explanation.
"""

from __future__ import annotations

import argparse
import logging
import sys

from evo2_recipe.cli.common import add_cpu_flag, apply_runtime_mode, setup_logging

logger = logging.getLogger("train_evo2")

_UNSUPPORTED = {
    "use_targeted_variance_loss": "the targeted variance loss is not implemented (the reference ignores it too)",
    "use_megatron_comm_overlap_llama3_8k": "TP communication overlap needs Transformer Engine userbuffers",
    "nvidia_fault_tolerance": "NVIDIA fault tolerance needs the NVIDIA cluster services",
}


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train_evo2", description="Train an Evo2/Hyena-family model.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("-d", "--dataset-config", help="blended-dataset YAML (preprocessed .bin/.idx prefixes)")
    data.add_argument("--mock-data", action="store_true", help="deterministic mock data")
    data.add_argument("--fasta-data", action="store_true",
                      help="train on windows of --fasta-file (records split 90/5/5 by a hash of their id)")
    data.add_argument("--sharded-eden-data", action="store_true",
                      help="train on Sharded-Eden SQLite windows (--sequence-db-dir and the three window DBs)")
    p.add_argument("--fasta-file", help="FASTA (or .fa.gz) for --fasta-data")
    p.add_argument("--sequence-db-dir", help="Sharded-Eden: directory of <sample>/glm_dataset_<sample>.sqlite")
    p.add_argument("--train-window-db", help="Sharded-Eden: training window database")
    p.add_argument("--val-window-db", help="Sharded-Eden: validation window database")
    p.add_argument("--test-window-db", help="Sharded-Eden: test window database")
    p.add_argument("--stride", type=int, default=7992, help="window stride (must match the window databases)")
    p.add_argument("--window-min-length-threshold", type=int, default=0,
                   help="drop windows shorter than this (must match the window databases when > 0)")
    p.add_argument("--rc-aug", action="store_true",
                   help="window data: reverse-complement each training window with probability 0.5")
    p.add_argument("--dataset-dir", help="directory that relative dataset_prefix entries resolve against")
    p.add_argument("--model-size", default="evo2_1b_base")
    p.add_argument("--seq-length", type=int, default=8192)
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--context-parallel-size", type=int, default=1)
    p.add_argument("--sequence-parallel", action="store_true", help="(default when TP > 1)")
    p.add_argument("--no-sequence-parallel", action="store_true", help="turn SP off with TP > 1")
    p.add_argument("--num-layers", type=int)
    p.add_argument("--hybrid-override-pattern")
    p.add_argument("--ffn-hidden-size", type=int)
    p.add_argument("--hidden-dropout", type=float, default=0.0)
    p.add_argument("--attention-dropout", type=float, default=0.0)
    p.add_argument("--add-bias-output", action="store_true")
    p.add_argument("--seq-len-interpolation-factor", type=float)
    p.add_argument("--no-fp32-residual-connection", action="store_true")
    p.add_argument("--use-subquadratic-ops", action="store_true",
                   help="fused Hyena kernels (ours, in Triton, CUDA; opt-in until measured)")
    p.add_argument("--spike-no-more-embedding-init", action="store_true")
    p.add_argument("--use-targeted-variance-loss", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mixed-precision-recipe", default=None,
                   help="Megatron-Bridge recipe name (default bf16_mixed on GPU, fp32 on CPU)")
    p.add_argument("--no-fp8-wgrad", action="store_true")
    p.add_argument("--no-fp8-param-gather", action="store_true")
    p.add_argument("--grad-reduce-in-fp32", action="store_true", help="(default)")
    p.add_argument("--no-grad-reduce-in-fp32", action="store_true")
    p.add_argument("--vortex-style-fp8", action="store_true")
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--global-batch-size", type=int, default=8)
    p.add_argument("--max-steps", type=int, default=100000)
    p.add_argument("--early-stop-on-step", type=int, help="stop (after saving) at this step")
    p.add_argument("--warmup-steps", type=int, default=2500)
    p.add_argument("--constant-steps", type=int, default=2500)
    p.add_argument("--decay-steps", type=int)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--min-lr", type=float, default=3e-5)
    p.add_argument("--eval-interval", type=int, default=100, help="also the checkpoint interval")
    p.add_argument("--eval-iters", type=int, default=32)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--dataset-seed", type=int)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--wd", type=float, default=0.01)
    p.add_argument("--adam-beta1", type=float, default=0.9)
    p.add_argument("--adam-beta2", type=float, default=0.95)
    p.add_argument("--adam-eps", type=float, default=1e-8)
    p.add_argument("--clip-grad", type=float, default=1.0)
    p.add_argument("--use-precision-aware-optimizer", action="store_true")
    p.add_argument("--bf16-main-grads", action="store_true")
    p.add_argument("--no-weight-decay-embeddings", action="store_true")
    p.add_argument("--log-num-zeros-in-grad", action="store_true")
    p.add_argument("--average-in-collective", action="store_true")
    p.add_argument("--overlap-param-gather", action="store_true")
    p.add_argument("--overlap-grad-reduce", action="store_true")
    p.add_argument("--align-param-gather", action="store_true")
    p.add_argument("--no-check-for-nan-in-grad", action="store_true")
    p.add_argument("--use-megatron-comm-overlap-llama3-8k", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tp-comm-overlap-backend", default="nccl", choices=["nccl", "mpi", "gloo"],
                   help="only meaningful with TP communication overlap, which needs Transformer Engine userbuffers "
                        "(not supported here): values other than nccl are refused")
    eod = p.add_mutually_exclusive_group()
    eod.add_argument("--eod-pad-in-loss-mask", action="store_true",
                     help="do not predict EOD/PAD tokens (the default already never predicts them, as in the "
                          "reference; kept for compatibility)")
    eod.add_argument("--predict-eod", action="store_true",
                     help="also train on the EOD label ending each document, so generation learns to stop "
                          "(not in the reference; PAD is never predicted)")
    p.add_argument("--no-renormalize-loss", action="store_true")
    p.add_argument("--cross-entropy-loss-fusion", action="store_true")
    p.add_argument("--no-calculate-per-token-loss", action="store_true")
    ac = p.add_mutually_exclusive_group()
    ac.add_argument("--no-activation-checkpointing", action="store_true")
    ac.add_argument("--selective-activation-checkpointing", action="store_true")
    p.add_argument("--activation-checkpoint-recompute-num-layers", type=int)
    p.add_argument("--result-dir", default="./results")
    p.add_argument("--experiment-name", default="evo2")
    p.add_argument("--finetune-ckpt-dir")
    p.add_argument("--ckpt-async-save", action="store_true")
    p.add_argument("--ckpt-format", default="torch_dist", choices=["torch_dist", "zarr"])
    p.add_argument("--most-recent-k", type=int, default=5)
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--optim-fmt-pre-mcore-014", action="store_true")
    fmt.add_argument("--optim-full-reshardable", action="store_true")
    p.add_argument("--enable-preemption", action="store_true")
    p.add_argument("--nvidia-fault-tolerance", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--log-interval", type=int, default=10)
    p.add_argument("--disable-tensorboard-logger", action="store_true")
    p.add_argument("--wandb-project")
    p.add_argument("--wandb-entity")
    p.add_argument("--wandb-run-name")
    p.add_argument("--wandb-offline", action="store_true", help="write W&B runs locally (also WANDB_MODE=offline)")
    p.add_argument("-v", "--debug", "--verbose", dest="debug", action="store_true",
                   help="DEBUG logging and dependency notices")
    p.add_argument("--debug-ddp-parity-freq", type=int, default=0)
    p.add_argument("--gc-interval", type=int, default=0)
    p.add_argument("--garbage-collect-at-inference", action="store_true")
    p.add_argument("--nsys-profiling", action="store_true")
    p.add_argument("--nsys-start-step", type=int, default=0)
    p.add_argument("--nsys-end-step", type=int)
    p.add_argument("--nsys-ranks", type=int, nargs="+", default=[0])
    tok = p.add_mutually_exclusive_group()
    tok.add_argument("--hf-tokenizer-model-path")
    tok.add_argument("--hf-tokenizer-model-name", help=argparse.SUPPRESS)
    lora = p.add_argument_group("LoRA (with --finetune-ckpt-dir BASE)")
    lora.add_argument("--lora-finetune", action="store_true", help="train LoRA adapters on a frozen base")
    lora.add_argument("--lora-dim", type=int, default=16, help="adapter rank")
    lora.add_argument("--lora-alpha", type=int, default=32, help="adapter scale is alpha/dim")
    lora.add_argument("--lora-dropout", type=float, default=0.1)
    lora.add_argument("--lora-target-modules", type=_csv,
                      help="comma-separated short names or wildcard paths (default: every linear of every layer, "
                           "evo2_recipe.models.lora.DEFAULT_TARGETS)")
    lora.add_argument("--lora-skip-freeze-modules", type=_csv, default="",
                      help="modules left fully trainable (tied embeddings: word_embeddings,output_layer together)")
    add_cpu_flag(p)
    p.add_argument("overrides", nargs="*", help="Hydra-style overrides, e.g. model.num_layers=4 optimizer.lr=3e-4")
    return p


def settings_from_args(args: argparse.Namespace, cpu: bool):
    from evo2_recipe.training.recipe import TrainSettings

    for flag, why in _UNSUPPORTED.items():
        if getattr(args, flag, None):
            raise SystemExit(f"train_evo2: --{flag.replace('_', '-')} is not supported: {why}")
    if args.hf_tokenizer_model_name:
        raise SystemExit("train_evo2: --hf-tokenizer-model-name needs a model hub; download the tokenizer and pass "
                         "--hf-tokenizer-model-path")
    if args.tp_comm_overlap_backend != "nccl":
        raise SystemExit("train_evo2: --tp-comm-overlap-backend selects the backend of TP communication overlap, "
                         "which needs Transformer Engine userbuffers and is not supported here; drop the flag")
    if args.fasta_data != (args.fasta_file is not None):
        raise SystemExit("train_evo2: --fasta-data and --fasta-file FILE go together")
    eden = [args.sequence_db_dir, args.train_window_db, args.val_window_db, args.test_window_db]
    if args.sharded_eden_data != (args.sequence_db_dir is not None) or (args.sharded_eden_data and None in eden):
        raise SystemExit("train_evo2: --sharded-eden-data needs --sequence-db-dir, --train-window-db, "
                         "--val-window-db and --test-window-db (and they mean nothing without it)")
    for o in args.overrides:
        if "=" not in o:
            raise SystemExit(f"train_evo2: unrecognised argument {o!r} (overrides look like section.key=value)")
    ac = "none" if args.no_activation_checkpointing else "selective" if args.selective_activation_checkpointing \
        else "default"
    return TrainSettings(
        model_size=args.model_size, mock_data=args.mock_data, dataset_config=args.dataset_config,
        dataset_dir=args.dataset_dir, fasta_file=args.fasta_file, sequence_db_dir=args.sequence_db_dir,
        train_window_db=args.train_window_db, val_window_db=args.val_window_db, test_window_db=args.test_window_db,
        stride=args.stride, window_min_length_threshold=args.window_min_length_threshold, rc_aug=args.rc_aug,
        seq_length=args.seq_length,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        context_parallel_size=args.context_parallel_size,
        sequence_parallel=False if args.no_sequence_parallel else None, num_layers=args.num_layers,
        hybrid_override_pattern=args.hybrid_override_pattern, ffn_hidden_size=args.ffn_hidden_size,
        hidden_dropout=args.hidden_dropout, attention_dropout=args.attention_dropout,
        add_bias_output=args.add_bias_output, seq_len_interpolation_factor=args.seq_len_interpolation_factor,
        fp32_residual_connection=not args.no_fp32_residual_connection,
        spike_no_more_embedding_init=args.spike_no_more_embedding_init,
        mixed_precision_recipe=args.mixed_precision_recipe or (None if cpu else "bf16_mixed"),
        fp8_wgrad=not args.no_fp8_wgrad, fp8_param_gather=not args.no_fp8_param_gather,
        grad_reduce_in_fp32=not args.no_grad_reduce_in_fp32, vortex_style_fp8=args.vortex_style_fp8,
        micro_batch_size=args.micro_batch_size, global_batch_size=args.global_batch_size, max_steps=args.max_steps,
        early_stop_on_step=args.early_stop_on_step, warmup_steps=args.warmup_steps,
        constant_steps=args.constant_steps, decay_steps=args.decay_steps, lr=args.lr, min_lr=args.min_lr,
        eval_interval=args.eval_interval, eval_iters=args.eval_iters, seed=args.seed, dataset_seed=args.dataset_seed,
        workers=args.workers, wd=args.wd, adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2,
        adam_eps=args.adam_eps, clip_grad=args.clip_grad,
        use_precision_aware_optimizer=args.use_precision_aware_optimizer, bf16_main_grads=args.bf16_main_grads,
        no_weight_decay_embeddings=args.no_weight_decay_embeddings, log_num_zeros_in_grad=args.log_num_zeros_in_grad,
        average_in_collective=args.average_in_collective, overlap_param_gather=args.overlap_param_gather,
        overlap_grad_reduce=args.overlap_grad_reduce, align_param_gather=args.align_param_gather,
        check_for_nan_in_grad=not args.no_check_for_nan_in_grad, eod_pad_in_loss_mask=args.eod_pad_in_loss_mask,
        predict_eod=args.predict_eod,
        renormalize_loss=not args.no_renormalize_loss, cross_entropy_loss_fusion=args.cross_entropy_loss_fusion,
        calculate_per_token_loss=not args.no_calculate_per_token_loss, activation_checkpointing=ac,
        recompute_num_layers=args.activation_checkpoint_recompute_num_layers, result_dir=args.result_dir,
        experiment_name=args.experiment_name, finetune_ckpt_dir=args.finetune_ckpt_dir,
        lora_finetune=args.lora_finetune, lora_dim=args.lora_dim, lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout, lora_target_modules=args.lora_target_modules,
        lora_skip_freeze_modules=args.lora_skip_freeze_modules,
        ckpt_async_save=args.ckpt_async_save, ckpt_format=args.ckpt_format, most_recent_k=args.most_recent_k,
        optim_fmt_pre_mcore_014=args.optim_fmt_pre_mcore_014, optim_full_reshardable=args.optim_full_reshardable,
        enable_preemption=args.enable_preemption, log_interval=args.log_interval,
        tensorboard=not args.disable_tensorboard_logger, wandb_project=args.wandb_project,
        wandb_entity=args.wandb_entity, wandb_run_name=args.wandb_run_name,
        debug_ddp_parity_freq=args.debug_ddp_parity_freq, gc_interval=args.gc_interval,
        garbage_collect_at_inference=args.garbage_collect_at_inference, nsys_profiling=args.nsys_profiling,
        nsys_start_step=args.nsys_start_step, nsys_end_step=args.nsys_end_step, nsys_ranks=args.nsys_ranks,
        hf_tokenizer_model_path=args.hf_tokenizer_model_path, cpu=cpu,
        use_subquadratic_ops=args.use_subquadratic_ops,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.debug)
    if args.wandb_offline:
        import os

        os.environ["WANDB_MODE"] = "offline"
    cpu = apply_runtime_mode(args)
    from megatron.bridge.training.pretrain import pretrain

    from evo2_recipe.training.forward_step import hyena_forward_step
    from evo2_recipe.training.recipe import apply_overrides, build_config

    try:
        settings = settings_from_args(args, cpu)
        cfg = apply_overrides(build_config(settings), args.overrides)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"train_evo2: error: {e}") from None
    logger.info("model size %s, run directory %s", settings.model_size, settings.run_dir)
    if settings.use_subquadratic_ops:
        from evo2_recipe.models.hyena.kernels import describe_subquadratic_request

        logger.info(describe_subquadratic_request())
    from evo2_recipe.training.metrics import ThroughputCallback

    pretrain(cfg, hyena_forward_step, callbacks=[ThroughputCallback()])
    if not settings.ckpt_async_save:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
