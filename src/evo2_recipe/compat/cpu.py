"""CPU mode: run megatron-core and Megatron-Bridge on CPU with the gloo backend.

megatron-core 0.19 and Megatron-Bridge 0.6 hard-code CUDA in a few dozen places (``device="cuda"``, ``.cuda()``,
``torch.cuda`` RNG/stream/sync calls, ``pin_memory=True``). This module redirects those to the CPU so that the *real*
megatron code paths (tensor/sequence/context/pipeline parallel layers, dist-checkpointing, datasets, the Bridge
training loop) run unchanged in tests and in the ``--cpu`` mode of every CLI. Nothing here changes model math.

What :func:`enable` does (each item is needed; see ``shared/spec/environment_facts.md`` sections 2-6):

* ``device``: ``torch.cuda.current_device()`` returns ``"cpu"`` (megatron only passes it on as ``device=``), and
  ``torch.cuda.is_available()`` / ``device_count()`` say False / 0 and device queries raise ``RuntimeError`` on a GPU
  host too, as on the CPU machines CI runs on: what asks them (TorchDynamo and TorchInductor behind megatron's fused
  bias-dropout, our spec, precision and initialisation choices) then takes the CPU path.
* ``rng``: ``torch.cuda`` get/set/manual-seed RNG calls and megatron's ``_get/_set_cuda_rng_state`` use the CPU
  generator, so ``get_cuda_rng_tracker().fork()`` works; its "CPU RNG state changed" warning is expected and muted.
* ``streams``/``sync``: ``torch.cuda.Stream/Event/current_stream/stream/synchronize`` become no-op stand-ins.
* ``mode``: a ``TorchFunctionMode`` rewrites ``device="cuda[:N]"`` (and int devices) to CPU, turns
  ``pin_memory=True`` off, makes ``Tensor.cuda()``/``pin_memory()`` no-ops and makes ``Tensor.type()`` report
  ``torch.cuda.*`` (megatron's grad-clipping asserts that string).
* ``memory``: ``torch.cuda`` memory statistics report 0 (used by the training logger).
* ``te``: on a host with Transformer Engine, TE is hidden from every later import: megatron binds TE's Adam and
  multi-tensor kernels at import, and they take CUDA tensors only. It has to come before megatron's import (entry points
  start with :func:`enter_runtime`); after it, :func:`enable` warns.
* ``bridge``: Megatron-Bridge's ``initialize_megatron`` is called with ``allow_no_cuda=True``, its seed setup also
  seeds the (CPU-mapped) model-parallel RNG tracker, and ``megatron.bridge.peft.utils.HAVE_TE`` follows
  megatron-core's real TE probe.

Activated by ``EVO2_CPU=1`` / ``--cpu`` in the CLIs and by ``tests/conftest.py``. Call :func:`enable` in every process
(spawned ranks too) before building models. It must not be used when a GPU is meant to be used.
"""

from __future__ import annotations

import contextlib
import logging
import os

import torch
from torch.overrides import TorchFunctionMode

_ENABLED = False
_MODE: TorchFunctionMode | None = None


def cpu_mode_requested() -> bool:
    """True when the user asked for CPU mode (``EVO2_CPU=1``) or no CUDA device is present."""
    return os.environ.get("EVO2_CPU", "") not in ("", "0", "false", "False") or not torch.cuda.is_available()


def is_enabled() -> bool:
    return _ENABLED


def _to_cpu_device(device):
    if isinstance(device, torch.device):
        return torch.device("cpu") if device.type == "cuda" else device
    if isinstance(device, str):
        return "cpu" if device.startswith("cuda") else device
    if isinstance(device, int) and not isinstance(device, bool):
        return "cpu"  # an int device means a CUDA ordinal
    return device


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device requests issued by megatron code to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func is torch.Tensor.cuda or func is torch.Tensor.pin_memory:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1:
            args = (args[0], _to_cpu_device(args[1]), *args[2:])
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda.") else name
        return func(*args, **kwargs)


class _DummyStream:
    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _DummyEvent()

    def synchronize(self):
        pass

    def query(self):
        return True


