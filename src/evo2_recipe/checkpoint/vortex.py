"""Megatron-Bridge <-> Vortex (Arc's inference format, a flat ``torch.save`` dict) - spec section 5.6.

Renames are :data:`LAYER_RULES` (Bridge key under ``decoder.layers.{i}.``, Vortex key under ``blocks.{i}.``), read in
both directions. The real transforms are named functions, one per tensor that changes form:

* MLP ``linear_fc1`` [2F, H] <-> ``mlp.l1`` [:F] and ``mlp.l2`` [F:] (as for Savanna);
* the 3-tap projection conv [3H, 3] <-> ``filter.short_filter_weight`` [3H, 1, 3];
* hcs ``short_conv_weight`` -> ``filter.h``, an NV ``conv_bias`` folded into the current-token tap;
* hcm ``h * decay`` -> ``filter.h`` [G, 1, 128] fp32;
* hcl ``-exp(p) exp(gamma)`` -> ``filter.log_poles`` [G, 16, 1] fp32 (and back, :func:`_p_gamma_for_log_poles`);
* attention: ``rotary_emb.inv_freq`` computed from ``rotary_base`` (checked on import); embedding copied as
  ``unembed.weight`` when tied.

The import direction (users ask for it; the reference has none) recovers what Vortex keeps: ``p`` and ``gamma`` are
not separable, so ``p = log(-log_poles)`` with a tiny ``gamma`` chosen so that re-exporting gives bit-identical
``log_poles``; the
medium filter comes back as ``h = h*decay`` with ``decay = 1``; an NV hcs bias comes back as 0 (it is folded into
the filter, which computes the same function).

Unlike the reference, NV models export faithfully except for the MLP GELU (tanh approximation here, exact in Vortex):
the hcs bias ``b`` is a per-group skip term ``y = h * u + b u``, and the filter is per group too, so ``h[..., -1] + b``
is the same filter. ``vortex_config`` writes the Vortex YAML that runs the export (activations, biases, tying).
"""

from __future__ import annotations

import logging
import re

import torch

from evo2_recipe.checkpoint.mbridge import join_fc1, split_fc1
from evo2_recipe.checkpoint.strict import StrictSource
from evo2_recipe.models.hyena.config import ATTENTION, HYENA, HYENA_LONG, HYENA_MEDIUM, HYENA_SHORT

L = "decoder.layers"
log = logging.getLogger(__name__)


def vortex_config(provider, vocab_size: int, *, model_name: str = "evo2") -> dict:
    """The Vortex YAML (``StripedHyena`` config) that runs an exported checkpoint; fields as in Arc's evo2 YAMLs.

    ARC models use Evo 2 style activations (GELU in layer 0 only) and an attention output bias; NV models use GELU
    everywhere and no bias. Flash attention is on as in Arc's configs (set ``use_flash_attn: False`` on CPU).
    """
    hc, pattern = HYENA, provider.hybrid_override_pattern
    idx = {kind: [i for i, k in enumerate(pattern) if k == kind]
           for kind in (HYENA_SHORT, HYENA_MEDIUM, HYENA_LONG, ATTENTION)}
    cfg = {
        "model_name": model_name, "vocab_size": int(vocab_size), "hidden_size": provider.hidden_size,
        "num_filters": provider.hidden_size, "num_layers": provider.num_layers,
        "hcs_layer_idxs": idx[HYENA_SHORT], "hcm_layer_idxs": idx[HYENA_MEDIUM],
        "hcl_layer_idxs": idx[HYENA_LONG], "attn_layer_idxs": idx[ATTENTION],
        "hcs_filter_length": hc.hyena_short_conv_len, "hcm_filter_length": hc.hyena_medium_conv_len,
        "hcl_filter_groups": provider.num_groups_hyena, "hcm_filter_groups": provider.num_groups_hyena_medium,
        "hcs_filter_groups": provider.num_groups_hyena_short, "short_filter_length": hc.short_conv_L,
        "short_filter_bias": False, "state_size": hc.hyena_filter_order,
        "num_attention_heads": provider.num_attention_heads, "proj_groups": 1, "hyena_filter_groups": 1,
        "eps": provider.layernorm_epsilon, "rotary_emb_base": provider.rotary_base,
        "inner_mlp_size": provider.ffn_hidden_size, "inner_size_multiple_of": 16, "make_vocab_size_divisible_by": 8,
        "mlp_activation": "gelu", "evo2_style_activations": bool(provider.remove_activation_post_first_layer),
        "column_split_hyena": False, "column_split": True, "interleave": True, "hyena_flip_x1x2": False,
        "model_parallel_size": 1, "pipe_parallel_size": 1,
        "tie_embeddings": bool(provider.share_embeddings_and_output_weights),
        "mha_out_proj_bias": bool(provider.add_attn_proj_bias), "hyena_out_proj_bias": True, "qkv_proj_bias": False,
        "use_fp8_input_projections": bool(provider.vortex_style_fp8), "final_norm": True,
        "max_seqlen": provider.seq_length, "max_batch_size": 1, "use_flash_attn": True, "use_flash_rmsnorm": False,
        "use_flash_depthwise": False, "use_flashfft": False, "inference_mode": True, "prefill_style": "fft",
        "tokenizer_type": "CharLevelTokenizer", "print_activations": False,
    }
    if provider.seq_len_interpolation_factor:
        cfg["use_interpolated_rotary_pos_emb"] = True
        cfg["rotary_emb_scaling_factor"] = provider.seq_len_interpolation_factor
    return cfg


