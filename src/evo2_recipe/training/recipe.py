"""Build Megatron-Bridge's ``ConfigContainer`` for Evo 2 training from plain settings (what ``train_evo2`` parses).

One function, :func:`build_config`, maps a :class:`TrainSettings` onto Bridge's sub-configs (spec section 2.1). The
weight-decay exclusions live in :class:`HyenaOptimizerConfigOverrideProvider`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from evo2_recipe.compat import megatron_fixes

megatron_fixes.install_import_guard()  # Bridge imports without TE; the megatron fixes are applied by entry points

from megatron.bridge.training.config import (  # noqa: E402
    CheckpointConfig,
    ConfigContainer,
    DistributedDataParallelConfig,
    DistributedInitConfig,
    LoggerConfig,
    OptimizerConfigOverrideProvider,
    OptimizerConfigOverrideProviderContext,
    ProfilingConfig,
    RNGConfig,
    SchedulerConfig,
    TrainingConfig,
    ValidationConfig,
)
from megatron.bridge.training.mixed_precision import get_mixed_precision_config  # noqa: E402
from megatron.bridge.training.tokenizers.config import TokenizerConfig  # noqa: E402
from megatron.core.optimizer import OptimizerConfig  # noqa: E402
from megatron.core.optimizer import ParamGroupOverride, ParamKey  # noqa: E402
from megatron.core.optimizer.optimizer_config import ParamPredicate  # noqa: E402

from evo2_recipe.data.evo2_dataset import Evo2DatasetProvider  # noqa: E402
from evo2_recipe.data.tokenizer import default_tokenizer_path  # noqa: E402
from evo2_recipe.models.providers import get_provider  # noqa: E402

logger = logging.getLogger(__name__)

NO_WD_NAMES = ("*.bias", "*.filter.p", "*.filter.R", "*.filter.gamma", "*.short_conv.short_conv_weight")


def _is_1d(param) -> bool:
    return param.dim() == 1


@dataclass
class HyenaOptimizerConfigOverrideProvider(OptimizerConfigOverrideProvider):
    """No weight decay for biases, modal-filter parameters, hcs filters and every 1-D parameter (spec 2.6)."""

    no_weight_decay_embeddings: bool = False

    def build_config_overrides(self, context: OptimizerConfigOverrideProviderContext):
        names = NO_WD_NAMES + (("*embedding*",) if self.no_weight_decay_embeddings else ())
        overrides = {ParamKey(name=names, predicate=ParamPredicate(name="is_1d", fn=_is_1d)):
                     ParamGroupOverride(wd_mult=0.0)}
        if context.optimizer_config.decoupled_lr is not None:
            lr = {"max_lr": context.optimizer_config.decoupled_lr}
            if context.optimizer_config.decoupled_min_lr is not None:
                lr["min_lr"] = context.optimizer_config.decoupled_min_lr
            overrides[ParamKey(attr="is_embedding_or_output_parameter")] = lr
        return overrides


@dataclass
class TrainSettings:
    """Everything ``train_evo2`` can set; defaults are the reference CLI's."""

    model_size: str = "evo2_1b_base"
    mock_data: bool = False
    dataset_config: str | None = None
    dataset_dir: str | None = None
    fasta_file: str | None = None  # --fasta-data --fasta-file
    sequence_db_dir: str | None = None  # --sharded-eden-data
    train_window_db: str | None = None
    val_window_db: str | None = None
    test_window_db: str | None = None
    stride: int = 7992
    window_min_length_threshold: int = 0
    rc_aug: bool = False
    seq_length: int = 8192
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    context_parallel_size: int = 1
    sequence_parallel: bool | None = None  # None: on when TP > 1
    num_layers: int | None = None
    hybrid_override_pattern: str | None = None
    ffn_hidden_size: int | None = None
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    add_bias_output: bool = False
    seq_len_interpolation_factor: float | None = None
    fp32_residual_connection: bool = True
    spike_no_more_embedding_init: bool = False
    mixed_precision_recipe: str | None = "bf16_mixed"  # None: fp32 (CPU default)
    fp8_wgrad: bool = True
    fp8_param_gather: bool = True
    grad_reduce_in_fp32: bool = True
    vortex_style_fp8: bool = False
    use_subquadratic_ops: bool = False  # the reference's flag: force the fused Hyena kernels
    micro_batch_size: int = 1
    global_batch_size: int = 8
    max_steps: int = 100000
    early_stop_on_step: int | None = None
    warmup_steps: int = 2500
    constant_steps: int = 2500
    decay_steps: int | None = None
    lr: float = 3e-4
    min_lr: float = 3e-5
    eval_interval: int = 100
    eval_iters: int = 32
    seed: int = 1234
    dataset_seed: int | None = None
    workers: int = 8
    wd: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    use_precision_aware_optimizer: bool = False
    bf16_main_grads: bool = False
    no_weight_decay_embeddings: bool = False
    log_num_zeros_in_grad: bool = False
    average_in_collective: bool = False
    overlap_param_gather: bool = False
    overlap_grad_reduce: bool = False
    align_param_gather: bool = False
    check_for_nan_in_grad: bool = True
    # None: on when Transformer Engine or Apex is installed. Without them megatron-core 0.19's distributed optimizer
    # (torch Adam path) does not restore Adam moments on resume, so the plain optimizer is used (same math at DP=1).
    use_distributed_optimizer: bool | None = None
    eod_pad_in_loss_mask: bool = False
    predict_eod: bool = False
    renormalize_loss: bool = True
    cross_entropy_loss_fusion: bool = False
    calculate_per_token_loss: bool = True
    activation_checkpointing: str = "default"  # default | none | selective
    recompute_num_layers: int | None = None
    result_dir: str = "./results"
    experiment_name: str = "evo2"
    finetune_ckpt_dir: str | None = None
    lora_finetune: bool = False
    lora_dim: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    lora_target_modules: list[str] | None = None  # None: evo2_recipe.models.lora.DEFAULT_TARGETS
    lora_skip_freeze_modules: list[str] = field(default_factory=list)
    ckpt_async_save: bool = False
    ckpt_format: str = "torch_dist"
    most_recent_k: int = 5
    optim_fmt_pre_mcore_014: bool = False
    optim_full_reshardable: bool = False
    enable_preemption: bool = False
    log_interval: int = 10
    tensorboard: bool = True
    wandb_project: str | None = None
    wandb_entity: str | None = None
    wandb_run_name: str | None = None
    debug_ddp_parity_freq: int = 0
    gc_interval: int = 0
    garbage_collect_at_inference: bool = False
    nsys_profiling: bool = False
    nsys_start_step: int = 0
    nsys_end_step: int | None = None
    nsys_ranks: list[int] = field(default_factory=lambda: [0])
    hf_tokenizer_model_path: str | None = None
    cpu: bool = False

    @property
    def run_dir(self) -> Path:
        return Path(self.result_dir) / self.experiment_name


