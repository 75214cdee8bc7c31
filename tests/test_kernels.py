"""Fused Triton kernels == their plain-PyTorch twins (CPU: Triton interpreter, set in conftest; GPU: real kernels).

fp32 forward and gradients to 1e-5 at small sizes, odd lengths, lengths shorter than the filters, batch > 1, with and
without the NV skip bias; ``tests/test_gpu.py``-style bf16 checks at real sizes run on the GPU.
"""

import pytest
import torch
from hyena_helpers import DEVICE

from evo2_recipe.models.hyena import operators as ops

pytest.importorskip("triton")
_REAL = pytest.mark.skipif(DEVICE != "cuda", reason="real widths: GPU only")


def _inputs(L, B, C, seed=0, dtype=torch.float32):
    """Projection output (L, B, 3C) and projection-conv taps (3C, 3)."""
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(L, B, 3 * C, generator=g)
    wp = torch.randn(3 * C, 3, generator=g) / 3
    return [t.to(DEVICE, dtype).requires_grad_() for t in (f, wp)]


@pytest.mark.parametrize("G,O,L", [(6, 16, 37), (3, 16, 1), (20, 4, 2100)])  # L: backward over 2 programs
def test_fused_modal_filter_equals_plain(G, O, L):
    from evo2_recipe.models.hyena.kernels.modal_filter import modal_filter as fused

    g = torch.Generator().manual_seed(G + L)
    p = -1.0 + 0.3 * torch.randn(G, O, generator=g)
    gamma = torch.empty(G, O).uniform_(0.01, 0.1, generator=g).log()  # HyenaConfig's modal_gamma range
    R = 0.1 * torch.randn(G, O, generator=g)
    args = [t.to(DEVICE).requires_grad_() for t in (p, gamma, R)]
    ref, out = ops.modal_filter(*args, L), fused(*args, L)
    assert out.shape == (G, L) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    grad = torch.randn(G, L, generator=g).to(DEVICE)
    for a, b, name in zip(torch.autograd.grad(out, args, grad), torch.autograd.grad(ref, args, grad),
                       ("p", "gamma", "R")):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("B,C,G,O,T", [(2, 12, 3, 16, 37), (1, 8, 8, 16, 1), (1, 20, 4, 5, 300), (2, 8, 2, 16, 9000)])
def test_fused_modal_prompt_state_equals_plain(B, C, G, O, T):
    """The hcl modal state a prompt leaves (generation's prefill): one-pass kernel vs the two-level decayed sum, on a
    strided ``u`` view as the layer passes it; T = 1, T not a multiple of the chunk, O not a power of 2 (nor 16),
    T over several blocks of chunks (the loop)."""
    from evo2_recipe.models.hyena.inference_state import decayed_sum
    from evo2_recipe.models.hyena.kernels.modal_filter import modal_prompt_state

    g = torch.Generator().manual_seed(B + C + T)
    u = torch.randn(B, T, 2 * C, generator=g).to(DEVICE).transpose(1, 2)[:, :C]  # (B, C, T), non-contiguous
    log_poles = -torch.empty(G, O).uniform_(1e-4, 0.5, generator=g).to(DEVICE)  # slow and fast modes
    ref = decayed_sum(u.float(), ops.expand_groups(log_poles, C))
    out = modal_prompt_state(u, log_poles)
    assert out.shape == (B, C, O) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("L,B,C", [(37, 2, 8), (1, 1, 16), (70, 3, 72)])
