"""Hyena math as plain functions: causal convolutions and the two long-filter parameterisations.

Shape legend: B batch, C channels (per rank), G filter groups, K taps, L sequence length, O modes (16).
Conventions (spec section 2.7):
* FFT filters ``h`` (hcm, hcl) put the current token at ``h[..., 0]``: ``y[t] = sum_k h[k] u[t-k]``.
* direct depthwise convs (projection conv K=3, hcs K=7) put it at the *last* tap: ``y[t] = sum_k w[k] u[t-K+1+k]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def expand_groups(w: torch.Tensor, channels: int) -> torch.Tensor:
    """Repeat per-group rows to per-channel rows: channel ``c`` uses group ``c // (channels // G)``."""
    groups = w.shape[0]
    if channels % groups:
        raise ValueError(f"{channels} channels are not divisible into {groups} filter groups")
    return w.repeat_interleave(channels // groups, dim=0)


def groups_of_channels(start: int, stop: int, channels: int, groups: int) -> tuple[slice, slice]:
    """For channels ``[start, stop)``: the filter groups they use, and where they sit in those groups' expansion.

    ``expand_groups(w[g], channels)[c]`` == ``expand_groups(w, channels)[start:stop]`` - so a rank that needs only a
    slice of the channels builds only the filters of its groups.
    """
    per_group = channels // groups
    g0, g1 = start // per_group, (stop - 1) // per_group + 1
    return slice(g0, g1), slice(start - g0 * per_group, stop - g0 * per_group)


def causal_depthwise_conv(u_BCL: torch.Tensor, w_CK: torch.Tensor, left_context: torch.Tensor | None = None):
    """Depthwise causal conv with the last tap on the current token (fp32 accumulate, output in u's dtype).

    ``left_context`` (B, C, K-1) replaces the zero left padding (context-parallel halo or decode state).
    """
    K = w_CK.shape[-1]
    if left_context is None:
        u_pad = F.pad(u_BCL, (K - 1, 0))
    else:
        u_pad = torch.cat([left_context.to(u_BCL.dtype), u_BCL], dim=-1)
    y = F.conv1d(u_pad.float(), w_CK.float().unsqueeze(1), groups=w_CK.shape[0])
    return y.to(u_BCL.dtype)


def fft_causal_conv(u_BCL: torch.Tensor, h_GK: torch.Tensor, skip_C: torch.Tensor | None = None) -> torch.Tensor:
    """Causal linear convolution ``y[t] = sum_{k<=t} h[k] u[t-k] + skip * u[t]`` via FFT of size 2L, fp32 (B, C, L).

    ``h`` has one row per channel, or per group of consecutive channels (G rows, G divides C): the filter is
    transformed per group and broadcast in frequency, never expanded to C rows. The skip term folds into the spectrum
    (the transform of ``skip * delta`` is ``skip`` at every frequency), so one complex product does both. The filter
    is truncated to ``min(K, L)`` taps first, so a 128-tap filter on a short sequence never wraps around (the
    reference's training path leaks future tokens for L < 64). The result is a view into the 2L output buffer
    (non-contiguous along channels).
    """
    B, C, L = u_BCL.shape
    spectrum, h_f = fft_conv_spectra(u_BCL, h_GK, skip_C)
    return torch.fft.irfft((spectrum * h_f).view(B, C, L + 1), n=2 * L)[..., :L]


def fft_conv_spectra(u_BCL: torch.Tensor, h_GK: torch.Tensor, skip_C: torch.Tensor | None = None):
    """The two factors of :func:`fft_causal_conv`'s product: ``rfft`` of ``u`` zero-padded to 2L, (B, G, C/G, L+1),
    and of the filter with the skip folded in, (G, C/G or 1, L+1)."""
    B, C, L = u_BCL.shape
    G, n = h_GK.shape[0], 2 * L
    spectrum = torch.fft.rfft(zero_pad_fp32(u_BCL, n)).view(B, G, C // G, L + 1)
    h_f = torch.fft.rfft(h_GK[..., :L].float(), n=n)[:, None]  # (G, 1, L+1)
    if skip_C is not None:
        h_f = h_f + skip_C.float().view(G, C // G, 1)
    return spectrum, h_f


def zero_pad_fp32(x_BCL: torch.Tensor, n: int) -> torch.Tensor:
    """``x`` as fp32, zero-padded on the right to length ``n`` (the cast and the padding in one write each)."""
    B, C, L = x_BCL.shape
    out = x_BCL.new_empty((B, C, n), dtype=torch.float32)
    out[..., :L] = x_BCL
    out[..., L:] = 0
    return out


def direct_causal_conv(u_BCL: torch.Tensor, h_CK: torch.Tensor) -> torch.Tensor:
    """Reference O(L*K) implementation of :func:`fft_causal_conv` (used by tests and short filters)."""
    L = u_BCL.shape[-1]
    h = h_CK[..., :L].float()
    return causal_depthwise_conv(u_BCL.float(), h.flip(-1))


def modal_log_poles(p_GO: torch.Tensor, gamma_GO: torch.Tensor) -> torch.Tensor:
    """``glogp = -exp(p) * exp(gamma)`` (always negative, so every pole ``exp(glogp)`` lies in (0, 1))."""
    return -torch.exp(p_GO.float()) * torch.exp(gamma_GO.float())


def modal_filter(p_GO: torch.Tensor, gamma_GO: torch.Tensor, R_GO: torch.Tensor, L: int) -> torch.Tensor:
    """Implicit modal filter ``h[g, t] = sum_o R[g, o] * exp(glogp[g, o] * t)`` for ``t < L``; fp32 (G, L).

    Summed one mode at a time so no (G, O, L) tensor is built (at 1M tokens that is 16x the filter itself).
    """
    t = torch.arange(L, device=p_GO.device, dtype=torch.float32)
    log_poles = modal_log_poles(p_GO, gamma_GO)  # (G, O)
    R = R_GO.float()
    h = R[:, :1] * torch.exp(log_poles[:, :1] * t)
    for o in range(1, log_poles.shape[1]):
        h = h + R[:, o:o + 1] * torch.exp(log_poles[:, o:o + 1] * t)
    return h


def decay_filter(h_GK: torch.Tensor, decay_GK: torch.Tensor) -> torch.Tensor:
    """Explicit medium filter with its fixed exponential decay: ``h * decay`` in fp32 (G, K)."""
    return h_GK.float() * decay_GK.float()


def decay_rates(num_groups: int, length: int, preset: str = "weak") -> torch.Tensor:
    """``decay[g, k] = exp(-r_g * k / (length-1))`` with ``r = logspace(lo, hi, G)`` ('weak' = 10^-2 .. 10^2)."""
    lo, hi = {"weak": (-2.0, 2.0), "normal": (-1.0, 2.0), "strong": (0.0, 2.0)}[preset]
    r = torch.logspace(lo, hi, num_groups)
    s = torch.linspace(0.0, 1.0, length)
    return torch.exp(-r[:, None] * s[None, :])


def hyena_prologue(features_LBC3: torch.Tensor, w_proj_C3K: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Shared front of hcm/hcl: projection conv, de-interleave, ``u = x2 * v``; (L, B, 3C) -> x1, u (B, C, L)."""
    return hyena_prologue_channel_first(features_LBC3.permute(1, 2, 0), w_proj_C3K)


def hyena_prologue_channel_first(features_BC3L: torch.Tensor, w_proj_C3K: torch.Tensor
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`hyena_prologue` of channel-first features; (B, 3C, L) -> x1, u (B, C, L)."""
    f = causal_depthwise_conv(features_BC3L, w_proj_C3K)  # (B, 3C, L)
    return f[:, 0::3].contiguous(), f[:, 1::3] * f[:, 2::3]


def short_conv(u_BCL: torch.Tensor, w_CK: torch.Tensor, skip_C: torch.Tensor | None = None,
               left_context: torch.Tensor | None = None) -> torch.Tensor:
    """hcs convolution: the 7-tap causal conv of ``u`` plus, for NV models, the skip term ``b u``; (B, C, L)."""
    y = causal_depthwise_conv(u_BCL, w_CK, left_context)
    return y if skip_C is None else y + u_BCL * skip_C.to(u_BCL.dtype)[:, None]


def short_conv_epilogue(x1_BCL: torch.Tensor, u_BCL: torch.Tensor, w_CK: torch.Tensor,
                        skip_C: torch.Tensor | None = None) -> torch.Tensor:
    """hcs after the prologue: :func:`short_conv` gated by ``x1``, back to sequence-first; -> z (L, B, C)."""
    return hyena_epilogue(x1_BCL, short_conv(u_BCL, w_CK, skip_C))


def bilinear_glu(x: torch.Tensor) -> torch.Tensor:
    """The MLP gate of every Evo 2 layer after layer 0 (ARC models, spec 1.4): megatron's GLU with the identity
    activation and no offset, ``a * b`` of fc1's two halves; (..., 2F) -> (..., F)."""
    a, b = x.chunk(2, dim=-1)
    return a * b


def gelu_glu(x: torch.Tensor) -> torch.Tensor:
    """Layer 0's MLP gate (ARC models): megatron's GLU with the exact erf GELU and no offset, ``gelu(a) * b``;
    (..., 2F) -> (..., F)."""
    a, b = x.chunk(2, dim=-1)
    return F.gelu(a) * b


def residual_add(residual: torch.Tensor, y: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """A layer's branch joining the residual stream: ``residual + (y + bias)``, the branch rounded to its own dtype
    first and the sum in the stream's dtype (fp32 with ``fp32_residual_connection``)."""
    return residual + (y if bias is None else y + bias).to(residual.dtype)


def hyena_epilogue(x1_BCL: torch.Tensor, y_BCL: torch.Tensor) -> torch.Tensor:
    """Shared back of hcs/hcm/hcl: gate the convolution output, back to sequence-first; -> z (L, B, C) in x1's
    dtype."""
    return (x1_BCL * y_BCL.to(x1_BCL.dtype)).permute(2, 0, 1)
