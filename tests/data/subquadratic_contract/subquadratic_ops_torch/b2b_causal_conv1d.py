"""``b2b_causal_conv1d`` as its docstring (0.3.1) states it: both convolutions correlate over a causally left-padded
input (``out[c, t] = sum_k w[c, k] x[c, t-(K-1)+k]``); channels interleaved (3c gate, 3c+1 and 3c+2 the pre-gate
product); ``y = x[:, 0::3] * (mixer(z) + skip * z)`` with ``z = proj[:, 1::3] * proj[:, 2::3]``."""

import os

import torch
import torch.nn.functional as F


def _correlate(x, w):
    if os.environ.get("SQ_CONTRACT_BROKEN") == "1":
        w = w.flip(-1)  # a convolution instead: what a wrong mapping of the taps would compute
    return F.conv1d(F.pad(x, (w.shape[-1] - 1, 0)), w.unsqueeze(1), groups=w.shape[0])


def b2b_causal_conv1d(x, weight_proj, weight_mixer, skip_bias):
    proj = _correlate(x, weight_proj)
    z = proj[:, 1::3] * proj[:, 2::3]
    return proj[:, 0::3] * (_correlate(z, weight_mixer) + skip_bias[None, :, None] * z)
