"""``fft_causal_conv1d(x (B, D, L), weight (D, K))`` as its docstring (0.3.1) states it: the causal linear
convolution ``y[t] = sum_k weight[k] x[t-k]`` by FFT, in x's dtype."""

import torch


def fft_causal_conv1d(x, weight):
    L = x.shape[-1]
    n = 2 * max(L, weight.shape[-1])
    y = torch.fft.irfft(torch.fft.rfft(x, n=n) * torch.fft.rfft(weight, n=n), n=n)
    return y[..., :L].to(x.dtype)