def validate_finetune_dir(path: str) -> str:
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"--finetune-ckpt-dir {path} does not exist or is not a directory")
    if not (any(p.glob("iter_*")) or (p / "run_config.yaml").exists()
            or (p / "latest_checkpointed_iteration.txt").exists()):
        raise FileNotFoundError(f"--finetune-ckpt-dir {path} holds no Megatron-Bridge checkpoint (expected iter_* "
                                f"folders, run_config.yaml or latest_checkpointed_iteration.txt)")
    return str(p.resolve())


def written_without_te(ckpt_dir: str) -> bool:
    """Whether a checkpoint was written by a model without Transformer Engine (local spec, converters, CPU): its final
    norm has no ``_extra_state`` (megatron's local linears write an empty one, TE's norms write theirs)."""
    from evo2_recipe.checkpoint.dcp_utils import resolve_iteration_dir, stored_keys

    try:
        keys = stored_keys(resolve_iteration_dir(ckpt_dir))
    except (FileNotFoundError, ValueError):  # not a readable DCP checkpoint: Bridge's own load reports it
        return False
    return "decoder.final_norm.weight" in keys and "decoder.final_norm._extra_state" not in keys


def build_config(s: TrainSettings) -> ConfigContainer:
    """Translate settings into Megatron-Bridge's ``ConfigContainer``."""
    sources = [s.mock_data, s.dataset_config is not None, s.fasta_file is not None, s.sequence_db_dir is not None]
    if sum(sources) != 1:
        raise ValueError("give exactly one data source: --mock-data, -d/--dataset-config, --fasta-data --fasta-file "
                         "FILE, or --sharded-eden-data --sequence-db-dir DIR with --train/val/test-window-db")
    windows = {"train": s.train_window_db, "validation": s.val_window_db, "test": s.test_window_db}
    if s.sequence_db_dir is not None and None in windows.values():
        raise ValueError("--sharded-eden-data needs --train-window-db, --val-window-db and --test-window-db "
                         "(evo2_precompute_windows writes them)")
    if s.rc_aug and s.fasta_file is None and s.sequence_db_dir is None:
        raise ValueError("--rc-aug applies to window data only (--fasta-data or --sharded-eden-data)")
    tp, pp, cp = s.tensor_model_parallel_size, s.pipeline_model_parallel_size, s.context_parallel_size
    if s.seq_length % (2 * cp) and cp > 1:
        raise ValueError(f"--seq-length {s.seq_length} must be divisible by 2*context-parallel-size = {2 * cp}")
    overrides = dict(
        seq_length=s.seq_length, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        context_parallel_size=cp, sequence_parallel=(tp > 1) if s.sequence_parallel is None else s.sequence_parallel,
        hidden_dropout=s.hidden_dropout, attention_dropout=s.attention_dropout,
        fp32_residual_connection=s.fp32_residual_connection, cross_entropy_loss_fusion=s.cross_entropy_loss_fusion,
        calculate_per_token_loss=s.calculate_per_token_loss, vortex_style_fp8=s.vortex_style_fp8,
        to_upper="normalized_weighted" if s.renormalize_loss else "weighted", perform_initialization=True,
    )
    for name in ("num_layers", "hybrid_override_pattern", "ffn_hidden_size", "seq_len_interpolation_factor"):
        if getattr(s, name) is not None:
            overrides[name] = getattr(s, name)
    if s.add_bias_output:
        overrides["add_bias_output"] = True
    if s.use_subquadratic_ops:
        overrides["use_fused_hyena_kernels"] = True
    if s.spike_no_more_embedding_init:
        overrides.update(share_embeddings_and_output_weights=False, embedding_init_method_std=1.0)
    if s.activation_checkpointing == "none":
        overrides.update(recompute_granularity=None, recompute_method=None, recompute_num_layers=None)
    elif s.activation_checkpointing == "selective":
        overrides.update(recompute_granularity="selective", recompute_method=None, recompute_num_layers=None)
    elif s.recompute_num_layers is not None:
        overrides["recompute_num_layers"] = s.recompute_num_layers
    if s.mixed_precision_recipe is None:  # fp32 training (CPU mode)
        overrides.update(params_dtype=torch.float32, bf16=False, pipeline_dtype=torch.float32)
    model = get_provider(s.model_size, **overrides)

    decay = s.decay_steps if s.decay_steps is not None else s.max_steps - s.warmup_steps - s.constant_steps
    if decay <= 0:
        raise ValueError(f"LR decay length {decay} <= 0: set --decay-steps or reduce --warmup/--constant-steps")
    run = s.run_dir
    ckpt_dir = str(run / "checkpoints")
    checkpoint = CheckpointConfig(
        save=ckpt_dir, load=ckpt_dir, save_interval=s.eval_interval, ckpt_format=s.ckpt_format,
        async_save=s.ckpt_async_save, most_recent_k=s.most_recent_k, save_optim=True, save_rng=True,
        fully_parallel_save=True, fully_parallel_load=True, exit_on_missing_checkpoint=False,
        dist_ckpt_strictness="assume_ok_unexpected", dist_ckpt_save_pre_mcore_014=s.optim_fmt_pre_mcore_014,
        dist_ckpt_optim_fully_reshardable=s.optim_full_reshardable, use_persistent_ckpt_worker=not s.cpu,
    )
    if s.finetune_ckpt_dir:
        checkpoint.finetune = True
        checkpoint.pretrained_checkpoint = validate_finetune_dir(s.finetune_ckpt_dir)
        if written_without_te(checkpoint.pretrained_checkpoint):
            # Converted and CPU-trained bases lack the FP8 metadata (``_extra_state``) of Transformer Engine's norm
            # modules; a TE model asks for it and DCP fails on the missing entries. Entries the base lacks are then
            # skipped (and logged) and TE starts its metadata fresh; the weights themselves are complete (converters
            # check coverage before writing).
            checkpoint.dist_ckpt_strictness = "log_unexpected"
    peft = None
    if s.lora_finetune:
        from evo2_recipe.models.lora import DEFAULT_TARGETS, Evo2LoRA

        if not s.finetune_ckpt_dir:
            raise ValueError("--lora-finetune trains adapters on a base model: give its checkpoint with "
                             "--finetune-ckpt-dir")
        peft = Evo2LoRA(target_modules=list(s.lora_target_modules or DEFAULT_TARGETS), dim=s.lora_dim,
                        alpha=s.lora_alpha, dropout=s.lora_dropout,
                        skip_freeze_modules=list(s.lora_skip_freeze_modules))
    use_dist_opt = s.use_distributed_optimizer
    if use_dist_opt is None:
        from megatron.core.optimizer import distrib_optimizer

        use_dist_opt = bool(getattr(distrib_optimizer, "HAVE_APEX_OR_TE", False))
    optimizer = OptimizerConfig(
        optimizer="adam", lr=s.lr, min_lr=s.min_lr, weight_decay=s.wd, adam_beta1=s.adam_beta1,
        adam_beta2=s.adam_beta2, adam_eps=s.adam_eps, clip_grad=s.clip_grad,
        use_distributed_optimizer=use_dist_opt,
        use_precision_aware_optimizer=s.use_precision_aware_optimizer,
        main_grads_dtype=torch.bfloat16 if s.bf16_main_grads else torch.float32,
        log_num_zeros_in_grad=s.log_num_zeros_in_grad,
        bf16=s.mixed_precision_recipe is not None and "bf16" in s.mixed_precision_recipe,
    )
    mixed_precision = None
    if s.mixed_precision_recipe is not None:
        mixed_precision = get_mixed_precision_config(s.mixed_precision_recipe)
        if mixed_precision.fp8:  # FP8 knobs only mean something in an FP8 recipe
            mixed_precision.fp8_wgrad = s.fp8_wgrad
            mixed_precision.fp8_param_gather = s.fp8_param_gather
            mixed_precision.fp8_param = s.fp8_param_gather
        mixed_precision.grad_reduce_in_fp32 = s.grad_reduce_in_fp32
        if mixed_precision.fp8 and not model.use_te and model.use_te is not None:
            raise ValueError(f"--mixed-precision-recipe {s.mixed_precision_recipe} needs Transformer Engine")
    overlap = s.overlap_param_gather or (s.mixed_precision_recipe or "").count("fp4") or "mxfp8" in (
        s.mixed_precision_recipe or "")
    ddp = DistributedDataParallelConfig(
        check_for_nan_in_grad=s.check_for_nan_in_grad, grad_reduce_in_fp32=s.grad_reduce_in_fp32,
        overlap_grad_reduce=s.overlap_grad_reduce or bool(overlap), overlap_param_gather=bool(overlap),
        align_param_gather=s.align_param_gather, use_distributed_optimizer=use_dist_opt,
        average_in_collective=s.average_in_collective,
    )
    tokenizer_path = s.hf_tokenizer_model_path or str(default_tokenizer_path(256))
    if not Path(tokenizer_path).exists():
        raise FileNotFoundError(f"--hf-tokenizer-model-path {tokenizer_path} does not exist")
    dataset = Evo2DatasetProvider(
        seq_length=s.seq_length, dataset_config=s.dataset_config, dataset_dir=s.dataset_dir, mock=s.mock_data,
        fasta_file=s.fasta_file, sequence_db_dir=s.sequence_db_dir,
        window_dbs=windows if s.sequence_db_dir is not None else None, stride=s.stride,
        window_min_length_threshold=s.window_min_length_threshold, rc_aug=s.rc_aug,
        random_seed=s.dataset_seed if s.dataset_seed is not None else s.seed,
        eod_pad_in_loss_mask=s.eod_pad_in_loss_mask, predict_eod=s.predict_eod, num_workers=s.workers, pin_memory=not s.cpu,
        persistent_workers=s.workers > 0,
    )
    log = LoggerConfig(
        log_interval=s.log_interval or 10, tensorboard_dir=str(run / "tb_logs") if s.tensorboard else None,
        log_params_norm=True, log_throughput=True, log_progress=False, log_timers_to_tensorboard=True,
        log_throughput_to_tensorboard=True, log_validation_ppl_to_tensorboard=True,
        log_memory_to_tensorboard=not s.cpu, log_world_size_to_tensorboard=True,
        wandb_project=s.wandb_project, wandb_entity=s.wandb_entity,
        wandb_exp_name=s.wandb_run_name or default_run_name(s), wandb_save_dir=str(run / "wandb"),
    )
    train = TrainingConfig(
        train_iters=s.max_steps, global_batch_size=s.global_batch_size, micro_batch_size=s.micro_batch_size,
        exit_signal_handler=s.enable_preemption, exit_interval=s.early_stop_on_step,
        check_weight_hash_across_dp_replicas_interval=s.debug_ddp_parity_freq or None,
        manual_gc=s.gc_interval > 0 or s.garbage_collect_at_inference,
        manual_gc_interval=max(s.gc_interval, 0), manual_gc_eval=s.garbage_collect_at_inference,
    )
    profiling = ProfilingConfig()
    if s.nsys_profiling:
        profiling = ProfilingConfig(use_nsys_profiler=True, profile_step_start=s.nsys_start_step,
                                    profile_step_end=s.nsys_end_step or s.max_steps, profile_ranks=s.nsys_ranks,
                                    record_shapes=True, nvtx_ranges=True)
    return ConfigContainer(
        rng=RNGConfig(seed=s.seed),
        train=train,
        validation=ValidationConfig(eval_interval=s.eval_interval, eval_iters=s.eval_iters),
        model=model,
        optimizer=optimizer,
        optimizer_config_override_provider=HyenaOptimizerConfigOverrideProvider(s.no_weight_decay_embeddings),
        ddp=ddp,
        scheduler=SchedulerConfig(
            lr_decay_style="cosine", lr_warmup_iters=s.warmup_steps, lr_warmup_init=0.0, lr_decay_iters=decay,
            start_weight_decay=s.wd, end_weight_decay=s.wd, weight_decay_incr_style="constant",
            override_opt_param_scheduler=True),
        dataset=dataset,
        logger=log,
        tokenizer=TokenizerConfig(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=tokenizer_path),
        checkpoint=checkpoint,
        dist=DistributedInitConfig(distributed_backend="gloo" if s.cpu else "nccl"),
        profiling=profiling,
        mixed_precision=mixed_precision,
        peft=peft,
    )