class _DummyEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args, **kwargs):
        pass

    def wait(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


class _MuteCpuRngWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def _no_cuda_device(*args, **kwargs):
    # What torch raises on a machine without a GPU; callers such as TorchInductor's cache key catch RuntimeError.
    raise RuntimeError("CPU mode (evo2_recipe.compat.cpu): no CUDA device")


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    cuda.is_available = lambda: False
    cuda.device_count = lambda: 0
    for query in ("get_device_properties", "get_device_capability", "get_device_name"):
        setattr(cuda, query, _no_cuda_device)
    cuda.current_device = lambda: "cpu"
    cuda.set_device = lambda *a, **k: None
    cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    cuda.set_rng_state = lambda state, device="cuda": torch.set_rng_state(state)
    cuda.random.get_rng_state = cuda.get_rng_state
    cuda.random.set_rng_state = cuda.set_rng_state
    # torch.manual_seed itself calls torch.cuda.manual_seed_all: seed the CPU generator directly.
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.manual_seed_all = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.synchronize = lambda *a, **k: None
    cuda.Stream = _DummyStream
    cuda.Event = _DummyEvent
    cuda.current_stream = lambda *a, **k: _DummyStream()
    cuda.default_stream = lambda *a, **k: _DummyStream()
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.device = lambda *a, **k: contextlib.nullcontext()
    cuda.empty_cache = lambda: None
    for stat in ("memory_allocated", "max_memory_allocated", "memory_reserved", "max_memory_reserved"):
        setattr(cuda, stat, lambda *a, **k: 0)
    cuda.reset_peak_memory_stats = lambda *a, **k: None
    cuda.reset_max_memory_allocated = lambda *a, **k: None
    cuda.memory_stats = lambda *a, **k: {}


def _patch_megatron_core() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)
    logging.getLogger(mrandom.__name__).addFilter(_MuteCpuRngWarning())


def _patch_megatron_bridge() -> None:
    """Patches for Megatron-Bridge's training entry points (only applied if it is installed)."""
    try:
        from megatron.bridge.training import initialize as br_init
    except ImportError:
        return
    from megatron.core import tensor_parallel

    orig_initialize = br_init.initialize_megatron
    if not getattr(orig_initialize, "_evo2_cpu", False):

        def initialize_megatron(*args, **kwargs):
            kwargs["allow_no_cuda"] = True
            return orig_initialize(*args, **kwargs)

        initialize_megatron._evo2_cpu = True
        br_init.initialize_megatron = initialize_megatron
        with contextlib.suppress(ImportError):
            from megatron.bridge.training import setup as br_setup

            if hasattr(br_setup, "initialize_megatron"):
                br_setup.initialize_megatron = initialize_megatron

    orig_seed = br_init._set_random_seed
    if not getattr(orig_seed, "_evo2_cpu", False):

        def _set_random_seed(seed_, *args, **kwargs):
            out = orig_seed(seed_, *args, **kwargs)
            # Bridge seeds the model-parallel tracker only when torch.cuda.device_count() > 0.
            if not tensor_parallel.get_cuda_rng_tracker().is_initialized():
                tensor_parallel.model_parallel_cuda_manual_seed(seed_)
            return out

        _set_random_seed._evo2_cpu = True
        br_init._set_random_seed = _set_random_seed

    with contextlib.suppress(ImportError):
        import megatron.bridge.peft.utils as peft_utils
        from megatron.core.extensions import transformer_engine as mcore_te

        peft_utils.HAVE_TE = bool(getattr(mcore_te, "HAVE_TE", False))


def enable() -> None:
    """Switch this process to CPU mode (idempotent). See the module docstring for what changes."""
    global _ENABLED, _MODE
    if _ENABLED:
        return
    from evo2_recipe.compat import megatron_fixes

    if not megatron_fixes.hide_transformer_engine():
        logging.getLogger(__name__).warning(
            "CPU mode chosen after Transformer Engine was imported: megatron keeps TE's CUDA-only kernels (its Adam, "
            "TE layers), which fail on CPU tensors. Choose CPU mode first: --cpu or EVO2_CPU=1, before importing "
            "evo2_recipe.inference or megatron")
    megatron_fixes.apply()
    _patch_torch_cuda()
    _patch_megatron_core()
    _patch_megatron_bridge()
    _MODE = _CudaToCpuMode()
    _MODE.__enter__()  # process-wide for the main thread; spawned ranks call enable() themselves
    os.environ["EVO2_CPU"] = "1"
    _ENABLED = True


def enter_runtime(cpu: bool | None = None) -> bool:
    """An entry point's setup (CLIs, ``Evo2.from_checkpoint``, spawned ranks, scripts): CPU mode as
    :func:`maybe_enable` decides - first, so that it can hide Transformer Engine from megatron's import - then the
    megatron fixes. Returns True for CPU."""
    from evo2_recipe.compat import megatron_fixes

    on_cpu = maybe_enable(cpu)
    megatron_fixes.apply()
    return on_cpu


def maybe_enable(cpu: bool | None = None) -> bool:
    """Enable CPU mode if ``cpu`` is True, or if it is None and :func:`cpu_mode_requested`. Returns the mode."""
    if cpu is None:
        cpu = cpu_mode_requested()
    if cpu:
        enable()
    return bool(cpu)
