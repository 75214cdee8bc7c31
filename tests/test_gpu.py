"""GPU smoke tests (skipped without CUDA): tiny model forward/backward in bf16 and cached decode on the GPU."""

import pytest
import torch

pytestmark = pytest.mark.gpu


def test_tiny_bf16_forward_backward_and_decode_on_gpu():
    from evo2_recipe.models.hyena.inference_state import HyenaInferenceContext
    from evo2_recipe.models.providers import get_provider
    from evo2_recipe.utils.distributed import init_distributed, teardown

    init_distributed(seed=3)
    try:
        p = get_provider("striped_hyena_tiny", vocab_size=512)
        p.finalize()
        model = p.provide().cuda()
        tokens = torch.randint(65, 90, (2, 256), device="cuda")
        loss = model(tokens, labels=tokens.roll(-1, 1)).float().mean()
        loss.backward()
        assert torch.isfinite(loss)
        model.eval()
        with torch.no_grad():
            full = model(tokens).float()
            ctx = HyenaInferenceContext(2, 256)
            out = [model(tokens[:, :200], inference_context=ctx).float()]
            ctx.advance(200)
            for t in range(200, 256):
                out.append(model(tokens[:, t:t + 1], inference_context=ctx).float())
                ctx.advance(1)
        cached = torch.cat(out, 1)
        assert (cached - full).abs().max() < 0.1  # bf16 weights/activations
    finally:
        teardown()


