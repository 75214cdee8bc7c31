"""Process-group and model-parallel setup shared by the CLIs and benchmarks (torchrun or single process)."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist


def init_distributed(*, tp: int = 1, cp: int = 1, pp: int = 1, seed: int = 1234, cpu: bool = False) -> None:
    """Initialise torch.distributed (env:// from torchrun, or a 1-process group) and megatron's parallel state."""
    from megatron.core import parallel_state, tensor_parallel

    if not dist.is_initialized():
        if not cpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend, timeout = "gloo" if cpu else "nccl", datetime.timedelta(minutes=30)
        if "RANK" in os.environ:  # launched by torchrun
            dist.init_process_group(backend, timeout=timeout)
        else:  # a plain process: a private 1-process group (nothing leaks into the environment of child processes)
            from evo2_recipe.utils.spawn import free_port

            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                                    timeout=timeout)
    world = dist.get_world_size()
    if world % (tp * cp * pp):
        raise ValueError(f"world size {world} is not divisible by TP*CP*PP = {tp}*{cp}*{pp}")
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp,
                                                 pipeline_model_parallel_size=pp)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)


def teardown() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
