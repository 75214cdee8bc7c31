"""Per-step throughput logging for ``train_evo2``: tokens/s/GPU, TFLOP/s/GPU and MFU from the model-FLOPs formula.

A Megatron-Bridge callback: Bridge already logs loss, LR, grad norm and memory; this adds the Evo 2 numbers on the
same interval, to the console, TensorBoard and W&B (when enabled).
"""

from __future__ import annotations

import logging
import time

import torch
from megatron.bridge.training.callbacks import Callback

from evo2_recipe.models.providers import num_floating_point_operations

logger = logging.getLogger("evo2_recipe.train")
# One line per --log-interval; benchmarks/train_log_summary.py parses it (tokens/s means, loss curves)
STEP_LINE = ("step %d | lm loss %.4f | lr %.3e | grad norm %s | tokens/s/GPU %.0f | TFLOP/s/GPU %.2f | MFU %s | "
             "peak mem %.2f GiB")
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "B200": 2250.0, "A100": 312.0, "L40": 181.0}


def peak_tflops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


class ThroughputCallback(Callback):
    def on_train_step_start(self, context) -> None:
        if "t0" not in context.user_state:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            context.user_state["t0"] = time.perf_counter()
            context.user_state["steps"] = 0

    def on_train_step_end(self, context) -> None:
        cfg = context.state.cfg
        context.user_state["steps"] += 1
        step = context.state.train_state.step + 1  # the counter advances after the callbacks
        if step % max(cfg.logger.log_interval, 1):
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        dt = (time.perf_counter() - context.user_state.pop("t0")) / context.user_state.pop("steps")
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        gbs, seq = cfg.train.global_batch_size, cfg.model.seq_length
        tokens_s = gbs * seq / dt / world
        tflops = num_floating_point_operations(cfg.model, gbs, seq) / dt / world / 1e12
        peak = peak_tflops()
        mem = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
        loss = (context.loss_dict or {}).get("lm loss")
        loss = float(loss) if loss is not None else float("nan")
        metrics = {"evo2/tokens_per_sec_per_gpu": tokens_s, "evo2/tflops_per_gpu": tflops,
                   "evo2/peak_memory_gib": mem}
        if peak:
            metrics["evo2/mfu"] = tflops / peak
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == world - 1:
            logger.info(STEP_LINE, step, loss, context.optimizer.param_groups[0]["lr"],
                        f"{context.grad_norm:.3f}" if context.grad_norm is not None else "n/a", tokens_s, tflops,
                        f"{tflops / peak:.3f}" if peak else "n/a (CPU)", mem)
            tb = getattr(context.state, "tensorboard_logger", None)
            if tb is not None:
                for k, v in metrics.items():
                    tb.add_scalar(k, v, step)
            wb = getattr(context.state, "wandb_logger", None)
            if wb is not None:
                wb.log(metrics, step)