def _rel_l2(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@torch.no_grad()
def _our_decode(model, tokens, prompt_len):
    from evo2_recipe.models.hyena.inference_state import HyenaInferenceContext

    ctx = HyenaInferenceContext(max_batch_size=tokens.shape[0], max_sequence_length=tokens.shape[1])
    out = [model(tokens[:, :prompt_len], inference_context=ctx).float()]
    ctx.advance(prompt_len)
    for pos in range(prompt_len, tokens.shape[1]):
        out.append(model(tokens[:, pos:pos + 1], inference_context=ctx).float())
        ctx.advance(1)
    return torch.cat(out, dim=1)


@pytest.fixture
def one_gpu_process_group():
    from evo2_recipe.utils.distributed import init_distributed, teardown

    init_distributed(seed=3)
    yield
    teardown()


def vortex_parity_metrics(name, tmp_path, seq_len=2048, decode_tokens=32):
    """Random ``name`` weights: Savanna .pt -> evo2_convert_savanna_to_mbridge -> evo2_export_mbridge_to_vortex,
    then our model (loaded from the MBridge checkpoint) vs Arc's Vortex (``vtx``, loaded from the export) at real
    width: fp32 logits, and bf16 (Vortex's own recipe: poles/residues fp32) for a full forward and cached decode."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from evo2_recipe.checkpoint.savanna import mbridge_to_savanna
    from evo2_recipe.inference import scoring
    from evo2_recipe.inference.api import Evo2
    from evo2_recipe.models.providers import get_provider
    from hyena_helpers import randomise_weights_
    from vortex_reference import vortex_logits_without_te

    bin_dir, device = Path(sys.executable).parent, "cuda" if torch.cuda.is_available() else "cpu"
    p = get_provider(name, vocab_size=512, params_dtype=torch.float32, bf16=False)
    p.finalize()
    model = randomise_weights_(p.provide().to(device))
    state = {k: v.detach().to("cpu", torch.bfloat16) for k, v in model.state_dict().items()
             if not k.endswith("_extra_state")}
    del model
    torch.save({"module": mbridge_to_savanna(state, p.hybrid_override_pattern, p.ffn_hidden_size)},
               tmp_path / "savanna.pt")
    for tool, args in (("evo2_convert_savanna_to_mbridge", ["--savanna-ckpt-path", tmp_path / "savanna.pt",
                                                            "--output-dir", tmp_path / "mb"]),
                       ("evo2_export_mbridge_to_vortex", ["--mbridge-ckpt-dir", tmp_path / "mb",
                                                          "--output-path", tmp_path / f"{name}.pt"])):
        exe = bin_dir / tool if (bin_dir / tool).exists() else shutil.which(tool)
        r = subprocess.run([str(exe), *map(str, args), "--model-size", name], capture_output=True,
                           text=True, timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]

    g = torch.Generator().manual_seed(0)
    tokens = torch.tensor([ord(c) for c in "ACGT"])[torch.randint(0, 4, (2, seq_len), generator=g)].to(device)
    prompt_len = seq_len - 2 * decode_tokens
    dec = tokens[:, :prompt_len + decode_tokens]
    results = {}
    for label, bf16 in (("fp32", False), ("bf16", True)):
        ours = Evo2.from_checkpoint(str(tmp_path / "mb"), mixed_precision_recipe="bf16_mixed" if bf16 else "fp32").model
        with torch.no_grad():
            results["ours", label] = scoring.forward_full(ours, tokens).cpu()
        results["ours_dec", label] = _our_decode(ours, dec, prompt_len).cpu()
        os.environ["EVO2_FUSED_KERNELS"] = "0"  # the eager decode step too, to tell kernel from model differences
        try:
            results["ours_dec_eager", label] = _our_decode(ours, dec, prompt_len).cpu()
        finally:
            del os.environ["EVO2_FUSED_KERNELS"]
        del ours
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    vx = vortex_logits_without_te(tmp_path / f"{name}.yml", tmp_path / f"{name}.pt", tokens, dec, prompt_len, tmp_path)
    for label in ("fp32", "bf16"):
        results["vx", label], results["vx_dec", label] = vx[f"vx_{label}"], vx[f"vx_dec_{label}"]
    o32, v32, o16, v16 = (results[k] for k in (("ours", "fp32"), ("vx", "fp32"), ("ours", "bf16"), ("vx", "bf16")))
    m = {"logit_std": o32.std().item(),
         "fp32_max_abs": (o32 - v32).abs().max().item(), "fp32_rel_l2": _rel_l2(o32, v32),
         "bf16_rel_l2_ours_vs_vortex": _rel_l2(o16, v16),
         "bf16_rel_l2_ours_vs_fp32": _rel_l2(o16, o32), "bf16_rel_l2_vortex_vs_fp32": _rel_l2(v16, v32),
         "bf16_top1_agreement": (o16.argmax(-1) == v16.argmax(-1)).float().mean().item(),
         "fp32_decode_max_abs": (results["ours_dec", "fp32"] - results["vx_dec", "fp32"]).abs().max().item(),
         "fp32_decode_max_abs_eager_step": (results["ours_dec_eager", "fp32"]
                                            - results["vx_dec", "fp32"]).abs().max().item(),
         "fp32_decode_max_abs_fused_vs_eager_step": (results["ours_dec", "fp32"]
                                                     - results["ours_dec_eager", "fp32"]).abs().max().item(),
         "bf16_decode_rel_l2": _rel_l2(results["ours_dec", "bf16"], results["vx_dec", "bf16"])}
    return m


def test_vortex_parity_evo2_1b_real_width(tmp_path, one_gpu_process_group):
    pytest.importorskip("vortex", reason="vtx (Arc's Vortex) is not installed")
    m = vortex_parity_metrics("evo2_1b_base", tmp_path)
    print("VORTEX_PARITY evo2_1b_base", m)
    assert m["logit_std"] > 0.5
    assert m["fp32_rel_l2"] < 1e-4 and m["fp32_decode_max_abs"] < 1e-2
    # bf16: the two implementations differ from each other no more than each differs from fp32 (x2 margin)
    bf16_noise = max(m["bf16_rel_l2_ours_vs_fp32"], m["bf16_rel_l2_vortex_vs_fp32"])
    assert m["bf16_rel_l2_ours_vs_vortex"] < 2 * bf16_noise and m["bf16_decode_rel_l2"] < 2 * bf16_noise
    assert m["bf16_top1_agreement"] > 0.95


def test_cuda_graph_decode_equals_eager(one_gpu_process_group):
    """Greedy tokens of the graph-replayed decode step == the eager step (bf16, continuous batching included)."""
    from evo2_recipe.inference.generation import SamplingParams, generate
    from evo2_recipe.models.providers import get_provider
    from megatron.core.transformer.module import Float16Module

    p = get_provider("striped_hyena_tiny", vocab_size=512)
    p.finalize()
    model = Float16Module(p, p.provide().cuda()).eval()
    g = torch.Generator().manual_seed(1)
    prompts = [[65 + int(x) for x in torch.randint(0, 20, (n,), generator=g)] for n in (40, 7, 129, 64, 3)]
    params = SamplingParams(max_new_tokens=48, top_k=1, stop_at_eod=False)
    eager = generate(model, prompts, params, vocab_size=512, max_batch_size=3, cuda_graph=False)
    graphed = generate(model, prompts, params, vocab_size=512, max_batch_size=3, cuda_graph=True)
    assert [r["tokens"] for r in graphed] == [r["tokens"] for r in eager]
    sampled = SamplingParams(max_new_tokens=32, temperature=0.9, top_k=4, seed=7, stop_at_eod=False)
    a = generate(model, prompts, sampled, vocab_size=512, max_batch_size=5, cuda_graph=True)
    b = generate(model, prompts, sampled, vocab_size=512, max_batch_size=5, cuda_graph=True)
    assert [r["tokens"] for r in a] == [r["tokens"] for r in b]  # seeded sampling is reproducible


@pytest.mark.parametrize("spec,recipe", [("local", None), ("te", None), ("te", "bf16_with_fp8_current_scaling_mixed")])
def test_graphed_scoring_forward_equals_eager(one_gpu_process_group, spec, recipe):
    """``GraphedForward``: a shape's first call runs eagerly, its second is captured; every replay (new tokens, a
    second shape in between) gives the eager forward's logits (rel. L2 <= 1e-3: the same kernels, bf16) and returned
    outputs are not overwritten by later replays."""
    from evo2_recipe.inference.graphed import GraphedForward
    from evo2_recipe.inference.loading import wrap_for_inference
    from evo2_recipe.models.precision import apply_precision_recipe
    from evo2_recipe.models.providers import get_provider

    if spec == "te":
        pytest.importorskip("transformer_engine.pytorch")
    p = get_provider("striped_hyena_tiny", vocab_size=512, use_te=spec == "te")
    if recipe:
        apply_precision_recipe(p, recipe, on_gpu=True)
    p.finalize()
    model = wrap_for_inference(p, p.provide().cuda())
    graphs = GraphedForward(model, max_graphs=1)
    shapes = [(2, 301)] * 3 + [(1, 64)] * 2 + [(2, 301)] * 2
    calls = [torch.randint(65, 90, shape, device="cuda") for shape in shapes]
    with torch.no_grad():
        outs = [graphs(t, torch.arange(t.shape[1], device="cuda").expand(t.shape[0], -1)) for t in calls]
        eager = [model(t, torch.arange(t.shape[1], device="cuda").expand(t.shape[0], -1)) for t in calls]
    assert list(graphs._graphs) == [((2, 301), calls[0].device, ())] and not graphs._failed  # dropped for (1, 64)
    for got, want in zip(outs, eager):
        assert _rel_l2(got, want) <= 1e-3, _rel_l2(got, want)
    assert _rel_l2(outs[1], outs[2]) > 0.1  # different tokens: the replay saw its new input
    pos = torch.arange(301, device="cuda").expand(2, -1)
    with torch.no_grad():  # a layer's output (embeddings) is a shape of its own
        hidden = [graphs(t, pos, hidden_layer=1) for t in calls[:3]]
        hidden_eager = [model(t, pos, hidden_layer=1) for t in calls[:3]]
    assert list(graphs._graphs)[0][2] == (("hidden_layer", 1),)
    for got, want in zip(hidden, hidden_eager):
        assert _rel_l2(got, want) <= 1e-3, _rel_l2(got, want)


@pytest.mark.parametrize("name", ["striped_hyena_tiny", "striped_hyena_tiny_nv"])
def test_fused_decode_step_fp32_equals_full_forward_and_eager_step(name, one_gpu_process_group, monkeypatch):
    """fp32, TF32 off: token-by-token decode through the fused kernel == the full forward (1e-4) and == the eager
    step (``EVO2_FUSED_KERNELS=0``, 1e-5)."""
    from evo2_recipe.models.providers import get_provider

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    p = get_provider(name, vocab_size=512, params_dtype=torch.float32)
    p.finalize()
    model = p.provide().cuda().eval()
    tokens = torch.randint(65, 90, (2, 160), device="cuda")
    with torch.no_grad():
        full = model(tokens).float()
    fused = _our_decode(model, tokens, 20)
    monkeypatch.setenv("EVO2_FUSED_KERNELS", "0")
    eager = _our_decode(model, tokens, 20)
    torch.testing.assert_close(fused, full, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-5)


def test_cuda_graph_training_equals_eager(tmp_path):
    """``train_evo2 --cuda-graph`` (megatron's full-iteration graph, captured at step 4) gives the eager run's
    per-step losses (bf16 tiny model; relative 2e-3 for the kernels' atomics), and the run ends cleanly after an
    evaluation graph is captured once the training graph is gone (Bridge's final evaluation)."""
    import os
    import subprocess

    from train_helpers import losses, train_cmd, val_losses

    args = ["--mock-data", "--model-size", "striped_hyena_tiny", "--seq-length", "512", "--micro-batch-size", "2",
            "--global-batch-size", "2", "--max-steps", "10", "--warmup-steps", "1", "--constant-steps", "0",
            "--eval-interval", "10", "--eval-iters", "2", "--workers", "0", "--log-interval", "1", "--lr", "1e-3",
            "--disable-tensorboard-logger", "--no-activation-checkpointing"]
    logs = {}
    for tag, extra in (("eager", []), ("graph", ["--cuda-graph"])):
        proc = subprocess.run(train_cmd([*args, "--result-dir", str(tmp_path / tag), *extra]), capture_output=True,
                              text=True, timeout=600, env={**os.environ, "WANDB_MODE": "offline"})
        assert proc.returncode == 0, f"{tag}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        logs[tag] = proc.stdout + proc.stderr
    assert "CUDA graph capture done for training" in logs["graph"]
    eager, graph = losses(logs["eager"]), losses(logs["graph"])
    assert sorted(eager) == sorted(graph) == list(range(1, 11))
    for step in eager:
        assert abs(graph[step] - eager[step]) <= 2e-3 * abs(eager[step]), (step, eager[step], graph[step])
    v_eager, v_graph = val_losses(logs["eager"]), val_losses(logs["graph"])
    assert v_eager.keys() == v_graph.keys() and v_graph
    for step in v_eager:
        assert abs(v_graph[step] - v_eager[step]) <= 2e-3 * abs(v_eager[step])
