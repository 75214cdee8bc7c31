"""Our model vs Arc's Vortex (``vtx`` from PyPI) on checkpoints exported by ``evo2_export_mbridge_to_vortex``.

The Megatron-Bridge checkpoint is written, exported to ``.pt`` + Vortex YAML by the console script, and loaded into
Vortex's ``StripedHyena`` (fp32, CPU, see ``vortex_reference``). Logits must agree within 1e-4 (max abs) for a full
forward and for a prefill followed by token-by-token decoding, with the plain operators and with the fused kernels
(Triton's interpreter on CPU: the scoring path's kernels, each norm inside the join before it, the decode step).

All weights are randomised away from their initial values (biases non-zero, norm scales != 1, embeddings of unit
scale as in trained models) so every tensor of the export affects the logits. At unit scale the two RMSNorm eps
placements (ours/TE ``1/sqrt(ms+eps)``, Vortex ``1/(rms+eps)``) differ by ~1e-6 relative.
"""

import os

import pytest
import torch

from cli_helpers import run_cli
from evo2_recipe.utils.spawn import run_on_ranks
from hyena_helpers import dna_batch, randomise_weights_, tiny_provider

ATOL = 1e-4


def _randomised_model(name, **overrides):
    from megatron.core import parallel_state, tensor_parallel

    parallel_state.initialize_model_parallel()
    tensor_parallel.model_parallel_cuda_manual_seed(3)
    return randomise_weights_(tiny_provider(name, **overrides).provide().eval())


def _our_logits(rank, world, name, ckpt_dir, prompt_len):
    from evo2_recipe.checkpoint.mbridge import checkpoint_tokenizer_dir, write_model_checkpoint
    from evo2_recipe.training.recipe import converted_checkpoint_config
    from evo2_recipe.models.hyena.inference_state import HyenaInferenceContext

    model = _randomised_model(name)
    tensors = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    tok = checkpoint_tokenizer_dir(tensors)
    cfg = converted_checkpoint_config(name, vocab_size=tensors["embedding.word_embeddings.weight"].shape[0],
                                      tokenizer_dir=tok)
    write_model_checkpoint(tensors, ckpt_dir, model_size=name, run_config=cfg, tokenizer_dir=tok,
                           params_dtype=torch.float32)
    tokens, _ = dna_batch(2, 40, seed=4)
    out = {}
    for fused in ("0", "1"):
        os.environ["EVO2_FUSED_KERNELS"] = fused  # read at each call (this spawned process only)
        with torch.no_grad():
            full = model(tokens)
            ctx = HyenaInferenceContext(max_batch_size=2, max_sequence_length=tokens.shape[1])
            pieces = [model(tokens[:, :prompt_len], inference_context=ctx)]
            ctx.advance(prompt_len)
            for pos in range(prompt_len, tokens.shape[1]):
                pieces.append(model(tokens[:, pos:pos + 1], inference_context=ctx))
                ctx.advance(1)
        out[fused == "1"] = full, torch.cat(pieces, dim=1)
    del os.environ["EVO2_FUSED_KERNELS"]
    return tokens, out


def _vortex_logits(rank, world, pt, yml, tokens, prompt_len, tanh_gelu):
    from functools import partial

    import torch.nn.functional as F

    from vortex_reference import load_vortex_model, vortex_prefill_then_decode

    model = load_vortex_model(yml, pt, dtype=torch.float32)
    if tanh_gelu:  # NV MLPs use megatron's fused tanh-GELU, which a Vortex YAML cannot select
        for block in model.blocks:
            if not isinstance(block.mlp.act, torch.nn.Identity):
                block.mlp.act = partial(F.gelu, approximate="tanh")
    with torch.no_grad():
        full, _ = model(tokens)
    cached = vortex_prefill_then_decode(model, tokens, prompt_len)
    return full, cached


NAMES = ["striped_hyena_tiny", "striped_hyena_tiny_nv"]
PROMPT_LEN = 12  # longer than the 7-tap hcs window; decode crosses the attention KV cache and all filters


def _our_logits_of_each(rank, world, root):
    from megatron.core import parallel_state

    results = []
    for name in NAMES:
        results.append(_our_logits(rank, world, name, f"{root}/{name}/mb", PROMPT_LEN))
        parallel_state.destroy_model_parallel()
    return results


def _vortex_logits_of_each(rank, world, root, tokens):
    return [_vortex_logits(rank, world, f"{root}/{name}/vortex/tiny.pt", f"{root}/{name}/vortex/tiny.yml", t,
                           PROMPT_LEN, name.endswith("_nv")) for name, t in zip(NAMES, tokens)]


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    """Both tiny models: ours (full and cached), the exporter CLI's stderr, Vortex on the exported files (full and
    cached) - two spawns for the module instead of two per model."""
    pytest.importorskip("vortex", reason="vtx (Arc's Vortex) is not installed; pip install --no-deps vtx==1.1.0")
    root = tmp_path_factory.mktemp("parity")
    (ours,) = run_on_ranks(_our_logits_of_each, 1, str(root))
    stderr = {}
    for name in NAMES:
        r = run_cli("evo2_export_mbridge_to_vortex", "--mbridge-ckpt-dir", root / name / "mb",
                    "--output-path", root / name / "vortex" / "tiny.pt", "--model-size", name, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        stderr[name] = r.stderr
    (vortex,) = run_on_ranks(_vortex_logits_of_each, 1, str(root), [tokens for tokens, _ in ours])
    return {name: (o, v, stderr[name]) for name, o, v in zip(NAMES, ours, vortex)}


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_vortex_logits_match_ours(parity, name, fused):
    (tokens, ours), (vx_full, vx_cached), stderr = parity[name]
    ours_full, ours_cached = ours[fused]
    assert ("tanh approximation" in stderr) == name.endswith("_nv")  # the one thing NV exports cannot carry
    assert ours_full.std() > 0.5  # non-degenerate logits: a wrong tensor mapping would show
    assert (ours_full - vx_full).abs().max() < ATOL
    assert (ours_cached - vx_cached).abs().max() < ATOL
    assert (ours_cached - ours_full).abs().max() < ATOL
