"""megatron-core's optimizers on a bf16 Hyena model whose long/medium filters stay fp32 (compat.mixed_dtype_optimizer),
and torch's fused Adam step and multi-tensor norm / scale where megatron falls back to torch's optimizer
(compat.megatron_fixes, fixes 5 and 6), and weight gradients accumulated by their GEMMs (fix 7).

Oracle: right after construction every optimizer parameter equals (fp32 main copy) or is (fp32 parameter) the model
parameter the optimizer's own maps assign to it. Without the compat fix the distributed optimizer's map points at
other parameters and its checkpoint state fails a shape assertion. (The plain optimizer's save/resume is covered
bit-for-bit by ``test_train.py::test_kill_and_resume_reproduces_the_loss_curve``.)
"""

import pytest
import torch

from evo2_recipe.utils.spawn import run_on_ranks


def _bf16_tiny_provider(on_gpu=False):
    """The tiny model in bf16 with its fp32 filters (model parallel state initialised here, inside a rank)."""
    from megatron.core import parallel_state, tensor_parallel

    from evo2_recipe.models.providers import get_provider

    parallel_state.initialize_model_parallel()
    tensor_parallel.model_parallel_cuda_manual_seed(3)
    provider = get_provider("striped_hyena_tiny", vocab_size=256, seq_length=64, bf16=True,
                            params_dtype=torch.bfloat16, use_cpu_initialization=not on_gpu)
    provider.finalize()
    return provider


def _optimizer_maps(rank, world, on_gpu):
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer import distrib_optimizer

    provider = _bf16_tiny_provider(on_gpu)
    results = {}
    for distributed in (False, True):
        (model,) = provider.provide_distributed_model(
            ddp_config=DistributedDataParallelConfig(use_distributed_optimizer=distributed, grad_reduce_in_fp32=True),
            bf16=True, use_cpu_initialization=not on_gpu)
        names = {id(p): n for n, p in model.named_parameters()}
        opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3, bf16=True,
                                                     use_distributed_optimizer=distributed), [model])
        opt = opt.chained_optimizers[0] if hasattr(opt, "chained_optimizers") else opt
        pairs = []  # (model name, model dtype, does the optimizer's parameter equal the model parameter)
        if distributed:
            for p, (g, i) in opt.model_param_group_index_map.items():
                main = opt.optimizer.param_groups[g]["params"][i]
                same = main.numel() == p.numel() and torch.equal(main.detach().view(-1), p.detach().float().view(-1))
                pairs.append((names[id(p)], p.dtype, same))
            if distrib_optimizer.HAVE_APEX_OR_TE:  # TE's Adam makes its state at the first step; megatron fills it
                opt.init_state_fn(opt.optimizer, opt.config)  # this way before a load, a save before a step needs it
            for layout in ("dp_reshardable", "fully_reshardable"):  # Bridge's two layouts (--optim-full-reshardable)
                opt.sharded_state_dict(model.sharded_state_dict(), metadata={"distrib_optim_sharding_type": layout})
        else:
            main_of = {id(main): m for ms, mains in zip(opt.float16_groups, opt.fp32_from_float16_groups)
                       for m, main in zip(ms, mains)}
            for group in opt.optimizer.param_groups:
                for main in group["params"]:
                    p = main_of.get(id(main), main)
                    pairs.append((names[id(p)], p.dtype, torch.equal(main.detach(), p.detach().float())))
            opt.sharded_state_dict(model.sharded_state_dict())
        results[distributed] = pairs
    return results


def test_both_optimizers_map_each_parameter_to_its_own_state_with_fp32_filters_in_a_bf16_model():
    # on a GPU machine the ranks run on CUDA, with TE's Adam where TE is installed: the path GPU training takes
    on_gpu = torch.cuda.is_available()
    (results,) = run_on_ranks(_optimizer_maps, 1, on_gpu, cpu=not on_gpu)
    for distributed, pairs in results.items():
        dtypes = {name.rsplit(".", 1)[1]: dtype for name, dtype, _ in pairs if ".filter." in name}
        assert dtypes == {"h": torch.float32, "gamma": torch.float32, "R": torch.float32, "p": torch.float32}
        assert any(dtype == torch.bfloat16 for _, dtype, _ in pairs)
        wrong = [name for name, _, same in pairs if not same]
        assert not wrong, (f"distributed={distributed}", wrong)


def _fused_adam_step(rank, world):
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    provider = _bf16_tiny_provider()
    (model,) = provider.provide_distributed_model(ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True),
                                                  bf16=True, use_cpu_initialization=True)
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3, bf16=True, weight_decay=0.1), [model])
    inners = [o.optimizer for o in getattr(opt, "chained_optimizers", [opt])]
    fused = [g["fused"] for inner in inners for g in inner.param_groups]
    gen = torch.Generator().manual_seed(0)
    diffs = []
    for inner in inners:  # the same update as torch's multi-tensor step from the same state and gradients
        ref_groups = []
        for g in inner.param_groups:
            copies = []
            for p in g["params"]:
                p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
                copies.append(p.detach().clone().requires_grad_())
                copies[-1].grad = p.grad.clone()
            ref_groups.append({**{k: v for k, v in g.items() if k not in ("params", "fused", "foreach")},
                               "params": copies})
        ref = type(inner)(ref_groups, foreach=True)
        for _ in range(3):
            inner.step()
            ref.step()
        diffs += [(p - r).abs().max().item() for g, rg in zip(inner.param_groups, ref_groups)
                  for p, r in zip(g["params"], rg["params"])]
    return fused, max(diffs), type(inners[0]).__name__


