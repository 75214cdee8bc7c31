"""NVIDIA's ``subquadratic-ops-torch`` as the backend of the Hyena convolutions (``--use-subquadratic-ops``, the
provider's ``use_subquadratic_ops``; an optional package, never required).

As the reference recipe uses it (spec 2.12): hcs and hcm run as cuDNN's back-to-back causal conv (projection conv,
de-interleave, ``x2 * v``, the 7- or 128-tap mixer conv, the skip term and the ``x1`` gate in one kernel), and hcl's
convolution as its FFT causal conv (our fused prologue/epilogue and modal filter around it). Here only layouts and
orientations are mapped; the math is that of ``operators.py``.

Before the first use on a device the package is checked against the plain operators on a small fp32 problem; if it
does not import, cannot serve this GPU (its cuDNN needs >= 9.24) or disagrees, the log says why and evo2-recipe's
own kernels run instead. Under context parallelism our kernels run (the package has no halo input).
"""

from __future__ import annotations

import importlib.util
import logging

import torch

from evo2_recipe.models.hyena import operators as ops

logger = logging.getLogger(__name__)

PACKAGE = "subquadratic_ops_torch"
_served: dict[str, bool] = {}  # device type -> whether the package passed its check there


def serves(x: torch.Tensor) -> bool:
    """Whether the package runs the convolutions for tensors on ``x``'s device (checked once per device type)."""
    device = x.device.type
    if device not in _served:
        reason = _check(x.device)
        _served[device] = reason is None
        if reason is None:
            logger.info("--use-subquadratic-ops: %s %s runs the hcs/hcm blocks and the hcl convolution on %s", PACKAGE,
                        _version(), device)
        else:
            logger.warning("--use-subquadratic-ops: %s %s; evo2-recipe's own kernels run instead", PACKAGE, reason)
    return _served[device]


def short_block(features_LBC3: torch.Tensor, w_proj_C3K: torch.Tensor, w_mixer_CK: torch.Tensor,
                skip_C: torch.Tensor | None) -> torch.Tensor:
    """hcs / hcm from the projection output: ``x1 * (conv(x2 v) + skip * x2 v)`` -> z (L, B, C).

    ``w_mixer_CK`` has the last tap on the current token (our direct-conv convention, the package's correlation);
    ``skip_C`` None means no skip term (ARC hcs). Weights run in the activation dtype, as the package requires.
    """
    from subquadratic_ops_torch.b2b_causal_conv1d import b2b_causal_conv1d

    x = features_LBC3.permute(1, 2, 0).contiguous()  # (B, 3C, L), channels interleaved x1, x2, v as ours
    dtype = x.dtype
    skip = skip_C if skip_C is not None else w_mixer_CK.new_zeros(w_mixer_CK.shape[0])
    z = b2b_causal_conv1d(x, w_proj_C3K.to(dtype), w_mixer_CK.to(dtype), skip.to(dtype))  # (B, C, L)
    return z.permute(2, 0, 1).contiguous()  # sequence-first for the output projection, as our epilogue writes it


def fft_conv(u_BCL: torch.Tensor, h_CK: torch.Tensor, skip_C: torch.Tensor) -> torch.Tensor:
    """:func:`operators.fft_causal_conv` through the package, in fp32 (our filters are fp32); ``h`` per channel with
    ``h[..., 0]`` on the current token -> (B, C, L) fp32."""
    from subquadratic_ops_torch.fft_causal_conv1d import fft_causal_conv1d

    L = u_BCL.shape[-1]
    u = u_BCL.float()
    return fft_causal_conv1d(u, h_CK[..., :L].float().contiguous()) + skip_C.float()[:, None] * u


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("subquadratic-ops-torch-cu13", "subquadratic-ops-torch-cu12", "subquadratic-ops-torch"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return "(version unknown)"


def _check(device: torch.device) -> str | None:
    """None when the package imports, runs on ``device`` and matches the plain operators (fp32, relative L2 1e-4 on
    a 2 x 8-channel x 300-position problem with 7- and 128-tap mixers, skip on and off); else why not."""
    if importlib.util.find_spec(PACKAGE) is None:
        return "is not installed (pip install subquadratic-ops-torch-cu13)"
    g = torch.Generator().manual_seed(0)
    B, C, L = 2, 8, 300

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device)

    features, w_proj, u, skip = rand(L, B, 3 * C), rand(3 * C, 3) / 3, rand(B, C, L), rand(C)
    try:
        for K, s in ((7, None), (128, skip)):
            w = rand(C, K) / K ** 0.5
            x1, x2v = ops.hyena_prologue(features, w_proj)
            y = ops.causal_depthwise_conv(x2v, w) + (0 if s is None else s[:, None] * x2v)
            _assert_close(short_block(features, w_proj, w, s), ops.hyena_epilogue(x1, y), f"b2b_causal_conv1d K={K}")
        h = rand(C, L) * torch.exp(-torch.arange(L, device=device) / 50.0)
        _assert_close(fft_conv(u, h, skip), ops.fft_causal_conv(u, h, skip), "fft_causal_conv1d")
    except Exception as e:  # noqa: BLE001 - any failure means "not served here", said in the log
        return f"cannot serve {device}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")
    return None


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    err = ((actual.float() - expected.float()).norm() / expected.float().norm()).item()
    if not err <= 1e-4:
        raise AssertionError(f"{what} differs from the plain operator (relative L2 {err:.2e})")