def test_fused_prologue_and_epilogue_equal_plain(L, B, C):
    from evo2_recipe.models.hyena.kernels import gating

    f, wp = _inputs(L, B, C)
    ref = ops.hyena_prologue(f, wp)
    out = gating.hyena_prologue(f, wp)
    g = [torch.randn_like(t) for t in ref]
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    g_f, g_wp = torch.autograd.grad(ref, [f, wp], g)
    for a, b in zip(torch.autograd.grad(out, [f, wp], g), (g_f, g_wp)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    f_cf = f.detach().permute(1, 2, 0).contiguous().requires_grad_()  # channel-first features: the same kernels
    cf = gating.hyena_prologue_channel_first(f_cf, wp)                 # reading along time, forward and backward
    for a, b in zip(cf, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    g_fcf, g_wpcf = torch.autograd.grad(cf, [f_cf, wp], g)
    torch.testing.assert_close(g_fcf, g_f.permute(1, 2, 0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_wpcf, g_wp, rtol=1e-5, atol=1e-5)
    x1 = torch.randn(B, C, L, device=DEVICE, requires_grad=True)
    y_2L = torch.randn(B, C, 2 * L, device=DEVICE, requires_grad=True)  # y as the FFT leaves it: a strided half
    y = y_2L[..., :L]
    ref, out = ops.hyena_epilogue(x1, y), gating.hyena_epilogue(x1, y)
    assert out.shape == (L, B, C)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, [x1, y_2L], g), torch.autograd.grad(ref, [x1, y_2L], g)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="real widths in bf16: GPU only")
def test_fused_prologue_and_epilogue_bf16_real_width():
    """evo2_1b_base width at 8,192 tokens in bf16: forward and gradients within bf16 rounding of the plain ops (the
    kernels round where autograd rounds; only fp32 summation order differs). Relative to each tensor's scale:
    outputs and g_features <= 1e-2, the projection-conv weight gradient (a sum over 8,192 positions) <= 1e-2."""
    from evo2_recipe.models.hyena.kernels import gating

    f, wp = _inputs(8192, 1, 1920, dtype=torch.bfloat16)
    ref, out = ops.hyena_prologue(f, wp), gating.hyena_prologue(f, wp)
    f_cf = f.detach().permute(1, 2, 0).contiguous().requires_grad_()
    cf = gating.hyena_prologue_channel_first(f_cf, wp)
    for a, b in zip(cf, out):  # the same kernel: the same rounding, bit for bit
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    x1, u = (t.detach().requires_grad_() for t in out)
    y = torch.randn(1, 1920, 2 * 8192, device=DEVICE, requires_grad=True)
    z_ref, z = ops.hyena_epilogue(x1, y[..., :8192]), gating.hyena_epilogue(x1, y[..., :8192])
    g = [torch.randn_like(t) for t in (*ref, z)]
    g_f, g_wp = torch.autograd.grad(out, [f, wp], g[:2], retain_graph=True)
    g_fcf, g_wpcf = torch.autograd.grad(cf, [f_cf, wp], g[:2])
    torch.testing.assert_close(g_fcf, g_f.permute(1, 2, 0), rtol=0, atol=0)  # per position: the same sums
    torch.testing.assert_close(g_wpcf.float(), g_wp.float(), rtol=1e-2, atol=0)  # other blocks, other order
    pairs = list(zip(out, ref)) + [(z, z_ref)]
    pairs += list(zip(torch.autograd.grad(out, [f, wp], g[:2]), torch.autograd.grad(ref, [f, wp], g[:2])))
    pairs += list(zip(torch.autograd.grad(z, [x1, y], g[2]), torch.autograd.grad(z_ref, [x1, y], g[2])))
    for i, (a, b) in enumerate(pairs):
        err = (a.float() - b.float()).abs().max() / b.float().abs().max()
        assert err <= 1e-2, (i, err.item())


@pytest.mark.parametrize("L,B,C,skip", [(37, 2, 8, False), (5, 1, 16, True), (70, 3, 72, True)])  # L=5 < 7 taps
def test_fused_short_conv_epilogue_equals_plain(L, B, C, skip):
    from evo2_recipe.models.hyena.kernels import gating

    g = torch.Generator().manual_seed(L)
    x1, u = (torch.randn(B, C, L, generator=g).to(DEVICE).requires_grad_() for _ in range(2))
    w = (torch.randn(C, 7, generator=g) / 3).to(DEVICE).requires_grad_()
    b = torch.randn(C, generator=g).to(DEVICE).requires_grad_() if skip else None
    args = [x1, u, w] + ([b] if skip else [])
    ref, out = ops.short_conv_epilogue(x1, u, w, b), gating.short_conv_epilogue(x1, u, w, b)
    assert out.shape == (L, B, C)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn(L, B, C, generator=g).to(DEVICE)
    for a, r, name in zip(torch.autograd.grad(out, args, grad), torch.autograd.grad(ref, args, grad),
                          ("x1", "u", "w", "b")):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="real widths in bf16: GPU only")