def test_torch_adam_takes_the_fused_step_without_apex_or_te():
    """Without Apex/TE megatron builds torch's AdamW; compat fix 5 switches it to the fused step: every param group
    fused, and three steps equal torch's multi-tensor steps (fp32 main parameters, 1e-6)."""
    (out,) = run_on_ranks(_fused_adam_step, 1)
    fused, diff, cls = out
    assert cls in ("Adam", "AdamW") and fused and all(fused), out
    assert diff <= 1e-6, diff


def test_multi_tensor_norm_and_scale_never_take_megatrons_per_tensor_fallbacks():
    """Compat fix 6: without Apex/TE megatron's gradient norm, clipping and master -> model copies run torch's
    multi-tensor ops (never its per-tensor stand-ins), with the values of a direct computation (fp32, 1e-6)."""
    from megatron.core import utils as mutils
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer import optimizer as mopt

    from evo2_recipe.compat.megatron_fixes import foreach_l2_norm, foreach_scale

    assert clip_grads.l2_norm_impl is not mutils.local_multi_tensor_l2_norm
    for module in (clip_grads, mopt):
        assert module.multi_tensor_scale_impl is not mutils.local_multi_tensor_scale
    gen = torch.Generator().manual_seed(0)
    shapes = [((7, 3), torch.float32), ((11,), torch.bfloat16), ((2, 2, 5), torch.float32)]
    ts = [torch.randn(s, generator=gen).to(d) for s, d in shapes]
    norm, _ = foreach_l2_norm(0, None, [ts], False)
    ref = torch.linalg.vector_norm(torch.cat([t.float().flatten() for t in ts]))
    assert norm.shape == (1,) and norm.dtype == torch.float32
    torch.testing.assert_close(norm[0], ref, rtol=1e-6, atol=0)
    for group in (ts, [t for t in ts if t.dtype == torch.float32]):  # clipping: in place (fp32 master gradients)
        scaled = [t.clone() for t in group]
        foreach_scale(0, None, [scaled, scaled], 0.37)
        for a, t in zip(scaled, group):
            torch.testing.assert_close(a, t * 0.37, rtol=0, atol=0)
    src = [torch.randn(t.shape, generator=gen) for t in ts]  # fp32 masters -> model weights of any dtype
    for scale in (1.0, 0.5):
        dst = [torch.empty_like(t) for t in ts]
        foreach_scale(0, None, [src, dst], scale)
        for d, s in zip(dst, src):
            torch.testing.assert_close(d, (s * scale).to(d.dtype), rtol=0, atol=0)


def _main_grads_with_and_without_fusion(rank, world, dtype, kernels):
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    from hyena_helpers import loss_and_grads_per_option, tiny_provider

    bf16 = dtype == torch.bfloat16
    options = {fusion: dict(gradient_accumulation_fusion=fusion, use_fused_hyena_kernels=kernels, bf16=bf16,
                            params_dtype=dtype) for fusion in (False, True)}
    out = loss_and_grads_per_option("striped_hyena_tiny", options, ddp_config=DistributedDataParallelConfig(
        grad_reduce_in_fp32=True))
    model = tiny_provider("striped_hyena_tiny").provide()
    linears = {f"{n}.weight" for n, m in model.named_modules()
               if isinstance(m, (ColumnParallelLinear, RowParallelLinear)) and m.weight is not None}
    return out, linears


