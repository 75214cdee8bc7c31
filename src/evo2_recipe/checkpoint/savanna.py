"""Savanna (Arc's DeepSpeed training format) <-> Megatron-Bridge - spec sections 5.1 and 5.2.

Layout: ``sequential.0`` embedding, ``sequential.{i+2}`` layer ``i``, final norm at ``sequential.{N+3}`` (or
``N+2`` for 20b). The key map is :data:`LAYER_RULES` (read in both directions) plus the MLP's ``w1``/``w2`` ->
``linear_fc1`` concatenation; the only value transforms are named in :data:`TRANSFORMS` (hcm filters keep their
first 128 taps, filter parameters are fp32).

Ignored (by design): ``*._extra_state``, ``filter.t``, ``rotary_emb.inv_freq``, ``post_attention_layernorm``,
``outer_mlp_layernorm``. Any other unmapped key is an error, not a warning.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from evo2_recipe.checkpoint.mbridge import join_fc1, split_fc1
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


# Per-layer rules: (Savanna key under ``sequential.{i+2}.``, Megatron-Bridge key under ``decoder.layers.{i}.``,
# transform Savanna -> Bridge). "mlp" applies to every layer, "hyena" to S/D/H layers. Keys in OPTIONAL may be absent.
LAYER_RULES: dict[str, list[tuple[str, str, str]]] = {
    "mlp": [("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight", ""),
            ("mlp.w3.weight", "mlp.linear_fc2.weight", "")],
    ATTENTION: [("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight", ""),
                ("mixer.dense_projection.weight", "self_attention.linear_qkv.weight", ""),  # per-head q,k,v kept
                ("mixer.dense.weight", "self_attention.linear_proj.weight", ""),
                ("mixer.dense.bias", "self_attention.linear_proj.bias", "")],
    "hyena": [("input_layernorm.weight", "mixer.dense_projection.layer_norm_weight", ""),
              ("mixer.dense_projection.weight", "mixer.dense_projection.weight", ""),
              ("mixer.hyena_proj_conv.short_conv_weight", "mixer.hyena_proj_conv.short_conv_weight", ""),
              ("mixer.dense.weight", "mixer.dense.weight", ""),
              ("mixer.dense.bias", "mixer.dense.bias", "")],
    HYENA_SHORT: [("mixer.mixer.short_conv.short_conv_weight", "mixer.mixer.short_conv.short_conv_weight", ""),
                  ("mixer.mixer.conv_bias", "mixer.mixer.conv_bias", "")],  # NV-style short-conv bias
    HYENA_MEDIUM: [("mixer.mixer.filter.h", "mixer.mixer.filter.h", "medium_taps"),
                   ("mixer.mixer.filter.decay", "mixer.mixer.filter.decay", "medium_taps"),
                   ("mixer.mixer.conv_bias", "mixer.mixer.conv_bias", "")],
    HYENA_LONG: [(f"mixer.mixer.filter.{n}", f"mixer.mixer.filter.{n}", "fp32") for n in ("gamma", "R", "p")]
                + [("mixer.mixer.conv_bias", "mixer.mixer.conv_bias", "")],
}
OPTIONAL = {(ATTENTION, "mixer.dense.bias"), (HYENA_SHORT, "mixer.mixer.conv_bias")}
FC1_PARTS, FC1 = ("mlp.w1.weight", "mlp.w2.weight"), "mlp.linear_fc1.weight"  # cat on dim 0 <-> split at ffn size
TRANSFORMS = {  # Savanna -> Bridge; the way back is the identity (Bridge values are valid Savanna values)
    "": lambda v: v,
    "medium_taps": lambda v: v[:, :MEDIUM_TAPS].float(),
    "fp32": lambda v: v.float(),
}


def _layer_rules(kind: str):
    groups = ("mlp", ATTENTION) if kind == ATTENTION else ("mlp", "hyena", kind)
    for group in groups:
        for savanna_key, bridge_key, transform in LAYER_RULES[group]:
            yield savanna_key, bridge_key, transform, (group, savanna_key) in OPTIONAL


def savanna_to_mbridge(state: dict[str, torch.Tensor], pattern: str) -> dict[str, torch.Tensor]:
    """Map a Savanna state dict to Megatron-Bridge keys; raises on unmapped keys."""
    N = len(pattern)
    norm_idx = N + 3 if f"sequential.{N + 3}.norm.weight" in state else N + 2
    src = StrictSource(state, what="Savanna checkpoint", ignored=IGNORED,
                       hint=f" (pattern {pattern!r}); is --model-size right?")
    out = {"embedding.word_embeddings.weight": src.take("sequential.0.word_embeddings.weight"),
           "decoder.final_norm.weight": src.take(f"sequential.{norm_idx}.norm.weight")}
    for i, kind in enumerate(pattern):
        s, m = f"sequential.{i + 2}.", f"decoder.layers.{i}."
        out[m + FC1] = join_fc1(*(src.take(s + part) for part in FC1_PARTS))
        for savanna_key, bridge_key, transform, optional in _layer_rules(kind):
            if optional and s + savanna_key not in src:
                continue
            out[m + bridge_key] = TRANSFORMS[transform](src.take(s + savanna_key))
    src.finish()
    return out


def mbridge_to_savanna(t: dict[str, torch.Tensor], pattern: str, ffn_hidden_size: int) -> dict[str, torch.Tensor]:
    """The same rules read backwards (used to build Savanna files from a model's own weights)."""
    N = len(pattern)
    out = {"sequential.0.word_embeddings.weight": t["embedding.word_embeddings.weight"],
           f"sequential.{N + 3}.norm.weight": t["decoder.final_norm.weight"]}
    for i, kind in enumerate(pattern):
        s, m = f"sequential.{i + 2}.", f"decoder.layers.{i}."
        out[s + FC1_PARTS[0]], out[s + FC1_PARTS[1]] = split_fc1(t[m + FC1], ffn_hidden_size)
        for savanna_key, bridge_key, _, optional in _layer_rules(kind):
            if optional and m + bridge_key not in t:
                continue
            out[s + savanna_key] = t[m + bridge_key]
    return out
