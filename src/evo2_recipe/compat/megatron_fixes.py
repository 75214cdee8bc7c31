"""Nine fixes for pip-installed megatron-core 0.19 / Megatron-Bridge 0.6 that are needed on CPU *and* GPU.

1. ``megatron.bridge.peft.lora_layers`` runs ``import transformer_engine.pytorch as te`` unconditionally, so without
   Transformer Engine every ``megatron.bridge`` import fails. A ``sys.meta_path`` finder hands an inert stub to that
   one module-level import only. The stub is dropped from ``sys.modules`` at the next unrelated import, so
   megatron-core's own ``try: import transformer_engine`` probes keep seeing ``ImportError`` (``HAVE_TE=False``).
   Nothing is installed globally and, when TE is really importable, nothing is stubbed at all.
2. ``megatron.core.datasets.utils.compile_helpers`` runs ``make`` in the installed package, but the wheel ships the
   prebuilt ``helpers_cpp`` extension and no Makefile, so Bridge's initialisation exits. It is replaced with an
   import of the prebuilt module.

3. Without Apex or Transformer Engine, megatron's ``DistributedOptimizer.state_dict`` asserts that every Adam
   parameter state holds one common ``step``; when a checkpoint is *loaded* into a fresh optimizer the state is
   still empty, so resuming crashes (``assert len(steps) == 1``). The fresh state is filled with zeros first (what
   TE/Apex's ``init_state_fn`` does). Even so, that code path does not restore the Adam moments exactly, which is
   why ``train_evo2`` defaults to the plain optimizer when neither TE nor Apex is installed.
4. Neither the plain nor the distributed mixed-precision optimizer can checkpoint a bf16 model holding fp32
   parameters (the Hyena filters): see :mod:`evo2_recipe.compat.mixed_dtype_optimizer`.
5. Without Apex or Transformer Engine, megatron builds torch's Adam/AdamW with its default multi-tensor ("foreach")
   step: a dozen passes over the fp32 master state, ~24 ms of a 200 ms ``evo2_1b_base`` step on an H200 (profiler).
   Its param groups are switched to torch's fused step (one kernel per device and dtype; the same update).
6. On the same path megatron's stand-ins for Apex's multi-tensor kernels take one ``.item()`` host sync per parameter
   for the gradient norm (~250 per ``evo2_1b_base`` step; the GPU idled 8-11 ms per step) and two kernels per
   parameter for each scale or copy (clipping, master -> model weights). They are replaced with torch's multi-tensor
   ``_foreach_norm`` / ``_foreach_mul_`` / ``_foreach_copy_`` (same values, no host sync).
7. ``gradient_accumulation_fusion`` (each linear's weight gradient accumulated by its GEMM straight into the fp32
   ``main_grad``, instead of a 16-bit gradient that megatron's DDP hook then adds: one fp32 read-modify-write per
   parameter per step) needs Apex's ``fused_weight_gradient_mlp_cuda`` in megatron's own linears. Without Apex that
   extension is stood in for by :func:`accumulate_wgrad`: torch's ``addmm`` with an fp32 output on CUDA.
8. With the per-token loss megatron divides every gradient by the step's token count, a 0-dim device tensor (no
   host sync): ``grad_data *= factor``. CUDA runs a tensor times a 0-dim tensor through its generic strided kernel,
   ~1 TB/s on an H200 (27.5 ms of a 7b step with bf16 gradients). :func:`scale_in_place` multiplies by the same
   factor in torch's multi-tensor kernel instead (2.6x faster on bf16, bitwise the same values).
9. With Transformer Engine megatron keeps the gradient norm on the device and always multiplies every gradient by
   ``min(1, max_norm / norm)``: a full read-modify-write of the fp32 gradients (14 ms of a 7b step on an H200) that
   changes nothing whenever the norm is under the threshold. The norm is read on the host for the step's log
   anyway; :func:`clip_by_total_norm` reads it first and scales only when clipping (megatron's Apex/local path).

:func:`install_import_guard` (fix 1 alone) is what importing :mod:`evo2_recipe.models.providers`,
:mod:`evo2_recipe.training.recipe` or :mod:`evo2_recipe.models.lora` does: it changes no megatron code, it only lets
Megatron-Bridge import without TE. :func:`apply` (all nine, idempotent) is called at the entry points only: every
CLI, :mod:`evo2_recipe.compat.cpu`, ``Evo2.from_checkpoint``, ``evo2_pretrain_config``, spawned ranks and the test
conftest. :func:`hide_transformer_engine` (CPU mode on a host with TE) turns the same finder into a wall for TE.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types

_TE_NAMES = ("transformer_engine", "transformer_engine.pytorch")
# Modules whose module-level TE import must not break the package import.
_GUARDED_IMPORTERS = ("megatron.bridge.peft.lora_layers", "megatron.bridge.peft.lora")
_APPLIED = False
_GUARD_INSTALLED = False
_TE_HIDDEN = False  # CPU mode on a host with TE: see hide_transformer_engine


def _inert_attribute(owner, name: str, module_name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    value = _InertMeta(name, (), {"__module__": module_name})
    setattr(owner, name, value)
    return value


class _InertMeta(type):
    """Classes whose unknown attributes are further inert classes (``te.ops.Sequential`` in annotations)."""

    def __getattr__(cls, name: str):
        return _inert_attribute(cls, name, cls.__module__)


class _InertModule(types.ModuleType):
    """Module whose every attribute is a fresh inert class (so ``isinstance`` checks against it are False)."""

    def __getattr__(self, name: str):
        return _inert_attribute(self, name, self.__name__)


class _StubLoader(importlib.abc.Loader):
    def create_module(self, spec):
        module = _InertModule(spec.name)
        module.__path__ = []  # a package, so "transformer_engine.pytorch" resolves under it
        module._evo2_te_stub = True
        return module

    def exec_module(self, module):
        pass


class _HiddenLoader(importlib.abc.Loader):
    """Fails the import as a missing module would (``ImportError``, nothing left in ``sys.modules``)."""

    def create_module(self, spec):
        raise ModuleNotFoundError(f"No module named {spec.name!r} (Transformer Engine is hidden in CPU mode)",
                                  name=spec.name)

    def exec_module(self, module):
        pass


class _TEImportGuard(importlib.abc.MetaPathFinder):
    """Gives the TE stub only to imports executed at module level of a guarded Megatron-Bridge module; once TE is
    hidden, fails every other TE import."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _TE_NAMES:
            _drop_te_stub()
            return self._hidden(fullname)
        frame = sys._getframe(1)
        while frame is not None:
            if frame.f_code.co_name == "<module>" and frame.f_globals.get("__name__") in _GUARDED_IMPORTERS:
                return importlib.machinery.ModuleSpec(fullname, _StubLoader(), is_package=True)
            frame = frame.f_back
        return self._hidden(fullname)

    @staticmethod
    def _hidden(fullname):
        if _TE_HIDDEN and fullname.partition(".")[0] == "transformer_engine":
            return importlib.machinery.ModuleSpec(fullname, _HiddenLoader())
        return None