@pytest.mark.parametrize("skip", [False, True])
def test_fused_short_conv_epilogue_bf16_real_width(skip):
    """evo2_1b_base width at 8,192 tokens in bf16: z and the gradients of x1, u, w (a sum over 8,192 positions) and
    the NV skip within 1e-2 of each tensor's scale of the plain ops (the kernels round where autograd rounds)."""
    from evo2_recipe.models.hyena.kernels import gating

    g = torch.Generator().manual_seed(3)
    x1, u = (torch.randn(1, 1920, 8192, generator=g).to(DEVICE, torch.bfloat16).requires_grad_() for _ in range(2))
    w = (torch.randn(1920, 7, generator=g) / 3).to(DEVICE, torch.bfloat16).requires_grad_()
    b = torch.randn(1920, generator=g).to(DEVICE, torch.bfloat16).requires_grad_() if skip else None
    args = [x1, u, w] + ([b] if skip else [])
    ref, out = ops.short_conv_epilogue(x1, u, w, b), gating.short_conv_epilogue(x1, u, w, b)
    grad = torch.randn(ref.shape, generator=g).to(DEVICE, torch.bfloat16)
    pairs = [(out, ref)] + list(zip(torch.autograd.grad(out, args, grad), torch.autograd.grad(ref, args, grad)))
    for name, (a, r) in zip(("z", "x1", "u", "w", "b"), pairs):
        err = (a.float() - r.float()).abs().max() / r.float().abs().max()
        assert err <= 1e-2, (name, err.item())


# Triton's interpreter casts fp32 -> bf16 by truncation, the GPU (and torch) round to nearest: fp16 on the CPU
LOW = torch.bfloat16 if DEVICE == "cuda" else torch.float16


def _modal_inputs(B, C, G, O, L, dtype=torch.float32, fast=False):
    """u (B, C, L), the hcl filter's log poles and residues (G, O) (slow modes, or spread over fast ones too) and
    the skip D (C,)."""
    g = torch.Generator().manual_seed(B + C + L)
    u = torch.randn(B, C, L, generator=g).to(DEVICE, dtype)
    p = (-1.0 + 0.3 * torch.randn(G, O, generator=g)) + (torch.linspace(0, 6, O) if fast else 0)
    gamma = torch.empty(G, O).uniform_(0.01, 0.1, generator=g).log()  # HyenaConfig's modal_gamma range
    R = 0.1 * torch.randn(G, O, generator=g)
    return u, p.to(DEVICE), gamma.to(DEVICE), R.to(DEVICE), torch.randn(C, generator=g).to(DEVICE, dtype)


@pytest.mark.parametrize("B,C,G,O,L,fast", [(1, 4, 4, 16, 37, False), (2, 6, 3, 16, 5000, True),
                                            (1, 2, 2, 5, 64, False), (1, 3, 1, 16, 2049, True),
                                            (2, 2, 2, 16, 1, False)])