def unfaithful_export_reasons(provider) -> list[str]:
    """What an export to Vortex cannot carry for this model (empty for ARC-style models)."""
    if not provider.remove_activation_post_first_layer and provider.bias_activation_fusion:
        return ["the MLP GELU is the tanh approximation in this model (megatron's fused GEGLU) but the exact erf GELU "
                "in Vortex; expect small logit differences"]
    return []


# (Bridge key under decoder.layers.{i}., Vortex key under blocks.{i}.) - plain renames, by layer group; "mlp" applies
# to every layer, "hyena" to S/D/H. Keys in OPTIONAL may be absent. Everything else is a named transform below.
LAYER_RULES: dict[str, list[tuple[str, str]]] = {
    "mlp": [("mlp.linear_fc1.layer_norm_weight", "post_norm.scale"), ("mlp.linear_fc2.weight", "mlp.l3.weight")],
    ATTENTION: [("self_attention.linear_qkv.layer_norm_weight", "pre_norm.scale"),
                ("self_attention.linear_qkv.weight", "inner_mha_cls.Wqkv.weight"),  # per-head layout kept
                ("self_attention.linear_proj.weight", "inner_mha_cls.out_proj.weight"),
                ("self_attention.linear_proj.bias", "inner_mha_cls.out_proj.bias")],
    "hyena": [("mixer.dense_projection.layer_norm_weight", "pre_norm.scale"),
              ("mixer.dense_projection.weight", "projections.weight"),  # same interleaved layout
              ("mixer.dense.weight", "out_filter_dense.weight"), ("mixer.dense.bias", "out_filter_dense.bias")],
    HYENA_SHORT: [],
    HYENA_MEDIUM: [("mixer.mixer.conv_bias", "filter.D")],
    HYENA_LONG: [("mixer.mixer.conv_bias", "filter.D")],
}
OPTIONAL = {"self_attention.linear_proj.bias"}


def _renames(kind: str):
    for group in ("mlp", ATTENTION) if kind == ATTENTION else ("mlp", "hyena", kind):
        yield from LAYER_RULES[group]


