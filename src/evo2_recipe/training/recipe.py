"""Megatron-Bridge recipe for Evo 2: :func:`evo2_pretrain_config` returns the ``ConfigContainer`` with the reference
recipe's defaults (spec section 2.1), the one place they live; ``train_evo2`` sets its keys through the flag table
(``cli/train_flags.py``) and Hydra overrides, then :func:`apply_overrides` checks the result. The weight-decay
exclusions live in :class:`HyenaOptimizerConfigOverrideProvider`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
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
    OptimizerConfig,
    OptimizerConfigOverrideProvider,
    OptimizerConfigOverrideProviderContext,
    ProfilingConfig,
    RerunStateMachineConfig,
    RNGConfig,
    SchedulerConfig,
    TrainingConfig,
    ValidationConfig,
)
from megatron.bridge.training.comm_overlap import (  # noqa: E402
    CommOverlapConfig,
    userbuffers_bf16_h100_h8192_tp4_mbs1_seqlen8192,
    userbuffers_fp8_h100_h8192_tp4_mbs1_seqlen8192,
)
from megatron.bridge.training.mixed_precision import get_mixed_precision_config  # noqa: E402
from megatron.bridge.training.tokenizers.config import TokenizerConfig  # noqa: E402
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
        models = getattr(context, "model", None)
        config = getattr((models[0] if isinstance(models, list) and models else models), "config", None)
        if not getattr(config, "hyena_filter_no_wd", True):  # the provider's switch: decay the modal filters too
            names = tuple(n for n in names if ".filter." not in n)
        overrides = {ParamKey(name=names, predicate=ParamPredicate(name="is_1d", fn=_is_1d)):
                     ParamGroupOverride(wd_mult=0.0)}
        if context.optimizer_config.decoupled_lr is not None:
            lr = {"max_lr": context.optimizer_config.decoupled_lr}
            if context.optimizer_config.decoupled_min_lr is not None:
                lr["min_lr"] = context.optimizer_config.decoupled_min_lr
            overrides[ParamKey(attr="is_embedding_or_output_parameter")] = lr
        return overrides


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


def _fp8_param_gather_pays(recipe_default: bool, model_parallel_size: int) -> bool:
    """The recipe's ``fp8_param_gather`` unless nothing is gathered (one data-parallel rank), where it only costs.

    FP8 parameters halve the distributed optimizer's parameter all-gather, but after every step the optimizer
    re-quantises its fp32 shard into them through Transformer Engine's unaligned (1 x N) cast-transpose kernel: 71 ms
    of a 1b step at 8,192 tokens on one H200 (FP8 then ran at 0.78x bf16; without it 1.11-1.15x, RESULTS.md). With a
    single data-parallel rank (WORLD_SIZE from torchrun / model-parallel size) there is no gather to save.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if recipe_default and world // model_parallel_size <= 1:
        logger.info("FP8 parameters (fp8_param_gather) off: one data-parallel rank has no parameter all-gather for "
                    "them to shrink (mixed_precision.fp8_param_gather=true mixed_precision.fp8_param=true forces them)")
        return False
    return recipe_default


def _tp_comm_overlap(mixed_precision_recipe: str | None, backend: str) -> CommOverlapConfig:
    """TP communication overlap through Transformer Engine's userbuffers, as the reference's
    ``--use-megatron-comm-overlap-llama3-8k`` sets it (spec 2.8): Bridge's H100 8k TP4 userbuffer layout (FP8 or bf16
    by the recipe's name). The Hyena mixers' linears use the same buffer names as an MLP's (``fc1`` in, ``fc2`` out).
    Megatron-Bridge turns it off with a warning where it cannot run (TP < 2, no sequence parallelism, no TE)."""
    fp8 = "fp8" in (mixed_precision_recipe or "")
    return CommOverlapConfig(
        tp_comm_overlap=True,
        tp_comm_overlap_cfg=userbuffers_fp8_h100_h8192_tp4_mbs1_seqlen8192 if fp8
        else userbuffers_bf16_h100_h8192_tp4_mbs1_seqlen8192,
        tp_comm_bootstrap_backend=backend, wgrad_deferral_limit=22, overlap_param_gather_with_optimizer_step=False)


