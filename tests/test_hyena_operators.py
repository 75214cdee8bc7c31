"""Hyena operators against independent references: direct convolution, closed-form modal filter, causality."""

import math

import pytest
import torch

from evo2_recipe.models.hyena import operators as ops


@pytest.mark.parametrize("L,K", [(50, 128), (128, 128), (300, 128), (257, 257)])
def test_fft_conv_equals_direct_causal_conv(L, K):
    g = torch.Generator().manual_seed(L)
    u, h = torch.randn(2, 5, L, generator=g, dtype=torch.float64), torch.randn(5, K, generator=g, dtype=torch.float64)
    direct = torch.zeros(2, 5, L, dtype=torch.float64)
    for t in range(L):  # y[t] = sum_{k<=t} h[k] u[t-k], straight from the definition
        for k in range(min(t + 1, K)):
            direct[..., t] += h[:, k] * u[..., t - k]
    torch.testing.assert_close(ops.fft_causal_conv(u, h).double(), direct, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ops.direct_causal_conv(u, h).double(), direct, rtol=1e-5, atol=1e-4)


def test_fft_conv_with_group_filters_and_skip_equals_direct():
    """Filters shared by groups of channels (broadcast in frequency) and the skip term folded into the spectrum ==
    the per-channel direct convolution plus ``skip * u``."""
    g = torch.Generator().manual_seed(2)
    G, per_group, L = 3, 4, 40
    u, h = torch.randn(2, G * per_group, L, generator=g), torch.randn(G, 128, generator=g)
    skip = torch.randn(G * per_group, generator=g)
    expected = ops.direct_causal_conv(u, ops.expand_groups(h, G * per_group)) + u * skip[:, None]
    torch.testing.assert_close(ops.fft_causal_conv(u, h, skip), expected, rtol=1e-5, atol=1e-5)


def test_modal_filter_equals_closed_form_sum():
    g = torch.Generator().manual_seed(0)
    p, gamma, R = torch.randn(3, 16, generator=g), torch.randn(3, 16, generator=g) * 0.3, torch.randn(3, 16, generator=g)
    h = ops.modal_filter(p, gamma, R, 40)
    for gi in range(3):
        for t in (0, 1, 7, 39):
            expected = sum(R[gi, o].item() * math.exp(-math.exp(p[gi, o].item()) * math.exp(gamma[gi, o].item()) * t)
                           for o in range(16))
            assert abs(h[gi, t].item() - expected) < 1e-5 * max(1.0, abs(expected))
    assert (ops.modal_log_poles(p, gamma) < 0).all()


@pytest.mark.parametrize("L", [8, 33, 63])
def test_medium_filter_has_no_leakage_for_short_sequences(L):
    """A 128-tap filter on L < 64 must stay causal (the reference's FFT wraps around here)."""
    g = torch.Generator().manual_seed(1)
    u, h = torch.randn(1, 4, L, generator=g), torch.randn(4, 128, generator=g)
    y = ops.fft_causal_conv(u, h)
    u2 = u.clone()
    u2[..., L // 2:] += 10.0  # change only the future
    y2 = ops.fft_causal_conv(u2, h)
    torch.testing.assert_close(y[..., :L // 2], y2[..., :L // 2], rtol=1e-5, atol=1e-4)  # fp32 FFT noise only
    torch.testing.assert_close(y, ops.direct_causal_conv(u, h), rtol=1e-5, atol=1e-5)


def test_short_conv_last_tap_is_current_token():
    u = torch.zeros(1, 1, 5)
    u[..., 2] = 1.0
    w = torch.tensor([[1.0, 2.0, 3.0]])
    y = ops.causal_depthwise_conv(u, w)
    assert y.flatten().tolist() == [0.0, 0.0, 3.0, 2.0, 1.0]


def test_decay_rates_weak_preset():
    d = ops.decay_rates(5, 128, "weak")
    assert d.shape == (5, 128)
    torch.testing.assert_close(d[:, 0], torch.ones(5))
    torch.testing.assert_close(d[0, -1], torch.tensor(math.exp(-0.01)))
    torch.testing.assert_close(d[-1, -1], torch.tensor(math.exp(-100.0)))