def _drop_te_stub() -> None:
    for name in _TE_NAMES:
        module = sys.modules.get(name)
        if module is not None and getattr(module, "_evo2_te_stub", False):
            del sys.modules[name]


def transformer_engine_available() -> bool:
    """True when the real Transformer Engine PyTorch extension imports."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # a half-installed TE raises RuntimeError, not ImportError
        return False
    finally:
        _drop_te_stub()
    return True


def transformer_engine_installed() -> bool:
    """Whether a Transformer Engine package is on the path, hidden from imports (CPU mode) or not; imports nothing."""
    return importlib.machinery.PathFinder.find_spec("transformer_engine") is not None


def te_spec_by_default() -> bool:
    """Whether models default to the Transformer Engine layer spec: TE imports *and* a GPU is visible (TE's layers
    refuse to build without CUDA, e.g. under ``CUDA_VISIBLE_DEVICES=""`` on a GPU host with TE installed)."""
    import torch

    return torch.cuda.is_available() and transformer_engine_available()


def _compile_helpers_prebuilt() -> None:
    """Stand-in for megatron's ``compile_helpers``: the pip wheel ships the extension prebuilt."""
    importlib.import_module("megatron.core.datasets.helpers_cpp")


def _patch_distributed_optimizer_state() -> None:
    import torch
    from megatron.core.optimizer import distrib_optimizer as dopt

    if getattr(dopt, "HAVE_APEX_OR_TE", True) or getattr(dopt.DistributedOptimizer.state_dict, "_evo2", False):
        return
    original = dopt.DistributedOptimizer.state_dict

    def state_dict(self):
        inner = self.optimizer
        if isinstance(inner, torch.optim.Optimizer) and len(inner.state) == 0:
            for group in inner.param_groups:
                for p in group["params"]:
                    on_device = group.get("fused") or group.get("capturable")  # torch keeps their step there
                    inner.state[p] = {"step": torch.zeros((), dtype=torch.float32,
                                                          device=p.device if on_device else "cpu"),
                                      "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
        return original(self)

    state_dict._evo2 = True
    dopt.DistributedOptimizer.state_dict = state_dict


def _use_fused_torch_adam(optimizer) -> None:
    """Switch every torch Adam/AdamW under a megatron optimizer (``.optimizer``, ``.chained_optimizers``) to torch's
    fused step where its parameters allow it (floating point, on a device torch fuses for)."""
    import torch

    inners = [optimizer]
    while inners:
        opt = inners.pop()
        inners += list(getattr(opt, "chained_optimizers", None) or [])
        inner = getattr(opt, "optimizer", None)
        if inner is not None and not isinstance(opt, torch.optim.Optimizer):
            inners.append(inner)
        # a fresh optimizer only: a fused step keeps its step counters on the device, a foreach one on the host
        if not isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)) or opt.state:
            continue
        params = [p for g in opt.param_groups for p in g["params"]]
        if (not params or opt.defaults.get("differentiable")
                or not all(p.is_floating_point() and p.device.type in ("cuda", "cpu") for p in params)):
            continue
        for group in [opt.defaults, *opt.param_groups]:
            group["fused"], group["foreach"] = True, False