def evo2_pretrain_config(
    model_size: str = "evo2_1b_base", *,
    seq_length: int = 8192,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    context_parallel_size: int = 1,
    max_steps: int = 100000,
    warmup_steps: int = 2500,
    constant_steps: int = 2500,
    decay_steps: int | None = None,  # None: what is left after warmup and constant steps
    wd: float = 0.01,
    eval_interval: int = 100,  # also the checkpoint interval
    seed: int = 1234,  # also the dataset's seed unless dataset.random_seed is set
    workers: int = 8,
    mixed_precision_recipe: str | None = "bf16_mixed",  # None: fp32 (the CPU default)
    fp8_wgrad: bool = True,
    fp8_param_gather: bool | None = None,  # None: on when parameters are all-gathered (data-parallel size > 1)
    grad_reduce_in_fp32: bool = True,
    activation_checkpointing: str = "default",  # default (the provider's full recompute) | none | selective
    spike_no_more_embedding_init: bool = False,
    result_dir: str = "./results",
    experiment_name: str = "evo2",
    finetune_ckpt_dir: str | None = None,
    lora_finetune: bool = False,
    lora_dim: int = 16,
    lora_alpha: int = 32,
    lora_dropout: float = 0.1,
    lora_target_modules: list[str] | None = None,  # None: evo2_recipe.models.lora.DEFAULT_TARGETS
    lora_skip_freeze_modules: list[str] | tuple[str, ...] = (),
    tokenizer_path: str | None = None,  # None: the bundled byte-level tokenizer
    gc_interval: int = 0,
    garbage_collect_at_inference: bool = False,
    nsys_profiling: bool = False,
    nsys_start_step: int = 0,
    nsys_end_step: int | None = None,
    nsys_ranks: list[int] | tuple[int, ...] = (0,),
    # None: on when Transformer Engine or Apex is installed. Without them megatron-core 0.19's distributed optimizer
    # (torch Adam path) does not restore Adam moments on resume, so the plain optimizer is used (same math at DP=1).
    use_distributed_optimizer: bool | None = None,
    cuda_graph: bool = False,
    tp_comm_overlap: bool = False,
    tp_comm_overlap_backend: str = "nccl",
    cpu: bool = False,
) -> ConfigContainer:
    """Evo 2 pretraining (or fine-tuning) as Megatron-Bridge's ``ConfigContainer`` with the reference recipe's defaults
    (spec section 2.1). The parameters are the settings that shape several config objects; every other setting is
    one key of the returned container with its reference default here (``train_evo2`` flags set those keys directly:
    ``evo2_recipe.cli.train_flags.TRAIN_FLAGS``). The data source (``dataset.mock``, ``dataset.dataset_config``,
    ``dataset.fasta_file`` or ``dataset.sequence_db_dir``) is left to the caller; :func:`apply_overrides` checks it.

    Installs megatron_fixes (idempotent): this is where a training setup starts, ``train_evo2``'s or a script's own
    ``pretrain(cfg, ...)``; without them a bf16 model's fp32 filters get other parameters' optimizer state in its
    checkpoints, and the recipe's weight-gradient fusion has no kernel without Apex.
    """
    megatron_fixes.apply()
    tp, pp, cp = tensor_model_parallel_size, pipeline_model_parallel_size, context_parallel_size
    model_fields = dict(
        seq_length=seq_length, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        context_parallel_size=cp, sequence_parallel=tp > 1, hidden_dropout=0.0, attention_dropout=0.0,
        fp32_residual_connection=True, cross_entropy_loss_fusion=False, calculate_per_token_loss=True,
        vortex_style_fp8=False, to_upper="normalized_weighted", perform_initialization=True,
        # weight gradients accumulated by their GEMMs into DDP's fp32 main_grad (no 16-bit gradient and no add)
        gradient_accumulation_fusion=True,
    )
    if spike_no_more_embedding_init:
        model_fields.update(share_embeddings_and_output_weights=False, embedding_init_method_std=1.0)
    if activation_checkpointing == "none":
        model_fields.update(recompute_granularity=None, recompute_method=None, recompute_num_layers=None)
    elif activation_checkpointing == "selective":
        model_fields.update(recompute_granularity="selective", recompute_method=None, recompute_num_layers=None)
    elif activation_checkpointing != "default":
        raise ValueError(f"activation_checkpointing {activation_checkpointing!r}: use default, none or selective")
    if mixed_precision_recipe is None:  # fp32 training (CPU mode)
        model_fields.update(params_dtype=torch.float32, bf16=False, pipeline_dtype=torch.float32)
    if cuda_graph:
        if cpu:
            raise ValueError("--cuda-graph captures the training step as a CUDA graph: it needs a GPU (drop it on CPU)")
        # Megatron-core's full-iteration graph (forward + backward of every micro-batch, replayed each step) removes
        # the host's per-op Python and launch time, which bounds the 1b step on an H200 (benchmarks/RESULTS.md). Each
        # capture gets its own memory pool: Bridge deletes the training graph before the final evaluation, and
        # capturing the evaluation graph into the deleted graph's shared pool trips PyTorch's allocator assert.
        model_fields.update(cuda_graph_impl="full_iteration", cuda_graph_use_single_mempool=False)
    model = get_provider(model_size, **model_fields)

    decay = decay_steps if decay_steps is not None else max_steps - warmup_steps - constant_steps
    if decay <= 0:
        raise ValueError(f"LR decay length {decay} <= 0: set --decay-steps or reduce --warmup/--constant-steps")
    run = Path(result_dir) / experiment_name
    ckpt_dir = str(run / "checkpoints")
    checkpoint = CheckpointConfig(
        save=ckpt_dir, load=ckpt_dir, save_interval=eval_interval, ckpt_format="torch_dist", async_save=False,
        most_recent_k=5, save_optim=True, save_rng=True, fully_parallel_save=True, fully_parallel_load=True,
        exit_on_missing_checkpoint=False, dist_ckpt_strictness="assume_ok_unexpected",
        dist_ckpt_save_pre_mcore_014=False, dist_ckpt_optim_fully_reshardable=False,
        use_persistent_ckpt_worker=not cpu,
    )
    if finetune_ckpt_dir:
        checkpoint.finetune = True
        checkpoint.pretrained_checkpoint = validate_finetune_dir(finetune_ckpt_dir)
        if written_without_te(checkpoint.pretrained_checkpoint):
            # Converted and CPU-trained bases lack the FP8 metadata (``_extra_state``) of Transformer Engine's norm
            # modules; a TE model asks for it and DCP fails on the missing entries. Entries the base lacks are then
            # skipped (and logged) and TE starts its metadata fresh; the weights themselves are complete (converters
            # check coverage before writing).
            checkpoint.dist_ckpt_strictness = "log_unexpected"
    peft = None
    if lora_finetune:
        from evo2_recipe.models.lora import DEFAULT_TARGETS, Evo2LoRA

        if not finetune_ckpt_dir:
            raise ValueError("--lora-finetune trains adapters on a base model: give its checkpoint with "
                             "--finetune-ckpt-dir")
        peft = Evo2LoRA(target_modules=list(lora_target_modules or DEFAULT_TARGETS), dim=lora_dim, alpha=lora_alpha,
                        dropout=lora_dropout, skip_freeze_modules=list(lora_skip_freeze_modules))
    if use_distributed_optimizer is None:
        from megatron.core.optimizer import distrib_optimizer

        use_distributed_optimizer = bool(getattr(distrib_optimizer, "HAVE_APEX_OR_TE", False))
    # Bridge's OptimizerConfig derives its computed fields (which optimizer path megatron takes, e.g. the
    # precision-aware one's decoupled gradients) at finalize, after the flags, overrides and precision settings;
    # megatron-core's derives them here, before --use-precision-aware-optimizer is even set.
    optimizer = OptimizerConfig(
        optimizer="adam", lr=3e-4, min_lr=3e-5, weight_decay=wd, adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8,
        clip_grad=1.0, use_distributed_optimizer=use_distributed_optimizer, use_precision_aware_optimizer=False,
        main_grads_dtype=torch.float32, log_num_zeros_in_grad=False,
        bf16=mixed_precision_recipe is not None and "bf16" in mixed_precision_recipe,
    )
    mixed_precision = None
    if mixed_precision_recipe is not None:
        mixed_precision = get_mixed_precision_config(mixed_precision_recipe)
        if mixed_precision.fp8:  # FP8 knobs only mean something in an FP8 recipe
            if fp8_param_gather is None:
                fp8_param_gather = _fp8_param_gather_pays(mixed_precision.fp8_param_gather, tp * pp * cp)
            mixed_precision.fp8_wgrad = fp8_wgrad
            mixed_precision.fp8_param_gather = fp8_param_gather
            mixed_precision.fp8_param = fp8_param_gather
        mixed_precision.grad_reduce_in_fp32 = grad_reduce_in_fp32
        if mixed_precision.fp8 and not model.use_te and model.use_te is not None:
            raise ValueError(f"--mixed-precision-recipe {mixed_precision_recipe} needs Transformer Engine")
    overlap_param_gather = "fp4" in (mixed_precision_recipe or "") or "mxfp8" in (mixed_precision_recipe or "")
    ddp = DistributedDataParallelConfig(
        check_for_nan_in_grad=not cuda_graph,  # a host-side check: not capturable in the graph
        grad_reduce_in_fp32=grad_reduce_in_fp32, overlap_grad_reduce=overlap_param_gather,
        overlap_param_gather=overlap_param_gather, align_param_gather=False,
        use_distributed_optimizer=use_distributed_optimizer, average_in_collective=False,
    )
    tokenizer_path = tokenizer_path or str(default_tokenizer_path(256))
    if not Path(tokenizer_path).exists():
        raise FileNotFoundError(f"--hf-tokenizer-model-path {tokenizer_path} does not exist")
    dataset = Evo2DatasetProvider(seq_length=seq_length, random_seed=seed, num_workers=workers, pin_memory=not cpu,
                                  persistent_workers=workers > 0)
    log = LoggerConfig(
        log_interval=10, tensorboard_dir=str(run / "tb_logs"), log_params_norm=True, log_throughput=True,
        log_progress=False, log_timers_to_tensorboard=True, log_throughput_to_tensorboard=True,
        log_validation_ppl_to_tensorboard=True, log_memory_to_tensorboard=not cpu, log_world_size_to_tensorboard=True,
        wandb_project=None, wandb_entity=None, wandb_exp_name=None, wandb_save_dir=str(run / "wandb"),
    )
    train = TrainingConfig(
        train_iters=max_steps, global_batch_size=8, micro_batch_size=1, exit_signal_handler=False, exit_interval=None,
        check_weight_hash_across_dp_replicas_interval=None,
        manual_gc=gc_interval > 0 or garbage_collect_at_inference, manual_gc_interval=max(gc_interval, 0),
        manual_gc_eval=garbage_collect_at_inference,
    )
    profiling = ProfilingConfig()
    if nsys_profiling:
        profiling = ProfilingConfig(use_nsys_profiler=True, profile_step_start=nsys_start_step,
                                    profile_step_end=nsys_end_step or max_steps, profile_ranks=list(nsys_ranks),
                                    record_shapes=True, nvtx_ranges=True)
    cfg = ConfigContainer(
        rng=RNGConfig(seed=seed),
        # the NaN-loss check reads the loss on the host every micro-batch: not capturable in the graph
        rerun_state_machine=RerunStateMachineConfig(check_for_nan_in_loss=not cuda_graph),
        train=train,
        validation=ValidationConfig(eval_interval=eval_interval, eval_iters=32),
        model=model,
        optimizer=optimizer,
        optimizer_config_override_provider=HyenaOptimizerConfigOverrideProvider(no_weight_decay_embeddings=False),
        ddp=ddp,
        scheduler=SchedulerConfig(
            lr_decay_style="cosine", lr_warmup_iters=warmup_steps, lr_warmup_init=0.0, lr_decay_iters=decay,
            start_weight_decay=wd, end_weight_decay=wd, weight_decay_incr_style="constant",
            override_opt_param_scheduler=True),
        dataset=dataset,
        logger=log,
        tokenizer=TokenizerConfig(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=tokenizer_path),
        checkpoint=checkpoint,
        dist=DistributedInitConfig(distributed_backend="gloo" if cpu else "nccl"),
        profiling=profiling,
        mixed_precision=mixed_precision,
        peft=peft,
        comm_overlap=_tp_comm_overlap(mixed_precision_recipe, tp_comm_overlap_backend) if tp_comm_overlap else None,
    )
    cfg.logger.wandb_exp_name = default_run_name(cfg, model_size, mixed_precision_recipe, activation_checkpointing,
                                                 spike_no_more_embedding_init)
    return cfg