def test_fused_modal_conv_equals_fft(B, C, G, O, L, fast):
    """hcl as a chunked scan == the FFT convolution with the materialised modal filter (fp32, 1e-5 of the output's
    scale): one position, odd lengths, exactly one chunk, several tiles (2049, 5000: the carried state), grouped
    channels, O not a power of 2, slow and fast modes, batch > 1."""
    from evo2_recipe.models.hyena.kernels.modal_conv import modal_conv

    u, p, gamma, R, D = _modal_inputs(B, C, G, O, L, fast=fast)
    ref = ops.fft_causal_conv(u, ops.modal_filter(p, gamma, R, L), D)
    with torch.no_grad():
        out = modal_conv(u, ops.modal_log_poles(p, gamma), R, D)
    assert out.shape == (B, C, L) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5 * ref.abs().max().item())


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="real widths in bf16: GPU only")
@pytest.mark.parametrize("C,L", [(1920, 8192), (256, 131072)])
def test_fused_modal_conv_bf16_real_width(C, L):
    """bf16 at the 1b width (8,192 tokens) and at 131,072 tokens (the carried state over 64 tiles): within 1e-2 of
    the output's scale of the FFT path, and at most a few percent of values rounded differently."""
    from evo2_recipe.models.hyena.kernels.modal_conv import modal_conv

    u, p, gamma, R, D = _modal_inputs(1, C, C, 16, L, torch.bfloat16, fast=True)
    ref = ops.fft_causal_conv(u, ops.modal_filter(p, gamma, R, L), D).to(torch.bfloat16)
    with torch.no_grad():
        out = modal_conv(u, ops.modal_log_poles(p, gamma), R, D)
    err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
    same = (out == ref).float().mean().item()
    print(f"hcl kernel bf16 C={C} L={L}: max error / scale {err:.2e}, bit-equal {same:.4f}")
    assert err <= 1e-2 and same >= 0.9, (err, same)


def _medium_inputs(L, B, G, P, K, dtype, seed=0):
    """x1, u (B, C, L), an hcm-like decaying filter (G, K) fp32 and the skip D (C,)."""
    g = torch.Generator().manual_seed(seed + L)
    C = G * P
    x1, u = (torch.randn(B, C, L, generator=g).to(DEVICE, dtype) for _ in range(2))
    h = torch.randn(G, K, generator=g) * torch.exp(-torch.arange(K) / 16) / 4
    d = torch.randn(C, generator=g).to(DEVICE, dtype)
    return x1, u, h.to(DEVICE), d


@pytest.mark.parametrize("L,B,G,P,K", [(37, 2, 3, 5, 128), (5, 1, 2, 16, 128), (300, 1, 4, 15, 128),
                                       (1000, 2, 2, 3, 7), (64, 3, 1, 17, 33)])
def test_fused_medium_conv_epilogue_equals_plain(L, B, G, P, K):
    """hcm as blocked Toeplitz GEMMs with the gate fused == the FFT convolution + gate (fp32, 1e-5): lengths shorter
    than the filter (5), odd and over several blocks and programs (37, 300, 1000), 15 and 17 channels per group
    (the 1b's 15; 17 spills into a second column tile), short filters, batch > 1."""
    from evo2_recipe.models.hyena.kernels.medium_conv import medium_conv_epilogue

    x1, u, h, d = _medium_inputs(L, B, G, P, K, torch.float32)
    ref = ops.hyena_epilogue(x1, ops.fft_causal_conv(u, h, d))
    with torch.no_grad():
        out = medium_conv_epilogue(x1, u, h, d)
    assert out.shape == (L, B, G * P) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("L,P", [(200, 16), (70, 15)])
def test_fused_medium_conv_epilogue_low_precision(L, P):
    """Half-precision activations: the fp32 filter split into high + low halves keeps the product at fp32 accuracy,
    so the kernel rounds y and z from (nearly) the same fp32 values as the plain path (fp32 FFT of the same inputs):
    at least 98 % of z bit-equal (the filter in one half-precision part flips ~a third of them), the rest within one
    unit of the low dtype's last place of z's scale."""
    from evo2_recipe.models.hyena.kernels.medium_conv import medium_conv_epilogue

    x1, u, h, d = _medium_inputs(L, 2, 3, P, 128, LOW, seed=1)
    ref = ops.hyena_epilogue(x1, ops.fft_causal_conv(u, h, d))
    with torch.no_grad():
        out = medium_conv_epilogue(x1, u, h, d)
    assert out.dtype == LOW
    err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
    same = (out == ref).float().mean().item()
    assert err <= torch.finfo(LOW).eps and same >= 0.98, (err, same)