def export_to_vortex(t: dict[str, torch.Tensor], pattern: str, *, rotary_base: float, num_heads: int,
                     ffn_hidden_size: int) -> dict[str, torch.Tensor]:
    out = {"embedding_layer.weight": t["embedding.word_embeddings.weight"],
           "unembed.weight": t.get("output_layer.weight", t["embedding.word_embeddings.weight"]).clone(),
           "norm.scale": t["decoder.final_norm.weight"]}
    H = t["embedding.word_embeddings.weight"].shape[1]
    F = ffn_hidden_size
    for i, kind in enumerate(pattern):
        m, b = f"{L}.{i}.", f"blocks.{i}."
        for bridge_key, vortex_key in _renames(kind):
            if bridge_key in OPTIONAL and m + bridge_key not in t:
                continue
            out[b + vortex_key] = t[m + bridge_key]
        out[b + "mlp.l1.weight"], out[b + "mlp.l2.weight"] = split_fc1(t[m + "mlp.linear_fc1.weight"], F)
        if kind == ATTENTION:
            out[b + "inner_mha_cls.rotary_emb.inv_freq"] = rotary_inv_freq(rotary_base, H // num_heads)
            continue
        x = m + "mixer."
        conv = t[x + "hyena_proj_conv.short_conv_weight"]
        out[b + "filter.short_filter_weight"] = conv[:, None] if conv.dim() == 2 else conv
        if kind == HYENA_SHORT:
            h = t[x + "mixer.short_conv.short_conv_weight"]
            if x + "mixer.conv_bias" in t:  # NV: y = h*u + b*u, so b folds exactly into the current-token tap
                h = h.float().clone()
                h[:, 0, -1] += t[x + "mixer.conv_bias"].float()
                h = h.to(t[x + "mixer.short_conv.short_conv_weight"].dtype)
            out[b + "filter.h"] = h
        elif kind == HYENA_MEDIUM:
            h, decay = t[x + "mixer.filter.h"].float(), t[x + "mixer.filter.decay"].float()
            k = min(128, h.shape[1])
            out[b + "filter.h"] = (h[:, :k] * decay[:, :k]).unsqueeze(1)
        elif kind == HYENA_LONG:
            p, gamma = t[x + "mixer.filter.p"].float(), t[x + "mixer.filter.gamma"].float()
            out[b + "filter.log_poles"] = (-torch.exp(p) * torch.exp(gamma))[..., None]
            out[b + "filter.residues"] = t[x + "mixer.filter.R"].float()
    return out


def _p_gamma_for_log_poles(log_poles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(p, gamma)`` with ``-exp(p) * exp(gamma) == log_poles`` bit-exactly in fp32 where possible.

    ``p = log(-log_poles)``; ``gamma`` is a tiny correction (``exp(gamma)`` one of the floats next to 1) that absorbs
    the rounding of ``exp(p)``, so re-exporting reproduces the Vortex tensor exactly.
    """
    target = log_poles.float()
    if target.is_meta:  # shape-only use (key/shape checks)
        return torch.empty_like(target), torch.empty_like(target)
    if (target >= 0).any():
        raise ValueError("Vortex log_poles must be negative")
    p0 = torch.log(-target)
    p, gamma = p0.clone(), torch.zeros_like(p0)
    found = -torch.exp(p0) == target
    ks = [0] + [k for j in range(1, 9) for k in (j, -j)]
    gammas = [torch.log(torch.tensor(1.0 + k * (2.0**-23 if k > 0 else 2.0**-24), dtype=torch.float32)) for k in ks]
    up, down = torch.full_like(p0, float("inf")), torch.full_like(p0, -float("inf"))
    candidates_p = [p0, torch.nextafter(p0, up), torch.nextafter(p0, down)]
    for pc in candidates_p:
        e = torch.exp(pc)
        for g in gammas:
            hit = (~found) & (-e * torch.exp(g) == target)
            p, gamma = torch.where(hit, pc, p), torch.where(hit, g, gamma)
            found |= hit
        if found.all():
            break
    return p, gamma


VORTEX_IGNORED = re.compile(r"_extra_state$")  # Transformer Engine FP8 metadata, rebuilt at load


def rotary_inv_freq(rotary_base: float, head_dim: int) -> torch.Tensor:
    """RoPE inverse frequencies as Vortex stores them (``inner_mha_cls.rotary_emb.inv_freq``)."""
    return 1.0 / (rotary_base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def import_from_vortex(state: dict[str, torch.Tensor], pattern: str, *, ffn_hidden_size: int, rotary_base: float,
                       num_heads: int, tied: bool = True, short_conv_bias: bool = False) -> dict[str, torch.Tensor]:
    """Vortex tensors -> Megatron-Bridge tensors. Every Vortex tensor must be mapped (or be TE metadata), and the
    stored RoPE frequencies must be those of ``rotary_base``; anything else is an error naming the keys."""
    v = StrictSource(state, what="Vortex checkpoint", ignored=VORTEX_IGNORED,
                     hint=f" (pattern {pattern!r}); is --model-size right?")
    out = {"embedding.word_embeddings.weight": v.take("embedding_layer.weight"),
           "decoder.final_norm.weight": v.take("norm.scale")}
    unembed = v.take("unembed.weight")  # a copy of the embedding when tied (Vortex ignores it then)
    if not tied:
        out["output_layer.weight"] = unembed
    H = out["embedding.word_embeddings.weight"].shape[1]
    for i, kind in enumerate(pattern):
        m, b = f"{L}.{i}.", f"blocks.{i}."
        for bridge_key, vortex_key in _renames(kind):
            if bridge_key in OPTIONAL and b + vortex_key not in v:
                continue
            out[m + bridge_key] = v.take(b + vortex_key)
        out[m + "mlp.linear_fc1.weight"] = join_fc1(v.take(b + "mlp.l1.weight"), v.take(b + "mlp.l2.weight"))
        if kind == ATTENTION:
            key = b + "inner_mha_cls.rotary_emb.inv_freq"
            if key in v:
                raw, expected = v.take(key), rotary_inv_freq(rotary_base, H // num_heads)
                rtol = max(1e-5, 2 * torch.finfo(raw.dtype).eps)  # files saved in bf16 round it
                if raw.shape != expected.shape or not torch.allclose(raw.float(), expected, rtol=rtol, atol=0):
                    raise ValueError(f"{key} (shape {tuple(raw.shape)}) is not the RoPE frequencies of "
                                     f"rotary_base={rotary_base:g} with {num_heads} heads; is --model-size right?")
            continue
        x = m + "mixer."
        out[x + "hyena_proj_conv.short_conv_weight"] = v.take(b + "filter.short_filter_weight")[:, 0]
        if kind == HYENA_SHORT:
            h = v.take(b + "filter.h")
            out[x + "mixer.short_conv.short_conv_weight"] = h
            if short_conv_bias:  # the exporter folded it into the filter's last tap
                out[x + "mixer.conv_bias"] = torch.zeros_like(h[:, 0, 0])
        elif kind == HYENA_MEDIUM:
            h = v.take(b + "filter.h")[:, 0].float()
            out[x + "mixer.filter.h"] = h
            out[x + "mixer.filter.decay"] = torch.ones_like(h)
        elif kind == HYENA_LONG:
            lp = v.take(b + "filter.log_poles")[..., 0]
            out[x + "mixer.filter.p"], out[x + "mixer.filter.gamma"] = _p_gamma_for_log_poles(lp)
            out[x + "mixer.filter.R"] = v.take(b + "filter.residues").float()
    v.finish()
    return out