@pytest.mark.parametrize("dtype,kernels", [(torch.float32, False), (torch.bfloat16, False), (torch.float32, True)])
def test_linear_weight_gradients_accumulate_into_main_grad(dtype, kernels):
    """Compat fix 7 (``gradient_accumulation_fusion`` without Apex): under megatron's DDP every linear weight's
    gradient GEMM writes into its fp32 ``main_grad`` (megatron's linears and, with the kernels, the Hyena projection's
    channel-first GEMMs), and the main gradients equal the unfused path's, where DDP adds a gradient in the model's
    dtype: fp32 to 1e-5; bf16 within that path's rounding of the gradients to bf16 (2^-7 of each tensor's largest)."""
    (result,) = run_on_ranks(_main_grads_with_and_without_fusion, 1, dtype, kernels)
    out, linears = result
    (loss_u, grads_u, fused_u), (loss_f, grads_f, fused_f) = out[False], out[True]
    fused_f = {k.removeprefix("module.").removeprefix("module.") for k in fused_f}  # DDP's (and bf16's) wrappers
    assert not fused_u and linears and linears <= fused_f, (fused_u, linears - fused_f)
    torch.testing.assert_close(loss_f, loss_u, rtol=0, atol=0)
    for k, ref in grads_u.items():
        assert grads_f[k].dtype == torch.float32
        if dtype == torch.float32:
            torch.testing.assert_close(grads_f[k], ref, rtol=1e-5, atol=1e-5, msg=k)
        else:  # (the tied embedding's unfused gradient is a bf16 sum of two bf16-rounded parts)
            assert (grads_f[k] - ref).abs().max() <= 2 ** -7 * ref.abs().max(), k


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(5760, 1920), (1920, 5120)])  # evo2_1b_base's input projection and fc2
def test_weight_gradient_gemm_accumulates_bf16_into_fp32_on_gpu(shape):
    """Fix 7's CUDA branch (cuBLAS, bf16 operands, fp32 accumulator in place), 8,192 tokens: twice into a non-zero
    main gradient equals the products summed in fp64 to 5e-5 of the largest entry, ten times closer than a bf16
    gradient (the unfused path) is to its exact value."""
    from evo2_recipe.compat.megatron_fixes import accumulate_wgrad

    O, I = shape
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(8192, I, device="cuda", generator=g).bfloat16()
    dy = torch.randn(8192, O, device="cuda", generator=g).bfloat16()
    main = torch.randn(O, I, device="cuda", generator=g)
    ref = main.double() + 2 * (dy.t().double() @ x.double())
    for _ in range(2):
        accumulate_wgrad(main, dy.t(), x)
    assert main.dtype == torch.float32
    scale = ref.abs().max()
    assert (main.double() - ref).abs().max() <= 5e-5 * scale  # measured 1.0e-5 (fp32 sums of 8,192 products)
    exact = dy.t().double() @ x.double()
    assert ((dy.t() @ x).double() - exact).abs().max() > 10 * (main.double() - ref).abs().max()  # bf16 gradient


def test_gradient_buffers_scale_by_the_token_count_through_fix_8():
    """Compat fix 8: megatron's gradient buffers take ``scale_gradients`` from :func:`scale_in_place`, which on CPU
    (the CI path) is ``*=`` itself: each gradient times 1 / tokens, for a 0-dim, a one-element and a float factor."""
    from megatron.core.distributed.param_and_grad_buffer import _ParamAndGradBuffer

    from evo2_recipe.compat import megatron_fixes
    from evo2_recipe.compat.megatron_fixes import scale_in_place

    megatron_fixes.apply()  # what every entry point does (CPU mode does it too; a GPU test process does not)
    assert getattr(_ParamAndGradBuffer.scale_gradients, "_evo2", False)
    grad = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    tokens = torch.tensor(8191)
    for factor in (1.0 / tokens, (1.0 / tokens).reshape(1), 1.0 / 8191):
        out = grad.clone()
        scale_in_place(out, factor)
        torch.testing.assert_close(out, grad / 8191, rtol=1e-6, atol=0)


def _clip(rank, world, device):
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer import optimizer as mopt

    out = []
    for norm in (0.5, 4.0):  # under and over max_norm = 1
        params = [torch.nn.Parameter(torch.zeros(s, device=device)) for s in ((3, 5), (7,))]
        for p in params:
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())).to(device)
        before = [p.grad.clone() for p in params]
        mopt.clip_grad_by_total_norm_fp32(params, 1.0, torch.tensor(norm, device=device))  # a device norm (TE's)
        out.append([(b.cpu(), p.grad.cpu()) for b, p in zip(before, params)])
    return out, mopt.clip_grad_by_total_norm_fp32 is clip_grads.clip_grad_by_total_norm_fp32


def test_gradient_clipping_scales_only_over_the_threshold_through_fix_9():
    """Compat fix 9: megatron's clipping, handed the norm as a tensor (Transformer Engine's path), leaves the gradients
    untouched under ``max_norm`` and scales them by ``max_norm / (norm + 1e-6)`` over it; both of megatron's names
    for it are the patched one. On the GPU (where TE's multi-tensor kernels take CUDA tensors only) on CUDA tensors."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ((out, same),) = run_on_ranks(_clip, 1, device, cpu=device == "cpu")
    assert same
    (under, over) = out
    for before, after in under:
        assert torch.equal(after, before)
    for before, after in over:
        torch.testing.assert_close(after, before * (1.0 / (4.0 + 1e-6)), rtol=1e-6, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gradient_scaling_on_gpu_equals_megatrons_multiply(dtype):
    """Fix 8's CUDA branch (torch's multi-tensor multiply) gives bitwise the values of megatron's ``grad *= factor``
    for a device factor 1 / tokens (8,191: not a power of two), over 2^24 + 3 gradients (a ragged last chunk)."""
    from evo2_recipe.compat.megatron_fixes import scale_in_place

    g = torch.Generator(device="cuda").manual_seed(0)
    grad = (torch.randn(2 ** 24 + 3, device="cuda", generator=g) * 1e-3).to(dtype)
    for tokens in (torch.tensor(8191, device="cuda"), torch.tensor([8191.0], device="cuda")):
        factor = 1.0 / torch.clamp(tokens, min=1)
        ref, out = grad.clone(), grad.clone()
        ref *= factor
        scale_in_place(out, factor)
        assert torch.equal(out, ref)