def test_fused_medium_conv_epilogue_refuses_autograd():
    from evo2_recipe.models.hyena.kernels.medium_conv import medium_conv_epilogue

    x1, u, h, d = _medium_inputs(20, 1, 1, 16, 128, torch.float32)
    with pytest.raises(RuntimeError, match="inference-only"):
        medium_conv_epilogue(x1, u.requires_grad_(), h, d)


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="real widths in bf16: GPU only")
@pytest.mark.parametrize("G,P", [(128, 15), (256, 16)])  # evo2_1b_base, evo2_7b widths
def test_fused_medium_conv_epilogue_bf16_real_width(G, P):
    """8,192 tokens in bf16 at the 1b and 7b hcm widths: within 1e-2 of z's scale of the plain path."""
    from evo2_recipe.models.hyena.kernels.medium_conv import medium_conv_epilogue

    x1, u, h, d = _medium_inputs(8192, 1, G, P, 128, torch.bfloat16, seed=2)
    ref = ops.hyena_epilogue(x1, ops.fft_causal_conv(u, h, d))
    with torch.no_grad():
        out = medium_conv_epilogue(x1, u, h, d)
    err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
    print(f"hcm kernel bf16 G={G} P={P}: max error / scale {err:.2e}")
    assert err <= 1e-2, err


@pytest.mark.parametrize("bias,low,shape", [(True, LOW, (13, 2, 24)), (False, None, (13, 2, 24)),
                                            (True, torch.float32, (13, 2, 24)), (True, LOW, (37, 3, 40))])
def test_fused_residual_add_equals_plain(bias, low, shape):
    """fp32 residual + low-precision branch (the Evo 2 layout): the sum, its low copy and the gradients, exactly;
    (37, 3, 40) spans several kernel blocks with a ragged last one."""
    from evo2_recipe.models.hyena.kernels.residual import residual_add

    g = torch.Generator().manual_seed(3)
    H = shape[-1]
    res = torch.randn(*shape, generator=g).to(DEVICE).requires_grad_()
    y = torch.randn(*shape, generator=g).to(DEVICE, LOW).requires_grad_()
    b = torch.randn(H, generator=g).to(DEVICE, LOW).requires_grad_() if bias else None
    args = [res, y] + ([b] if bias else [])
    ref = ops.residual_add(res, y, b)
    out = residual_add(res, y, b, low)
    out, out_low = out if low is not None else (out, None)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    loss_ref = (ref * torch.arange(H, device=DEVICE)).sum()
    loss = (out * torch.arange(H, device=DEVICE)).sum()
    if out_low is not None:  # the norm's input: its gradient flows back into the stream too
        assert out_low.dtype == low
        torch.testing.assert_close(out_low, ref.to(low), rtol=0, atol=0)
        loss, loss_ref = loss + out_low.float().pow(2).sum(), loss_ref + ref.to(low).float().pow(2).sum()
    for a, r in zip(torch.autograd.grad(loss, args), torch.autograd.grad(loss_ref, args)):
        torch.testing.assert_close(a, r, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bias,shape", [(True, (13, 2, 24)), (False, (37, 3, 40)),
                                        pytest.param(True, (8192, 1, 1920), marks=_REAL)])
def test_fused_residual_add_rms_norm_equals_plain(bias, shape):
    """The join and the next norm in one pass == the plain join, its cast and torch's norm: the sum exactly, the normed
    bf16 row within one rounding (2^-7 of the scale); 24 and 40 are not powers of two."""
    import torch.nn.functional as F

    from evo2_recipe.models.hyena.kernels.residual import residual_add_rms_norm

    g = torch.Generator().manual_seed(9)
    H = shape[-1]
    res = torch.randn(*shape, generator=g).to(DEVICE)
    y = torch.randn(*shape, generator=g).to(DEVICE, LOW)
    b = torch.randn(H, generator=g).to(DEVICE, LOW) if bias else None
    w = (1 + torch.randn(H, generator=g)).to(DEVICE, LOW)
    out, normed = residual_add_rms_norm(res, y, b, w, 1e-6)
    ref = ops.residual_add(res, y, b)
    ref_normed = F.rms_norm(ref.to(LOW), (H,), w, 1e-6)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert normed.dtype == LOW
    tol = 2 ** -7 * ref_normed.abs().max().item()
    torch.testing.assert_close(normed.float(), ref_normed.float(), rtol=0, atol=tol)
    with pytest.raises(ValueError, match="do not fit"):
        residual_add_rms_norm(res, y, b, w[:-1], 1e-6)


