"""Savanna (Arc's DeepSpeed training format) -> Megatron-Bridge - spec sections 5.1 and 5.2.

Layout: ``sequential.0`` embedding, ``sequential.{i+2}`` layer ``i``, final norm at ``sequential.{N+3}`` (or
``N+2`` for 20b). Key map, per layer ``i`` (``s = i + 2``):

    sequential.0.word_embeddings.weight            -> embedding.word_embeddings.weight
    sequential.{N+3|N+2}.norm.weight               -> decoder.final_norm.weight
    sequential.s.pre_mlp_layernorm.weight          -> decoder.layers.i.mlp.linear_fc1.layer_norm_weight
    sequential.s.mlp.w1.weight + mlp.w2.weight     -> decoder.layers.i.mlp.linear_fc1.weight  (cat, dim 0)
    sequential.s.mlp.w3.weight                     -> decoder.layers.i.mlp.linear_fc2.weight
    S/D/H sequential.s.input_layernorm.weight      -> ...mixer.dense_projection.layer_norm_weight
    S/D/H ...mixer.dense_projection.weight         -> ...mixer.dense_projection.weight          (same layout)
    S/D/H ...mixer.hyena_proj_conv.short_conv_weight -> same
    S/D/H ...mixer.dense.weight / .bias            -> same
    S ...mixer.mixer.short_conv.short_conv_weight  -> same
    D ...mixer.mixer.filter.h / .decay             -> same, first 128 taps
    D/H ...mixer.mixer.conv_bias                   -> same
    H ...mixer.mixer.filter.{gamma,R,p}            -> same
    * sequential.s.input_layernorm.weight          -> ...self_attention.linear_qkv.layer_norm_weight
    * ...mixer.dense_projection.weight             -> ...self_attention.linear_qkv.weight  (per-head q,k,v kept)
    * ...mixer.dense.weight / .bias                -> ...self_attention.linear_proj.weight / .bias

Ignored (by design): ``*._extra_state``, ``filter.t``, ``rotary_emb.inv_freq``, ``post_attention_layernorm``,
``outer_mlp_layernorm``. Any other unmapped key is an error, not a warning.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from evo2_recipe.checkpoint.strict import StrictSource
from evo2_recipe.models.hyena.config import ATTENTION, HYENA_LONG, HYENA_MEDIUM, HYENA_SHORT

IGNORED = re.compile(r"(_extra_state$|\.filter\.t$|rotary_emb\.inv_freq$|post_attention_layernorm\.|"
                     r"outer_mlp_layernorm\.)")
MEDIUM_TAPS = 128


def _cached_repo_file(repo_id: str, revision: str | None) -> Path | None:
    """``<name>.pt`` of a Hugging Face repo id from the local caches (the reference's join cache, then the hub's)."""
    name = repo_id.rsplit("/", 1)[-1] + ".pt"
    joined = Path.home() / ".cache" / "savanna_checkpoints" / repo_id / name
    if joined.is_file():
        return joined
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        return None
    try:
        return Path(hf_hub_download(repo_id, name, revision=revision, local_files_only=True))
    except Exception:  # not cached (or sharded as .partN): the caller reports it
        return None


def load_savanna_state(path: str | Path, revision: str | None = None) -> dict[str, torch.Tensor]:
    """Read a Savanna ``.pt`` (or ``.pt.part0, .part1, ...`` shards joined byte-wise) with ``weights_only=True``.

    A Hugging Face repo id (``org/name``) is resolved from the local caches only: downloads are left to the user.
    """
    path = Path(path)
    if str(path).count("/") == 1 and not path.exists() and not list(path.parent.glob(path.name + ".part*")):
        cached = _cached_repo_file(str(path), revision)
        if cached is None:
            raise FileNotFoundError(
                f"{path} looks like a Hugging Face repo id and is not in the local cache; this tool does not "
                f"download. Fetch it first (e.g. `huggingface-cli download {path} --revision <commit>`; join "
                f".pt.partN shards with `cat`) and pass the local .pt path")
        path = cached
    parts = sorted(path.parent.glob(path.name + ".part*"), key=lambda p: int(p.suffix[5:] or 0)) \
        if not path.exists() else []
    if not path.exists() and not parts:
        raise FileNotFoundError(f"Savanna checkpoint not found: {path} (nor {path.name}.part0, ...)")
    try:
        if parts:
            import io

            data = io.BytesIO(b"".join(p.read_bytes() for p in parts))
            raw = torch.load(data, map_location="cpu", weights_only=True)
        else:
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated/corrupt archives raise assorted errors
        raise ValueError(f"cannot read Savanna checkpoint {path}: {e}") from e
    state = raw.get("module", raw) if isinstance(raw, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{path} is not a Savanna state dict (expected a dict, optionally under 'module')")
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def savanna_to_mbridge(state: dict[str, torch.Tensor], pattern: str) -> dict[str, torch.Tensor]:
    """Map a Savanna state dict to Megatron-Bridge keys; raises on unmapped keys."""
    N = len(pattern)
    norm_idx = N + 3 if f"sequential.{N + 3}.norm.weight" in state else N + 2
    src = StrictSource(state, what="Savanna checkpoint", ignored=IGNORED,
                       hint=f" (pattern {pattern!r}); is --model-size right?")
    take, out = src.take, {}

    out["embedding.word_embeddings.weight"] = take("sequential.0.word_embeddings.weight")
    out["decoder.final_norm.weight"] = take(f"sequential.{norm_idx}.norm.weight")
    for i, kind in enumerate(pattern):
        s, m = f"sequential.{i + 2}.", f"decoder.layers.{i}."
        out[m + "mlp.linear_fc1.layer_norm_weight"] = take(s + "pre_mlp_layernorm.weight")
        out[m + "mlp.linear_fc1.weight"] = torch.cat([take(s + "mlp.w1.weight"), take(s + "mlp.w2.weight")], dim=0)
        out[m + "mlp.linear_fc2.weight"] = take(s + "mlp.w3.weight")
        if kind == ATTENTION:
            a = m + "self_attention."
            out[a + "linear_qkv.layer_norm_weight"] = take(s + "input_layernorm.weight")
            out[a + "linear_qkv.weight"] = take(s + "mixer.dense_projection.weight")
            out[a + "linear_proj.weight"] = take(s + "mixer.dense.weight")
            if s + "mixer.dense.bias" in src:
                out[a + "linear_proj.bias"] = take(s + "mixer.dense.bias")
            continue
        x = m + "mixer."
        out[x + "dense_projection.layer_norm_weight"] = take(s + "input_layernorm.weight")
        for name in ("dense_projection.weight", "hyena_proj_conv.short_conv_weight", "dense.weight", "dense.bias"):
            out[x + name] = take(s + "mixer." + name)
        if kind == HYENA_SHORT:
            out[x + "mixer.short_conv.short_conv_weight"] = take(s + "mixer.mixer.short_conv.short_conv_weight")
            if s + "mixer.mixer.conv_bias" in src:  # NV-style short-conv bias
                out[x + "mixer.conv_bias"] = take(s + "mixer.mixer.conv_bias")
        elif kind == HYENA_MEDIUM:
            out[x + "mixer.filter.h"] = take(s + "mixer.mixer.filter.h")[:, :MEDIUM_TAPS].float()
            out[x + "mixer.filter.decay"] = take(s + "mixer.mixer.filter.decay")[:, :MEDIUM_TAPS].float()
            out[x + "mixer.conv_bias"] = take(s + "mixer.mixer.conv_bias")
        elif kind == HYENA_LONG:
            for name in ("gamma", "R", "p"):
                out[x + f"mixer.filter.{name}"] = take(s + f"mixer.mixer.filter.{name}").float()
            out[x + "mixer.conv_bias"] = take(s + "mixer.mixer.conv_bias")
    src.finish()
    return out


def mbridge_to_savanna(t: dict[str, torch.Tensor], pattern: str, ffn_hidden_size: int) -> dict[str, torch.Tensor]:
    """Inverse map (used to build test fixtures from a model's own weights)."""
    N, F = len(pattern), ffn_hidden_size
    out = {"sequential.0.word_embeddings.weight": t["embedding.word_embeddings.weight"],
           f"sequential.{N + 3}.norm.weight": t["decoder.final_norm.weight"]}
    for i, kind in enumerate(pattern):
        s, m = f"sequential.{i + 2}.", f"decoder.layers.{i}."
        out[s + "pre_mlp_layernorm.weight"] = t[m + "mlp.linear_fc1.layer_norm_weight"]
        fc1 = t[m + "mlp.linear_fc1.weight"]
        out[s + "mlp.w1.weight"], out[s + "mlp.w2.weight"] = fc1[:F].clone(), fc1[F:].clone()
        out[s + "mlp.w3.weight"] = t[m + "mlp.linear_fc2.weight"]
        src = m + ("self_attention." if kind == ATTENTION else "mixer.")
        if kind == ATTENTION:
            out[s + "input_layernorm.weight"] = t[src + "linear_qkv.layer_norm_weight"]
            out[s + "mixer.dense_projection.weight"] = t[src + "linear_qkv.weight"]
            out[s + "mixer.dense.weight"] = t[src + "linear_proj.weight"]
            if src + "linear_proj.bias" in t:
                out[s + "mixer.dense.bias"] = t[src + "linear_proj.bias"]
            continue
        out[s + "input_layernorm.weight"] = t[src + "dense_projection.layer_norm_weight"]
        for k, v in t.items():
            if k.startswith(src) and not k.endswith("layer_norm_weight"):
                out[s + "mixer." + k[len(src):]] = v
    return out
