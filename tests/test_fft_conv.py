"""hcm/hcl's training FFT convolution (``kernels/fft_conv.py``, a hand-derived backward) == autograd through its plain
twin ``operators.fft_causal_conv`` and the direct convolution: fp32 to 1e-5 at small sizes on CPU, 1e-5 of each
tensor's largest entry at the 1b width on the GPU.
"""

import pytest
import torch
from hyena_helpers import DEVICE

from evo2_recipe.models.hyena import operators as ops

_REAL = pytest.mark.skipif(DEVICE != "cuda", reason="real widths: GPU only")


@pytest.mark.parametrize("B,C,G,L,K,skip", [(2, 6, 3, 37, 128, True), (1, 6, 6, 5, 3, False),
                                              (3, 4, 1, 64, 64, True), (2, 6, 2, 1, 7, True)])
def test_fft_conv_backward_equals_autograd_of_plain_operator(B, C, G, L, K, skip):
    """The training FFT conv's hand-derived backward: output and the gradients of ``u``, the per-group filter and the
    skip == autograd through the plain operator (fp32, 1e-5), and the filter gradient == autograd through the direct
    O(L*K) convolution (an independent reference); odd lengths, filters longer than the sequence (their taps past L
    get zero gradient), one row per channel or per group, batch > 1."""
    from evo2_recipe.models.hyena.kernels.fft_conv import fft_causal_conv

    g = torch.Generator().manual_seed(B * 100 + L)
    tensors = [torch.randn(B, C, L, generator=g), torch.randn(G, K, generator=g) / K,
               torch.randn(C, generator=g) if skip else None, torch.randn(B, C, L, generator=g)]
    u, h, d, dy = [None if t is None else t.to(DEVICE) for t in tensors]
    grads = []
    for conv in (fft_causal_conv, ops.fft_causal_conv,
                 lambda u, h, d: ops.direct_causal_conv(u, ops.expand_groups(h, C)) + (0 if d is None else
                                                                                    d[:, None] * u)):
        leaves = [t.clone().requires_grad_() for t in (u, h, d) if t is not None]
        y = conv(*leaves, *([None] if d is None else []))
        y.backward(dy)
        grads.append((y.detach(), *[t.grad for t in leaves]))
    ours, plain, direct = grads
    for a, b in zip(ours, plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[2], direct[2], rtol=1e-5, atol=1e-5)
    if K > L:
        assert not ours[2][:, L:].any()


@_REAL
@pytest.mark.parametrize("G,K", [(128, 8192), (128, 128)])  # evo2_1b_base's hcl and hcm, 15 channels per group
def test_fft_conv_backward_at_real_width(G, K):
    """The training FFT conv at the 1b width, 8,192 tokens: output and gradients == autograd through the plain
    operator to 1e-5 of each tensor's largest entry (fp32; the two take different transform paths)."""
    from evo2_recipe.models.hyena.kernels.fft_conv import fft_causal_conv

    g = torch.Generator(device="cuda").manual_seed(K)
    u, dy = (torch.randn(1, 1920, 8192, device="cuda", generator=g) for _ in range(2))
    h, d = torch.randn(G, K, device="cuda", generator=g) / K, torch.randn(1920, device="cuda", generator=g)
    results = []
    for conv in (fft_causal_conv, ops.fft_causal_conv):
        leaves = [t.clone().requires_grad_() for t in (u, h, d)]
        y = conv(*leaves)
        y.backward(dy)
        results.append((y.detach(), *[t.grad for t in leaves]))
    for a, b in zip(*results):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()