def converted_checkpoint_config(model_size: str, *, vocab_size: int, tokenizer_dir: str | Path,
                                seq_length: int | None = None, mixed_precision_recipe: str | None = "bf16_mixed",
                                vortex_style_fp8: bool = False) -> ConfigContainer:
    """``run_config.yaml`` of a converted, weights-only checkpoint: the provider (``seq_length`` - the model size's
    unless given -, precision recipe, ``vortex_style_fp8``, tokenizer) that later runs inherit."""
    from evo2_recipe.models.providers import get_provider

    settings = TrainSettings(model_size=model_size, mock_data=True, max_steps=10, warmup_steps=1, constant_steps=0,
                             mixed_precision_recipe=mixed_precision_recipe, vortex_style_fp8=vortex_style_fp8,
                             hf_tokenizer_model_path=str(tokenizer_dir))
    settings.seq_length = seq_length or get_provider(model_size).seq_length
    cfg = build_config(settings)
    cfg.model.vocab_size = vocab_size
    return cfg


def apply_overrides(cfg: ConfigContainer, overrides: list[str]) -> ConfigContainer:
    """Hydra-style ``section.key=value`` overrides, then one sequence length for model and data.

    ``model.seq_length`` is the source of truth: the dataset follows it unless only ``dataset.seq_length`` was
    overridden (then the model follows); overriding both to different values is an error.
    """
    from megatron.bridge.training.utils.omegaconf_utils import process_config_with_overrides

    if overrides:
        cfg = process_config_with_overrides(cfg, cli_overrides=overrides)
    touched = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    model_len, data_len = cfg.model.seq_length, cfg.dataset.seq_length
    if model_len != data_len:
        if {"model.seq_length", "dataset.seq_length"} <= touched:
            raise ValueError(f"model.seq_length={model_len} and dataset.seq_length={data_len} differ; set one of "
                             f"them (or --seq-length)")
        if "dataset.seq_length" in touched:
            cfg.model.seq_length = data_len
        else:
            cfg.dataset.seq_length = model_len
        logger.info("sequence length %d for model and data", cfg.model.seq_length)
    cp = cfg.model.context_parallel_size
    if cp > 1 and cfg.model.seq_length % (2 * cp):
        raise ValueError(f"sequence length {cfg.model.seq_length} must be divisible by 2*context-parallel-size = "
                         f"{2 * cp}")
    return cfg


def default_run_name(s: TrainSettings) -> str:
    """W&B run name in the reference's style (prefix + value, '-'-joined)."""
    parts = [f"evo2-size-{s.model_size}", f"TP{s.tensor_model_parallel_size}", f"PP{s.pipeline_model_parallel_size}",
             f"CP{s.context_parallel_size}", f"GBS{s.global_batch_size}", f"MBS{s.micro_batch_size}",
             f"LR{s.lr}", f"MINLR{s.min_lr}", f"WUSTEPS{s.warmup_steps}", f"WD{s.wd}",
             f"MPR{s.mixed_precision_recipe}"]
    if not s.renormalize_loss:
        parts.append("SkipLossRenorm")
    if s.activation_checkpointing == "none":
        parts.append("NOAC")
    elif s.activation_checkpointing == "selective":
        parts.append("SELAC")
    if s.eod_pad_in_loss_mask:
        parts.append("PEOD")
    if s.spike_no_more_embedding_init:
        parts.append("SNI")
    return "-".join(parts)