def converted_checkpoint_config(model_size: str, *, vocab_size: int, tokenizer_dir: str | Path,
                                seq_length: int | None = None, mixed_precision_recipe: str | None = "bf16_mixed",
                                vortex_style_fp8: bool = False) -> ConfigContainer:
    """``run_config.yaml`` of a converted, weights-only checkpoint: the provider (``seq_length`` - the model size's
    unless given -, precision recipe, ``vortex_style_fp8``, tokenizer) that later runs inherit."""
    cfg = evo2_pretrain_config(model_size, seq_length=seq_length or get_provider(model_size).seq_length,
                               max_steps=10, warmup_steps=1, constant_steps=0,
                               mixed_precision_recipe=mixed_precision_recipe, tokenizer_path=str(tokenizer_dir))
    cfg.dataset.mock = True
    cfg.model.vortex_style_fp8 = vortex_style_fp8
    cfg.model.vocab_size = vocab_size
    return cfg


def check_data_source(cfg: ConfigContainer) -> None:
    """Exactly one data source, and the window options only with window data."""
    d = cfg.dataset
    if sum([bool(d.mock), d.dataset_config is not None, d.fasta_file is not None, d.sequence_db_dir is not None]) != 1:
        raise ValueError("give exactly one data source: --mock-data, -d/--dataset-config, --fasta-data --fasta-file "
                         "FILE, or --sharded-eden-data --sequence-db-dir DIR with --train/val/test-window-db")
    if d.sequence_db_dir is not None and set((d.window_dbs or {}).keys()) != {"train", "validation", "test"}:
        raise ValueError("--sharded-eden-data needs --train-window-db, --val-window-db and --test-window-db "
                         "(evo2_precompute_windows writes them)")
    if d.rc_aug and d.fasta_file is None and d.sequence_db_dir is None:
        raise ValueError("--rc-aug applies to window data only (--fasta-data or --sharded-eden-data)")


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
    check_data_source(cfg)
    cp = cfg.model.context_parallel_size
    if cp > 1 and cfg.model.seq_length % (2 * cp):
        raise ValueError(f"sequence length {cfg.model.seq_length} must be divisible by 2*context-parallel-size = "
                         f"{2 * cp}")
    _check_precision_aware_optimizer(cfg)
    prof = cfg.profiling
    if prof is not None and prof.use_pytorch_profiler and cfg.logger.tensorboard_dir is None:
        # Megatron-Bridge writes the trace to <tensorboard_dir>/../torch_profile: "None/../" is the working directory
        raise ValueError("profiling.use_pytorch_profiler=true writes its trace beside the TensorBoard logs "
                         "(<result-dir>/<experiment>/torch_profile/): drop --disable-tensorboard-logger")
    return cfg