def _eager_decode_step(f, proj_window, proj_taps, window=None, taps=None, modal_state=None, poles=None,
                       residue_poles=None, direct=None):
    """The eager one-token step (HyenaLayerState.fir_step / modal_step on the same buffers) as the kernel's oracle."""
    from evo2_recipe.models.hyena.inference_state import HyenaLayerState, _Storage, modal_step

    B, C3 = f.shape[1], f.shape[2]
    st = _Storage(B, 16)
    st.tensors[(0, "proj")] = proj_window
    if window is not None:
        st.tensors[(0, "op")] = window
    else:
        st.tensors[(0, "modal")] = modal_state
    state = HyenaLayerState(st, 0, slice(None))
    feats = state.fir_step("proj", f.permute(1, 2, 0), proj_taps).to(f.dtype)
    x1, x2, v = feats[:, 0::3], feats[:, 1::3], feats[:, 2::3]
    u = x2 * v
    if window is not None:
        y = state.fir_step("op", u, taps)
    else:
        y = modal_step(state, u, poles, residue_poles) + direct * u.float()
    return (x1 * y.to(v.dtype)).permute(2, 0, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind,C,B", [("fir7", 12, 2), ("fir128", 40, 1), ("modal", 70, 3),
                                      pytest.param("fir7", 1920, 4, marks=_REAL),  # evo2_1b_base width
                                      pytest.param("fir128", 4096, 2, marks=_REAL),  # evo2_7b_base width
                                      pytest.param("modal", 4096, 1, marks=_REAL)])
def test_fused_decode_step_equals_eager_step(kind, C, B, dtype):
    """Three consecutive tokens: outputs and every updated window/state equal the eager step's (fp32 1e-5; bf16:
    the same roundings, so within one bf16 ulp of the output scale)."""
    from evo2_recipe.models.hyena.kernels.hyena_decode import hyena_decode_step

    g = torch.Generator().manual_seed(11)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    proj_window, proj_taps = rnd(B, 3 * C, 2).to(DEVICE, dtype), (rnd(3 * C, 3) / 2).to(DEVICE)
    op = {}
    if kind == "modal":
        poles = torch.rand(C, 16, generator=g).to(DEVICE) * 0.9
        op = dict(modal_state=rnd(B, C, 16).to(DEVICE), poles=poles, residue_poles=(rnd(C, 16) / 4).to(DEVICE) * poles,
                  direct=rnd(C, 1).to(DEVICE))
    else:
        K = 7 if kind == "fir7" else 128
        op = dict(window=rnd(B, C, K - 1).to(DEVICE, dtype), taps=(rnd(C, K) / K ** 0.5).to(DEVICE))
    mine = {k: v.clone() for k, v in op.items()}
    ref_pw, my_pw = proj_window.clone(), proj_window.clone()
    bf16 = dtype == torch.bfloat16
    tol = dict(rtol=1.6e-2, atol=1e-2) if bf16 else dict(rtol=1e-5, atol=1e-5)
    for _ in range(3):
        f = rnd(1, B, 3 * C).to(DEVICE, dtype)
        ref = _eager_decode_step(f, ref_pw, proj_taps, **op)
        out = hyena_decode_step(f, my_pw, proj_taps, **mine)
        assert out.shape == (1, B, C) and out.dtype == dtype
        if bf16:  # five bf16 roundings (x1, x2, v, u, y): an fp32 sum landing on the other side of a rounding boundary
            # moves a value by an ulp, so a few elements differ by a few ulps of the output scale; most are identical
            assert (out == ref).float().mean() >= 0.75
            torch.testing.assert_close(out.float(), ref.float(), rtol=0, atol=2 ** -5 * ref.float().abs().max())
        else:
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(my_pw, ref_pw, rtol=0, atol=0)  # the projection window holds copies: exact
        for name in ("window", "modal_state"):  # hold u = x2*v (fp32: FMA vs separate rounding, ~1 ulp)
            if name in op:
                torch.testing.assert_close(mine[name], op[name], **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b,H,Hkv,N,D", [(2, 4, 4, 1100, 16), (3, 4, 2, 700, 16), (1, 2, 1, 5, 8),
                                         pytest.param(1, 32, 32, 100_352, 128, marks=_REAL),  # 7b at ~100k
                                         pytest.param(32, 15, 15, 4096, 128, marks=_REAL)])  # 1b, batch 32
