"""Arc's Vortex (``vtx`` 1.1.0 on PyPI, import name ``vortex``) as an independent reference, runnable on CPU.

Test-only. Vortex targets CUDA; three small shims let its pure-PyTorch paths run on CPU without changing its math:

* ``flash_attn_2_cuda``: ``vortex.ops`` imports this compiled module unconditionally. An empty stub lets the import
  succeed; the flash paths are never taken because the config sets ``use_flash_attn: False``.
* rotary: ``vortex.ops.embedding.rotary.apply_rotary`` is a Triton GPU kernel. It is replaced by the same
  non-interleaved ("rotate half") formula in plain torch, with the same signature and in-place semantics.
* ``torch.cuda.device(cpu)`` raises on CPU; Vortex wraps its projections in it, so it becomes a no-op there.

Known loading pitfalls handled by :func:`load_vortex_model`: ``custom_load_state_dict`` permutes ``Wqkv`` from the
per-head file layout to Q/K/V itself, and its ``load_checkpoint`` casts to bf16 - the model is built directly in the
requested dtype instead (and cast before loading: its projection weights are created in bf16 regardless).
"""

from __future__ import annotations

import contextlib
import os
import sys
import types

import torch


def _apply_rotary(x, cos, sin, seqlen_offsets=0, cu_seqlens=None, max_seqlen=None, interleaved=False,
                  inplace=False, conjugate=False):
    """Plain-torch twin of Vortex's Triton ``apply_rotary`` for ``x: (B, L, heads, head_dim)``."""
    if cu_seqlens is not None or interleaved:
        raise NotImplementedError("shim covers the non-interleaved, fixed-length case used by Evo 2")
    L, half = x.shape[1], cos.shape[1]
    if isinstance(seqlen_offsets, torch.Tensor):  # per-sample offsets: (B,) -> (B, L, 1, half)
        pos = seqlen_offsets[:, None] + torch.arange(L, device=x.device)
        c, s = cos[pos][:, :, None], sin[pos][:, :, None]
    else:
        c, s = cos[seqlen_offsets:seqlen_offsets + L][None, :, None], sin[seqlen_offsets:seqlen_offsets + L][None, :, None]
    if conjugate:
        s = -s
    x0, x1 = x[..., :half].float(), x[..., half:2 * half].float()
    rotated = torch.cat([x0 * c.float() - x1 * s.float(), x0 * s.float() + x1 * c.float()], dim=-1).to(x.dtype)
    out = x if inplace else x.clone()
    out[..., :2 * half] = rotated
    return out


def _install_shims() -> None:
    sys.modules.setdefault("flash_attn_2_cuda", types.ModuleType("flash_attn_2_cuda"))
    rotary = types.ModuleType("vortex.ops.embedding.rotary")
    rotary.apply_rotary = _apply_rotary
    sys.modules.setdefault("vortex.ops.embedding.rotary", rotary)
    if not torch.cuda.is_available() and not getattr(torch.cuda.device, "_vortex_cpu_noop", False):
        real = torch.cuda.device

        def device(d):
            dev = torch.device(d) if isinstance(d, str) else d
            if isinstance(dev, torch.device) and dev.type == "cuda":
                return real(dev)
            return contextlib.nullcontext()

        device._vortex_cpu_noop = True
        torch.cuda.device = device


def import_vortex():
    """``vortex.model.model`` with the CPU shims installed (skips the test if ``vtx`` is not installed)."""
    import pytest

    pytest.importorskip("yaml")
    _install_shims()
    try:
        import vortex.model.model as vortex_model  # noqa: F401
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("vortex"):
            pytest.skip("vtx (Arc's Vortex) is not installed; `pip install --no-deps vtx==1.1.0`")
        raise
    return vortex_model


