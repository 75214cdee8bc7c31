"""hcm/hcl's FFT convolution for training: the forward of ``operators.fft_causal_conv`` with a hand-derived backward.

Autograd differentiates the plain operator transform by transform: ``rfft``'s backward runs a full complex inverse
transform over a zero-filled conjugate-symmetric buffer, and the padding, the slicing and the filter's broadcast
each add a pass (7b step on an H200: ~60 ms of FFT glue in the backward, RESULTS.md). The convolution is linear,
so its backward is two correlations. With ``G = rfft(pad(dy))`` (one transform of size 2L):

* ``du = irfft(G * conj(H))[:L]`` - ``dy`` correlated with the filter (``H`` carries the skip term);
* ``dh = irfft(sum over the batch and the group's channels of G * conj(U))[:K]`` - inverse transforms of the G
  filter rows only;
* ``dskip = sum over the batch and time of dy * u``.

Plain twin: ``operators.fft_causal_conv`` under autograd (and ``operators.direct_causal_conv``).
"""

from __future__ import annotations

import torch

from evo2_recipe.models.hyena import operators as ops


class _FFTCausalConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u_BCL, h_GK, skip_C):
        B, C, L = u_BCL.shape
        spectrum, h_f = ops.fft_conv_spectra(u_BCL, h_GK, skip_C)
        ctx.save_for_backward(u_BCL, spectrum, h_f)
        ctx.h_meta = (h_GK.shape, h_GK.dtype)
        ctx.skip_dtype = None if skip_C is None else skip_C.dtype
        return torch.fft.irfft((spectrum * h_f).view(B, C, L + 1), n=2 * L)[..., :L]

    @staticmethod
    def backward(ctx, dy_BCL):
        u, spectrum, h_f = ctx.saved_tensors
        B, C, L = u.shape
        n = 2 * L
        dy_f = torch.fft.rfft(ops.zero_pad_fp32(dy_BCL, n)).view(spectrum.shape)  # (B, G, C/G, L+1)
        du = dh = dskip = None
        if ctx.needs_input_grad[0]:
            du = torch.fft.irfft((dy_f * h_f.conj()).view(B, C, L + 1), n=n)[..., :L].to(u.dtype)
        if ctx.needs_input_grad[1]:
            h_shape, h_dtype = ctx.h_meta
            K = min(h_shape[-1], L)
            lags = torch.fft.irfft((dy_f * spectrum.conj()).sum(dim=(0, 2)), n=n)  # (G, 2L): sum_t dy[t] u[t-j]
            dh = lags.new_zeros(h_shape, dtype=h_dtype)
            dh[..., :K] = lags[:, :K]  # taps past L never reach an output
        if ctx.needs_input_grad[2]:
            dskip = (dy_BCL * u.float()).sum(dim=(0, 2)).to(ctx.skip_dtype)
        return du, dh, dskip


def fft_causal_conv(u_BCL: torch.Tensor, h_GK: torch.Tensor, skip_C: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`operators.fft_causal_conv` (same arguments, same fp32 output) with the backward above."""
    return _FFTCausalConv.apply(u_BCL, h_GK, skip_C)
