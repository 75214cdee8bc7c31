"""The fused kernels inside the whole model: a training step and a no-grad forward equal the plain operators' (CPU:
Triton interpreter, set in conftest; GPU: compiled kernels), with the kernels seen to run.

Each test pins its layer spec: a GPU host with Transformer Engine defaults to TE's, whose projection, norms and RoPE
are TE's own, not the local spec's channel-first projection and kernels these tests count.
"""

import pytest
import torch
from hyena_helpers import DEVICE

pytest.importorskip("triton")


def _model_fused_vs_plain(rank, world, name, use_te):
    from hyena_helpers import loss_and_grads_per_option

    from evo2_recipe.models.hyena.kernels import gating

    calls = []
    for fn in ("hyena_prologue_channel_first", "hyena_prologue"):  # this process only
        real = getattr(gating, fn)
        setattr(gating, fn, lambda *a, real=real, fn=fn: calls.append(fn) or real(*a))
    options = {f: {"use_fused_hyena_kernels": f, "use_te": use_te} for f in (False, True)}
    return loss_and_grads_per_option(name, options, DEVICE), calls


def _te_spec_here():
    from evo2_recipe.compat.megatron_fixes import te_spec_by_default

    return DEVICE == "cuda" and te_spec_by_default()


@pytest.mark.parametrize("use_te", [False, pytest.param(True, marks=pytest.mark.skipif(
    not _te_spec_here(), reason="TE spec: GPU with Transformer Engine"))])
@pytest.mark.parametrize("name", ["striped_hyena_tiny", "striped_hyena_tiny_nv"])
def test_model_with_fused_kernels_equals_plain(name, use_te):
    """A training step with the kernels: loss and every gradient == the plain operators' (fp32, 1e-5), in the local
    spec and (GPU with TE) the TE spec, each pinned: a GPU host with TE defaults to TE's. The local spec's Hyena
    projection writes channel-first features (``W @ x^T``, its own backward) for the prologue, never the
    sequence-first ones; TE's projection writes sequence-first ones."""
    from evo2_recipe.utils.spawn import run_on_ranks

    ((out, calls),) = run_on_ranks(_model_fused_vs_plain, 1, name, use_te, cpu=DEVICE == "cpu")
    expected = "hyena_prologue" if use_te else "hyena_prologue_channel_first"
    assert calls and set(calls) == {expected}, calls
    (loss_p, grads_p), (loss_f, grads_f) = out[False], out[True]
    torch.testing.assert_close(loss_f, loss_p, rtol=1e-6, atol=1e-5)
    for k in grads_p:
        torch.testing.assert_close(grads_f[k], grads_p[k], rtol=1e-5, atol=1e-5, msg=k)


def _model_logits_fused_vs_plain(rank, world, name, pattern):
    from megatron.core import parallel_state, tensor_parallel

    from hyena_helpers import dna_batch, randomise_weights_, tiny_provider

    from evo2_recipe.models.hyena.kernels import gating, glu, medium_conv, modal_conv, residual, rms_norm, rope

    parallel_state.initialize_model_parallel()
    tensor_parallel.model_parallel_cuda_manual_seed(5)
    tokens, _ = (t.to(DEVICE) for t in dna_batch(2, 150))
    calls = []
    for module, fn in ((medium_conv, "medium_conv_epilogue"), (modal_conv, "modal_conv"),
                       (rope, "apply_rotary_pos_emb"), (rms_norm, "rms_norm"),
                       (residual, "residual_add_rms_norm"), (glu, "gelu_glu"),
                       (gating, "hyena_prologue_channel_first"), (gating, "hyena_prologue")):  # this process only
        real = getattr(module, fn)
        setattr(module, fn, lambda *a, real=real, fn=fn: calls.append(fn) or real(*a))
    out, weights = {}, None
    overrides = {"hybrid_override_pattern": pattern} if pattern else {}
    for fused in (False, True):  # on CPU the kernels run only when asked for (under the interpreter)
        model = tiny_provider(name, use_fused_hyena_kernels=fused, use_te=False, **overrides).provide().to(DEVICE)
        model.eval()
        if weights is None:
            weights = randomise_weights_(model).state_dict()
        model.load_state_dict(weights)
        calls.clear()
        with torch.no_grad():
            out[fused] = model(tokens).cpu()
    out["inference_kernel_calls"] = calls  # the fused forward's
    out["pattern"] = model.config.hybrid_override_pattern
    return out


@pytest.mark.parametrize("name,pattern", [("striped_hyena_tiny", None), ("striped_hyena_tiny_nv", None),
                                          ("striped_hyena_tiny", "*SDH")])
def test_model_inference_with_fused_kernels_equals_plain(name, pattern):
    """A no-grad forward (scoring) takes the inference-only kernels too: logits == the plain operators' (fp32, 1e-5),
    with the hcm, hcl, RoPE, norm, join+norm and GELU-GLU kernels seen to run (150 tokens: the hcl scan over three
    chunks). Every norm after a Hyena layer (the next Hyena layer's pre-mixer norm, the final norm) runs in that
    layer's last join: one join+norm per Hyena layer plus one per Hyena layer whose output a local norm reads, and a
    norm of its own only before attention layers' linears, after attention layers and at the stack's start."""
    from collections import Counter

    from evo2_recipe.utils.spawn import run_on_ranks

    ((out,),) = (run_on_ranks(_model_logits_fused_vs_plain, 1, name, pattern, cpu=DEVICE == "cpu"),)
    torch.testing.assert_close(out[True], out[False], rtol=1e-5, atol=1e-5)
    expected = {"medium_conv_epilogue", "modal_conv", "apply_rotary_pos_emb", "rms_norm", "residual_add_rms_norm",
                "hyena_prologue_channel_first"}  # never the sequence-first prologue: the projection writes W @ x^T
    if not name.endswith("_nv"):  # ARC layer 0's exact-GELU GLU (the NV models keep megatron's fused bias-GELU)
        expected.add("gelu_glu")
    calls = Counter(out["inference_kernel_calls"])
    assert set(calls) == expected, calls
    hyena = [k != "*" for k in out["pattern"]]
    assert calls["hyena_prologue_channel_first"] == sum(hyena), calls
    n = len(hyena)
    joins = sum(1 + (i == n - 1 or hyena[i + 1]) for i in range(n) if hyena[i])
    norms = sum(2 for h in hyena if not h) + sum(1 for i in range(n) if hyena[i] and (i == 0 or not hyena[i - 1]))
    norms += not hyena[-1]  # the final norm after an attention layer
    assert (calls["residual_add_rms_norm"], calls["rms_norm"]) == (joins, norms), (out["pattern"], calls)