def _check_precision_aware_optimizer(cfg: ConfigContainer) -> None:
    """Give a recipe without FP8 no FP8 recipe, then refuse the precision-aware optimizer setup that crashes inside
    Transformer Engine.

    Bridge's mixed-precision config keeps its class default ``fp8_recipe="tensorwise"`` when FP8 is off and copies it
    onto the optimizer's config, where megatron reads it as FP8 parameters: its precision-aware optimizer then keeps
    an fp32 master copy, copies every gradient to fp32 and every parameter back each step (29 ms of a 7b bf16 step
    on an H200, RESULTS.md). Without the recipe it takes its ``decoupled_grad`` path, as with FP8 delayed scaling
    or non-fp32 master weights. On that path a bf16 gradient buffer (``--no-grad-reduce-in-fp32``) makes TE's
    grad-norm kernel fail with an illegal memory access on the first step (TE 2.20.2, megatron-core 0.19, H200,
    nineteenth session).
    """
    opt, mp = cfg.optimizer, cfg.mixed_precision
    if mp is not None and not mp.fp8:
        mp.fp8_recipe = None
    if not opt.use_precision_aware_optimizer or cfg.ddp.grad_reduce_in_fp32:
        return
    # megatron's OptimizerConfig.use_precision_aware_optimizer_no_fp8_or_ds_fp8, on the settings Bridge will copy
    if mp is None or mp.fp8_recipe in (None, "delayed") or opt.main_params_dtype != torch.float32:
        raise ValueError("--use-precision-aware-optimizer without FP8, with FP8 delayed scaling or with non-fp32 "
                         "optimizer.main_params_dtype needs fp32 gradients: drop --no-grad-reduce-in-fp32 (TE's "
                         "fused grad-norm reads the bf16 decoupled gradients out of bounds)")


def default_run_name(cfg: ConfigContainer, model_size: str, mixed_precision_recipe: str | None,
                     activation_checkpointing: str = "default", spike_no_more_embedding_init: bool = False) -> str:
    """W&B run name in the reference's style (prefix + value, '-'-joined): the recipe's arguments and the config."""
    m, o = cfg.model, cfg.optimizer
    parts = [f"evo2-size-{model_size}", f"TP{m.tensor_model_parallel_size}", f"PP{m.pipeline_model_parallel_size}",
             f"CP{m.context_parallel_size}", f"GBS{cfg.train.global_batch_size}", f"MBS{cfg.train.micro_batch_size}",
             f"LR{o.lr}", f"MINLR{o.min_lr}", f"WUSTEPS{cfg.scheduler.lr_warmup_iters}", f"WD{o.weight_decay}",
             f"MPR{mixed_precision_recipe}"]
    if m.to_upper != "normalized_weighted":
        parts.append("SkipLossRenorm")
    parts += {"none": ["NOAC"], "selective": ["SELAC"]}.get(activation_checkpointing, [])
    if cfg.dataset.eod_pad_in_loss_mask:
        parts.append("PEOD")
    if spike_no_more_embedding_init:
        parts.append("SNI")
    return "-".join(parts)