def test_split_kv_decode_attention_equals_masked_sdpa(b, H, Hkv, N, D, dtype):
    """One query per sequence against a bounded view of a larger cache, each sequence at its own position (0, inside,
    past the view): equals the masked SDPA of ``KVCache.attend`` in fp32 (1e-5 fp32; bf16 within output rounding)."""
    from evo2_recipe.models.hyena.kernels.decode_attention import split_kv_decode_attention

    g = torch.Generator().manual_seed(5)
    q = torch.randn(b, H, 1, D, generator=g).to(DEVICE, dtype)
    k_cache, v_cache = (torch.randn(b, Hkv, N + 37, D, generator=g).to(DEVICE, dtype) for _ in range(2))
    k, v = k_cache[:, :, :N], v_cache[:, :, :N]  # the bounded read: a strided view, as in KVCache.attend
    pos = torch.randint(0, N, (b,), generator=g)
    pos[0] = 0
    pos[-1] = N + 20 if b > 1 else pos[-1]
    pos = pos.to(DEVICE)
    mask = (torch.arange(N, device=DEVICE)[None, None, :] <= pos[:, None, None])[:, None]
    kk, vv = k.repeat_interleave(H // Hkv, 1).float(), v.repeat_interleave(H // Hkv, 1).float()
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), kk, vv, attn_mask=mask)
    got = split_kv_decode_attention(q, k, v, pos)
    assert got.dtype == dtype and got.shape == ref.shape
    tol = 1e-5 if dtype == torch.float32 else 2 ** -8 * ref.abs().max().item()
    torch.testing.assert_close(got.float(), ref, rtol=0, atol=tol)


@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("shape,dtype", [((7, 2, 10), torch.float32), ((5, 2056), LOW), ((3, 1, 6), LOW)])
def test_fused_glu_equals_plain(shape, dtype, gelu):
    """y = act(a) * b of fc1's halves and its one-pass backward against autograd's: the bilinear GLU identical (each
    product rounded once), the GELU one to fp32 ulps (1e-5) or one bf16 rounding (2^-7 of the scale, erf
    implementations differ in the last bit); F = 1028 spans two column blocks, F = 3 and 5 are odd."""
    from evo2_recipe.models.hyena.kernels import glu

    g = torch.Generator().manual_seed(4)
    x = (2 * torch.randn(*shape, generator=g)).to(DEVICE, dtype).requires_grad_()
    gy = torch.randn(*shape[:-1], shape[-1] // 2, generator=g).to(DEVICE, dtype)
    fused, plain = (glu.gelu_glu, ops.gelu_glu) if gelu else (glu.bilinear_glu, ops.bilinear_glu)
    out, ref = fused(x), plain(x)
    assert out.dtype == dtype and out.shape == ref.shape
    (gx,), (gx_ref,) = torch.autograd.grad(out, x, gy), torch.autograd.grad(ref, x, gy)
    for got, want in ((out, ref), (gx, gx_ref)):
        if not gelu:
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        elif dtype == torch.float32:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        else:
            torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=2 ** -7 * want.abs().max().item())
    with pytest.raises(ValueError, match="even last dimension"):
        fused(x[..., :-1])


