"""``--use-subquadratic-ops``: the mapping onto NVIDIA's subquadratic-ops-torch (hcs/hcm blocks through
``b2b_causal_conv1d``, hcl's convolution through ``fft_causal_conv1d``) gives the loss and every gradient of our own
kernels, against a stand-in implementing the package's documented contract (``tests/data/subquadratic_contract``: the
real package is CUDA-only and is tested on the GPU when installed); a package that disagrees with the plain operators
is caught by the start check, logged, and our kernels run."""

import logging
from pathlib import Path

import pytest
import torch
from hyena_helpers import DEVICE

from evo2_recipe.utils.spawn import run_on_ranks

pytest.importorskip("triton")
CONTRACT = Path(__file__).parent / "data" / "subquadratic_contract"


def _with_and_without_package(rank, world, name, contract_dir):
    """(loss, grads) without and with ``use_subquadratic_ops`` (fused kernels on in both: hcl's prologue/epilogue),
    whether the package was used, and the package module's log."""
    import sys

    from evo2_recipe.models.hyena.kernels import subquadratic
    from hyena_helpers import loss_and_grads_per_option

    if contract_dir:
        sys.path.insert(0, contract_dir)
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger(subquadratic.__name__).addHandler(handler)
    logging.getLogger(subquadratic.__name__).setLevel(logging.INFO)
    out = loss_and_grads_per_option(name, {sq: {"use_fused_hyena_kernels": True, "use_subquadratic_ops": sq}
                                           for sq in (False, True)}, DEVICE)
    return out, subquadratic._served.get(torch.device(DEVICE).type), messages


def _assert_same(out):
    (loss_ours, grads_ours), (loss_sq, grads_sq) = out[False], out[True]
    torch.testing.assert_close(loss_sq, loss_ours, rtol=1e-5, atol=1e-5)
    for k in grads_ours:
        torch.testing.assert_close(grads_sq[k], grads_ours[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.skipif(DEVICE != "cpu", reason="the contract stand-in replaces the real package on CPU only")
@pytest.mark.parametrize("name", ["striped_hyena_tiny", "striped_hyena_tiny_nv"])  # NV: hcs skip bias
def test_mapping_onto_the_package_contract(name):
    ((out, served, messages),) = run_on_ranks(_with_and_without_package, 1, name, str(CONTRACT), cpu=True)
    assert served is True, messages
    assert any("runs the hcs/hcm blocks" in m for m in messages), messages
    _assert_same(out)


@pytest.mark.skipif(DEVICE != "cpu", reason="the contract stand-in replaces the real package on CPU only")
def test_a_package_that_disagrees_is_not_used(monkeypatch):
    monkeypatch.setenv("SQ_CONTRACT_BROKEN", "1")  # the stand-in convolves where the package correlates
    ((out, served, messages),) = run_on_ranks(_with_and_without_package, 1, "striped_hyena_tiny", str(CONTRACT),
                                             cpu=True)
    assert served is False
    assert any("differs from the plain operator" in m and "own kernels run instead" in m for m in messages), messages
    _assert_same(out)  # our kernels ran


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="the real package is CUDA-only")
def test_real_package_on_gpu_equals_our_kernels():
    """NVIDIA's package, when installed on the GPU machine, passes the start check and gives our kernels' loss and
    gradients (fp32, TF32 off as the GPU runs of tests/test_kernels.py)."""
    pytest.importorskip("subquadratic_ops_torch")
    ((out, served, messages),) = run_on_ranks(_with_and_without_package, 1, "striped_hyena_tiny_nv", "", cpu=False)
    assert served is True, messages
    _assert_same(out)