def _patch_torch_adam_fused() -> None:
    import megatron.core.optimizer as mopt

    build = mopt._get_megatron_optimizer_based_on_param_groups
    if not getattr(mopt, "USING_PYTORCH_OPTIMIZER", False) or getattr(build, "_evo2", False):
        return

    def build_fused(*args, **kwargs):
        optimizer = build(*args, **kwargs)
        _use_fused_torch_adam(optimizer)
        return optimizer

    build_fused._evo2 = True
    mopt._get_megatron_optimizer_based_on_param_groups = build_fused


def foreach_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """Drop-in for megatron's ``local_multi_tensor_l2_norm``: the l2 norm of all of ``tensor_lists[0]`` as a (1,)
    fp32 tensor, from torch's multi-tensor norm - no host sync."""
    import torch

    tensors = tensor_lists[0]
    if not tensors:
        return torch.zeros(1, dtype=torch.float32), None
    norms = torch._foreach_norm(tensors, 2, dtype=torch.float32)
    return torch.linalg.vector_norm(torch.stack(norms)).reshape(1), None


def foreach_scale(chunk_size, noop_flag, tensor_lists, scale):
    """Drop-in for megatron's ``local_multi_tensor_scale``: ``dst = src * scale`` (in place when they are the same
    fp32 tensors - the clipped master gradients; a copy, with the dtype cast, when ``scale`` is 1) in multi-tensor
    passes, each value rounded once as ``src * scale`` rounds it."""
    import torch

    src, dst = tensor_lists
    # (torch's in-place foreach multiply of a 16-bit tensor by a Python scalar rounds differently on the CPU)
    if all(a is b and a.dtype == torch.float32 for a, b in zip(src, dst)):
        torch._foreach_mul_(dst, scale)
    elif isinstance(scale, (int, float)) and scale == 1.0:
        torch._foreach_copy_(dst, src)
    else:
        torch._foreach_copy_(dst, torch._foreach_mul(src, scale))


def _patch_multi_tensor_fallbacks() -> None:
    from megatron.core import utils as mutils
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer import optimizer as mopt

    if getattr(clip_grads, "l2_norm_impl", None) is mutils.local_multi_tensor_l2_norm:
        clip_grads.l2_norm_impl = foreach_l2_norm
    for module in (clip_grads, mopt):
        if getattr(module, "multi_tensor_scale_impl", None) is mutils.local_multi_tensor_scale:
            module.multi_tensor_scale_impl = foreach_scale


def accumulate_wgrad(main_grad, a, b) -> None:
    """``main_grad += a @ b`` accumulated in ``main_grad``'s dtype (fp32 for 16-bit ``a``, ``b``): the weight
    gradient of a linear layer, ``grad_output^T @ input``, written by the GEMM itself (``a``, ``b`` may be
    transposed views)."""
    import torch

    if main_grad.dtype == a.dtype == b.dtype:
        main_grad.addmm_(a, b)
    elif main_grad.is_cuda:  # cuBLAS: 16-bit operands, fp32 accumulator and output, in place
        torch.addmm(main_grad, a, b, out_dtype=main_grad.dtype, out=main_grad)
    else:  # (torch's CPU addmm has no mixed-dtype output): the same exact products, summed in main_grad's dtype
        main_grad.addmm_(a.to(main_grad.dtype), b.to(main_grad.dtype))


class _WgradAccumulation:
    """Apex's ``fused_weight_gradient_mlp_cuda`` interface, as megatron's linears call it."""

    @staticmethod
    def wgrad_gemm_accum_fp32(total_input, grad_output, main_grad) -> None:
        accumulate_wgrad(main_grad, grad_output.t(), total_input)

    wgrad_gemm_accum_fp16 = wgrad_gemm_accum_fp32