def load_vortex_model(config_path, checkpoint_path, dtype=torch.float32, device=None):
    """Build ``StripedHyena`` from our exported YAML and load our exported ``.pt`` strictly.

    fp32: every weight in fp32. bf16: Arc's recipe - load in fp32, then ``to_bfloat16_except_pr_lc`` (poles and
    residues stay fp32).
    """
    import yaml

    vortex_model = import_vortex()
    from vortex.model.utils import dotdict

    device = device or ("cuda:0" if torch.cuda.is_available() else "cpu")
    cfg = yaml.safe_load(open(config_path))
    for k in ("params_dtype", "hyena_block_dtype", "attn_block_dtype", "mlp_dtype"):
        cfg[k] = torch.float32
    cfg["use_flash_attn"] = False  # no flash-attn here; Vortex's torch attention path
    # Cast before loading: Vortex creates its projection weights in bf16 whatever the config says, and
    # load_state_dict would round fp32 weights into them.
    model = vortex_model.StripedHyena(dotdict(cfg)).to(device=device, dtype=torch.float32)
    state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    model.custom_load_state_dict(state, strict=True)
    model.float()  # its Wqkv permutation assigns the file's tensor (dtype included) to .data
    if dtype == torch.bfloat16:
        model.to_bfloat16_except_pr_lc()
        for block in model.blocks:  # skipped by to_bfloat16_except_pr_lc; Arc's TE projections are bf16 too
            if hasattr(block, "projections"):
                block.projections.to(torch.bfloat16)
    elif dtype != torch.float32:
        raise ValueError(f"unsupported dtype {dtype}")
    return model.eval()


@torch.no_grad()
def vortex_prefill_then_decode(model, tokens: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Logits of a prefill over ``tokens[:, :prompt_len]`` then one token at a time (as ``Generator.generate``)."""
    params = model.initialize_inference_params(max_seqlen=tokens.shape[1])
    params["mha"].max_batch_size = tokens.shape[0]
    logits, params = model(tokens[:, :prompt_len], inference_params_dict=params)
    out = [logits]
    for pos in range(prompt_len, tokens.shape[1]):
        for p in params.values():
            p.seqlen_offset = pos
        logits, params = model(tokens[:, pos:pos + 1], inference_params_dict=params)
        out.append(logits)
    return torch.cat(out, dim=1)


def vortex_logits_without_te(config_path, checkpoint_path, tokens: torch.Tensor, decode_tokens: torch.Tensor,
                              prompt_len: int, work_dir) -> dict[str, torch.Tensor]:
    """Vortex's logits in fp32 and bf16 - ``vx_{fp32,bf16}`` full forward of ``tokens``, ``vx_dec_{fp32,bf16}``
    prefill of ``decode_tokens[:, :prompt_len]`` then one token at a time - computed in a child process that cannot
    import Transformer Engine. Vortex then builds plain torch linears (the path the CPU tests check) instead of TE
    linears whose FP8 metadata Vortex 1.1.0 re-packs in a layout TE 2.20 refuses."""
    import subprocess
    from pathlib import Path

    inputs, out_path = Path(work_dir) / "vortex_inputs.pt", Path(work_dir) / "vortex_logits.pt"
    torch.save({"tokens": tokens.cpu(), "decode_tokens": decode_tokens.cpu()}, inputs)
    code = ("import sys; sys.modules['transformer_engine'] = None; sys.modules['transformer_engine.pytorch'] = None; "
            "import vortex_reference as v; v._child(*sys.argv[1:])")
    here = str(Path(__file__).resolve().parent)  # so the child imports this module
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))}
    r = subprocess.run([sys.executable, "-c", code, str(config_path), str(checkpoint_path), str(inputs),
                        str(prompt_len), str(out_path)], capture_output=True, text=True, timeout=1800, env=env)
    if r.returncode:
        raise RuntimeError(f"Vortex reference process failed:\n{r.stderr[-4000:]}")
    return torch.load(out_path, weights_only=True)


def _child(config_path, checkpoint_path, inputs_path, prompt_len, out_path) -> None:
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    inputs = {k: v.to(device) for k, v in torch.load(inputs_path, weights_only=True).items()}
    out = {}
    for label, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        model = load_vortex_model(config_path, checkpoint_path, dtype=dtype, device=device)
        with torch.no_grad():
            out[f"vx_{label}"] = model(inputs["tokens"])[0].float().cpu()
        out[f"vx_dec_{label}"] = vortex_prefill_then_decode(model, inputs["decode_tokens"], int(prompt_len)).float().cpu()
        del model
    torch.save(out, out_path)