def _rope_freqs(L, rot_dim, base=10000.0):
    """megatron's RotaryEmbedding frequencies (L, 1, 1, rot_dim): the half-table repeated, fp32."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    return RotaryEmbedding(kv_channels=rot_dim, rotary_percent=1.0, rotary_base=base,
                           use_cpu_initialization=True)(L).to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, LOW])
@pytest.mark.parametrize("L,B,nh,d,rot", [(37, 2, 3, 16, 16), (5, 1, 2, 24, 8), (20, 3, 1, 8, 8),
                                          pytest.param(8192, 1, 15, 128, 128, marks=_REAL)])  # 1b attention
def test_fused_rope_equals_megatron(L, B, nh, d, rot, dtype):
    """Queries/keys as views of a fused QKV tensor (strided), rotated by the kernel against megatron's unfused RoPE:
    forward and gradient; fp32 to 1e-6, bf16 within one rounding of megatron's three (2^-7 of the scale); a head dim
    wider than the rotary dim (pass-through part) and 37 x 2 x 3 rows over several programs."""
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    from evo2_recipe.models.hyena.kernels.rope import apply_rotary_pos_emb

    g = torch.Generator().manual_seed(7)
    qkv = torch.randn(L, B, nh, 3 * d, generator=g).to(DEVICE, dtype).requires_grad_()
    q = qkv[..., d:2 * d]  # strided like megatron's split of linear_qkv's output
    freqs = _rope_freqs(L, rot)
    (out,), ref = apply_rotary_pos_emb(freqs, q), _apply_rotary_pos_emb_bshd(q, freqs)
    assert out.dtype == dtype and out.shape == ref.shape and out.is_contiguous()
    tol = 1e-6 if dtype == torch.float32 else 2 ** -7 * ref.abs().max().item()
    torch.testing.assert_close(out.float(), ref.float(), rtol=0, atol=tol)
    assert torch.equal(out[..., rot:], q[..., rot:])  # the part beyond the rotary dim passes unchanged
    gy = torch.randn(out.shape, generator=g).to(DEVICE, dtype)
    (gq,), (gq_ref,) = torch.autograd.grad(out, qkv, gy), torch.autograd.grad(ref, qkv, gy)
    torch.testing.assert_close(gq.float(), gq_ref.float(), rtol=0, atol=tol * gy.abs().max().item())
    with pytest.raises(ValueError, match="even and at most the head dim"):
        apply_rotary_pos_emb(_rope_freqs(L, 2 * d), q)


@pytest.mark.parametrize("dtype", [torch.float32, LOW])
@pytest.mark.parametrize("shape", [(13, 2, 24), (5, 37), pytest.param((8192, 1, 1920), marks=_REAL)])
def test_fused_rms_norm_equals_cast_then_norm(shape, dtype):
    """The fp32 stream normed into the weights' dtype in one pass == torch's norm after the cast (what the local layers
    ran before): fp32 to 1e-6, bf16 within one rounding (2^-7 of the scale); 37 and 24 are not powers of two."""
    import torch.nn.functional as F

    from evo2_recipe.models.hyena.kernels.rms_norm import rms_norm

    g = torch.Generator().manual_seed(8)
    x = (3 * torch.randn(*shape, generator=g)).to(DEVICE)
    w = (1 + torch.randn(shape[-1], generator=g)).to(DEVICE, dtype)
    out, ref = rms_norm(x, w, 1e-6), F.rms_norm(x.to(dtype), (shape[-1],), w, 1e-6)
    assert out.dtype == dtype and out.shape == ref.shape
    # fp32: the row sums in another order (1e-6 of the scale at the 1b width; 1e-6 absolute failed there on the GPU)
    tol = (1e-6 if dtype == torch.float32 else 2 ** -7) * ref.abs().max().item()
    torch.testing.assert_close(out.float(), ref.float(), rtol=0, atol=tol)
    with pytest.raises(ValueError, match="RMSNorm weight"):
        rms_norm(x, w[:-1], 1e-6)