def _patch_wgrad_accumulation() -> None:
    from megatron.core.tensor_parallel import layers

    if not layers._grad_accum_fusion_available:
        layers.fused_weight_gradient_mlp_cuda = _WgradAccumulation
        layers._grad_accum_fusion_available = True


def wgrad_accumulation_available() -> bool:
    """Whether megatron's linears can take ``gradient_accumulation_fusion`` (Apex, or fix 7 applied)."""
    from megatron.core.tensor_parallel import layers

    return bool(layers._grad_accum_fusion_available)


def scale_in_place(tensor, factor) -> None:
    """``tensor *= factor`` with the values megatron's gradient scaling gets; a one-element device ``factor`` on CUDA
    goes through torch's multi-tensor multiply (CUDA's ``*=`` casts such a factor to ``tensor``'s dtype and
    multiplies in fp32: so does this)."""
    import torch

    if isinstance(factor, torch.Tensor) and tensor.is_cuda and factor.numel() == 1:
        torch._foreach_mul_([tensor], factor.reshape(()).to(tensor.dtype))
    else:
        tensor *= factor


def clip_by_total_norm(original, parameters, max_norm, total_norm, use_decoupled_grad=False):
    """megatron's ``clip_grad_by_total_norm_fp32`` given the norm as a host float (outside CUDA-graph capture): no
    pass over the gradients unless ``max_norm / norm < 1``."""
    import torch

    if isinstance(total_norm, torch.Tensor) and not (total_norm.is_cuda and torch.cuda.is_current_stream_capturing()):
        total_norm = total_norm.item()
    return original(parameters, max_norm, total_norm, use_decoupled_grad)


def _patch_gradient_clipping() -> None:
    import functools

    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer import optimizer as mopt

    if not getattr(clip_grads.clip_grad_by_total_norm_fp32, "_evo2", False):
        clip = functools.partial(clip_by_total_norm, clip_grads.clip_grad_by_total_norm_fp32)
        clip._evo2 = True
        clip_grads.clip_grad_by_total_norm_fp32 = mopt.clip_grad_by_total_norm_fp32 = clip


def _patch_gradient_scaling() -> None:
    from megatron.core.distributed.param_and_grad_buffer import _ParamAndGradBuffer

    def scale_gradients(self, scaling_factor) -> None:
        for grad in (self.grad_data, *self.extra_main_grads):
            scale_in_place(grad, scaling_factor)

    if not getattr(_ParamAndGradBuffer.scale_gradients, "_evo2", False):
        scale_gradients._evo2 = True
        _ParamAndGradBuffer.scale_gradients = scale_gradients


def install_import_guard() -> None:
    """Fix 1 only (idempotent): without TE, the guarded Bridge modules get the inert stub for their TE import."""
    global _GUARD_INSTALLED
    if not _GUARD_INSTALLED and importlib.util.find_spec("transformer_engine") is None:
        _insert_guard()
    _GUARD_INSTALLED = True


def _insert_guard() -> None:
    if not any(isinstance(finder, _TEImportGuard) for finder in sys.meta_path):
        sys.meta_path.insert(0, _TEImportGuard())


def hide_transformer_engine() -> bool:
    """Make this process see no Transformer Engine, for CPU mode on a host that has it: megatron binds TE's Adam and
    multi-tensor kernels at import, and those take CUDA tensors only. Too late (returns False) once TE is imported."""
    global _TE_HIDDEN
    if not _TE_HIDDEN:
        if any(name.partition(".")[0] == "transformer_engine" and not getattr(module, "_evo2_te_stub", False)
               for name, module in list(sys.modules.items()) if module is not None):
            return False
        _TE_HIDDEN = True
        _insert_guard()
    return True


def apply() -> None:
    """Install all nine fixes (idempotent)."""
    global _APPLIED
    if _APPLIED:
        return
    install_import_guard()
    import megatron.core.datasets.utils as dataset_utils

    dataset_utils.compile_helpers = _compile_helpers_prebuilt
    _patch_distributed_optimizer_state()
    _patch_torch_adam_fused()
    _patch_multi_tensor_fallbacks()
    _patch_wgrad_accumulation()
    _patch_gradient_scaling()
    _patch_gradient_clipping()
    from evo2_recipe.compat.mixed_dtype_optimizer import patch_optimizers

    patch_optimizers()
    if "megatron.bridge.training.initialize" in sys.modules:  # bound by name at its import
        sys.modules["megatron.bridge.training.initialize"].compile_helpers = _compile_helpers_prebuilt
    _APPLIED = True
