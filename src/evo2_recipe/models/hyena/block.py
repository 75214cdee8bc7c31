"""The layer stack: Hyena (S/D/H) and attention (*) layers from ``hybrid_override_pattern``, plus the final norm.

Pipeline parallelism splits the pattern into equal contiguous stages. Layers keep their global index in checkpoints
(``decoder.layers.{i}``), so a checkpoint loads at any PP size. Full activation recompute wraps chunks of layers in
``tensor_parallel.checkpoint``; selective recompute is megatron's core-attention recompute inside attention layers.
"""

from __future__ import annotations

import copy
import functools

import torch
from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module
from torch import nn

from evo2_recipe.models.hyena import operators as ops
from evo2_recipe.models.hyena import quantization
from evo2_recipe.models.hyena.config import ATTENTION, parse_pattern
from evo2_recipe.models.hyena.kernels import fused_kernels_enabled
from evo2_recipe.models.hyena.layer import HyenaLayer, join_norm
from evo2_recipe.models.hyena.local_layers import RMSNorm
from evo2_recipe.models.hyena.specs import HyenaStackSpec


def _identity(x):
    return x


def _fused_glu(config, gelu: bool, x):
    """``act(a) * b`` of fc1's two halves (megatron's GLU with offset 0; ``act`` the exact GELU or the identity): one
    kernel, whose backward is one pass too, wherever the Hyena kernels run."""
    if fused_kernels_enabled(config, x):
        from evo2_recipe.models.hyena.kernels import glu

        return glu.gelu_glu(x) if gelu else glu.bilinear_glu(x)
    return ops.gelu_glu(x) if gelu else ops.bilinear_glu(x)


def pipeline_layer_range(num_layers: int, pp_group=None) -> range:
    """Global layer indices owned by this pipeline stage (equal contiguous split over ``pp_group``)."""
    rank, pp = (pp_group.rank(), pp_group.size()) if pp_group is not None else (0, 1)
    if num_layers % pp:
        raise ValueError(f"num_layers={num_layers} is not divisible by pipeline parallel size {pp}")
    per_stage = num_layers // pp
    start = rank * per_stage
    return range(start, start + per_stage)


class HyenaStack(MegatronModule):
    def __init__(self, config, spec: HyenaStackSpec, *, pg_collection, pre_process: bool = True,
                 post_process: bool = True):
        super().__init__(config)
        self.pg_collection = pg_collection  # megatron's ProcessGroupCollection (tp, cp, pp), from HyenaModel
        quantization.require_transformer_engine(config)
        self.pre_process, self.post_process = pre_process, post_process
        self.input_tensor = None
        pattern = parse_pattern(config.hybrid_override_pattern, config.num_layers)
        self.global_indices = list(pipeline_layer_range(config.num_layers, pg_collection.pp))
        layers = []
        for i in self.global_indices:
            with quantization.layer_context(config, i, is_init=True):
                if pattern[i] == ATTENTION:
                    layer = build_module(spec.attention_layer, config=config, layer_number=i + 1,
                                         add_layer_offset=False, pg_collection=pg_collection)
                else:
                    layer = build_module(spec.hyena_layer, config=config, layer_number=i + 1,
                                         operator_type=pattern[i], pg_collection=pg_collection)
            if config.remove_activation_post_first_layer:
                self._fuse_mlp_gate(layer, gelu=i == 0)
            layers.append(layer)
        self.layers = nn.ModuleList(layers)
        self.final_norm = (build_module(spec.final_norm, config=config, hidden_size=config.hidden_size,
                                        eps=config.layernorm_epsilon) if post_process else None)

    @staticmethod
    def _fuse_mlp_gate(layer, gelu: bool) -> None:
        """ARC quirk (spec 1.4): only global layer 0's MLP uses GELU (exact erf); later MLPs are bilinear (identity
        gate).

        Megatron's unfused GLU computes ``act(a) * (b + glu_linear_offset)``: two or three passes over the (tokens, 2F)
        intermediate; taking the activation hook (``use_te_activation_func``, the path that calls
        ``activation_func`` on the whole fc1 output) makes it one kernel (:func:`_fused_glu`).
        """
        cfg = layer.mlp.config
        fusable = cfg.glu_linear_offset == 0 and cfg.activation_func_clamp_value is None
        if gelu and not (fusable and cfg.gated_linear_unit and cfg.activation_func is torch.nn.functional.gelu
                         and not cfg.bias_activation_fusion):
            return  # layer 0 keeps megatron's own GLU unless it is the exact-GELU one without offset
        mlp_config = copy.copy(cfg)
        mlp_config.bias_activation_fusion = False
        if fusable:
            mlp_config.use_te_activation_func = True
            mlp_config.activation_func = functools.partial(_fused_glu, layer.config, gelu)
        else:  # megatron's GLU with the identity gate (and the offset)
            mlp_config.activation_func = _identity
        layer.mlp.config = mlp_config
        layer.mlp.activation_func = mlp_config.activation_func

    def set_input_tensor(self, input_tensor: torch.Tensor) -> None:
        self.input_tensor = input_tensor

    def _layer_call(self, layer, hidden_states, attention_mask, rotary_pos_emb, inference_context,
                    last_position_only: bool = False, normed_input=None, next_norm=None):
        """-> (output, the next norm applied to it or None); ``normed_input`` / ``next_norm``: Hyena layers only
        (:meth:`_next_norm`)."""
        with quantization.layer_context(self.config, layer.layer_number - 1):  # FP8/FP4 per layer (not delayed)
            if inference_context is not None and not isinstance(layer, HyenaLayer):
                out = self._attention_decode(layer, hidden_states, inference_context, last_position_only)
            elif isinstance(layer, HyenaLayer):
                return layer(hidden_states, inference_context=inference_context, last_position_only=last_position_only,
                             normed_input=normed_input, next_norm=next_norm)
            else:
                out = self._attention_call(layer, hidden_states, attention_mask, rotary_pos_emb)
        return (out[0] if isinstance(out, tuple) else out), None

    def _next_norm(self, layers, i: int, final: bool) -> tuple[torch.Tensor, float] | None:
        """(weight, eps) of the norm reading layer ``i``'s output, for that Hyena layer's last join to apply (it does
        where the kernels run without autograd): the next Hyena layer's pre-mixer norm, or after the last layer the
        final norm (``final``) - the local spec's norms, whose layers then skip them. Saves a pass over the fp32
        stream per layer in scoring."""
        if not isinstance(layers[i], HyenaLayer):
            return None
        if i + 1 < len(layers):
            nxt = layers[i + 1]
            is_hyena = isinstance(nxt, HyenaLayer) and isinstance(nxt.norm, IdentityOp)
            return join_norm(nxt.mixer.dense_projection) if is_hyena else None
        if final and isinstance(self.final_norm, RMSNorm):
            return self.final_norm.weight, self.final_norm.eps
        return None

    def _attention_call(self, layer, hidden_states, attention_mask, rotary_pos_emb):
        """megatron's attention layer; a core attention that rotates queries and keys itself (the local spec's, with
        the kernels on) takes RoPE over from megatron's unfused seven-pass path. Not when megatron recomputes the
        core attention in the backward (selective recompute): the frequencies are handed over for this call only."""
        cfg, core = self.config, layer.self_attention.core_attention
        if (not isinstance(rotary_pos_emb, torch.Tensor) or not hasattr(core, "fused_rotary_pos_emb")
                or cfg.rotary_interleaved or getattr(layer.self_attention, "checkpoint_core_attention", False)
                or getattr(layer.self_attention, "_yarn_concentration_factor", 1.0) != 1.0
                or not fused_kernels_enabled(cfg, hidden_states)):
            return layer(hidden_states, attention_mask=attention_mask, rotary_pos_emb=rotary_pos_emb)
        core.fused_rotary_pos_emb = rotary_pos_emb
        try:
            return layer(hidden_states, attention_mask=attention_mask, rotary_pos_emb=None)
        finally:
            core.fused_rotary_pos_emb = None

    @staticmethod
    def _attention_decode(layer, hidden_states, inference_context, last_position_only: bool):
        """Megatron's attention layer with its core attention reading our fixed-size KV cache (RoPE applied there);
        ``last_position_only``: every position's key and value cached, the last query attended and the MLP run on
        the last position only."""
        core = layer.self_attention.core_attention
        core.decode_cache = inference_context.kv_cache(layer.layer_number)
        try:
            if not last_position_only:
                return layer(hidden_states, attention_mask=None, rotary_pos_emb=None, inference_context=None)
            # megatron's _forward_attention with the last position's residual (the input norm is fused into
            # linear_qkv in both specs: the residual is the layer input)
            core.decode_cache.last_query_only = True
            out_with_bias = layer.self_attention(hidden_states, attention_mask=None)  # (1, b, H)
            residual = hidden_states[-1:].float() if layer.config.fp32_residual_connection else hidden_states[-1:]
            bda = layer.self_attn_bda(layer.training, layer.config.bias_dropout_fusion)
            return layer._forward_mlp(bda(out_with_bias, residual, layer.hidden_dropout), None)
        finally:
            core.decode_cache = None

    def forward(self, hidden_states, attention_mask=None, rotary_pos_emb=None, inference_context=None,
                num_layers: int | None = None, last_position_only: bool = False):
        """``num_layers`` runs only the first layers and returns their output before the final norm (embeddings).
        ``last_position_only`` (generation, last pipeline stage): the output is the last position's, (1, B, H), and
        the last layer's MLP runs on that position alone (every layer still caches the whole prompt)."""
        if not self.pre_process:
            hidden_states = self.input_tensor
        cfg = self.config
        with quantization.stack_context(cfg):  # FP8 delayed scaling: one context for the whole stack
            if cfg.recompute_granularity == "full" and self.training and inference_context is None:
                hidden_states = self._recompute_forward(hidden_states, attention_mask, rotary_pos_emb)
            else:
                layers, normed = self.layers[:num_layers], None
                for i, layer in enumerate(layers):
                    last = last_position_only and self.post_process and i == len(layers) - 1
                    hidden_states, normed = self._layer_call(
                        layer, hidden_states, attention_mask, rotary_pos_emb, inference_context,
                        last and hidden_states.shape[0] > 1, normed, self._next_norm(layers, i, num_layers is None))
                if normed is not None:  # the last layer's join applied the final norm
                    return normed
        if num_layers is not None:
            return hidden_states
        if self.final_norm is not None:  # fp32 residual -> params dtype (TE's norm refuses mixed dtypes; ours casts)
            if not getattr(self.final_norm, "casts_input", False):
                hidden_states = hidden_states.to(cfg.params_dtype)
            hidden_states = self.final_norm(hidden_states)
        return hidden_states

    def _recompute_forward(self, hidden_states, attention_mask, rotary_pos_emb):
        cfg = self.config
        n = len(self.layers)
        chunk = max(1, cfg.recompute_num_layers or 1)
        if torch.is_grad_enabled() and not hidden_states.requires_grad:
            # Megatron's checkpoint runs its backward only for inputs that require grad: behind a frozen embedding
            # (LoRA, PP=1) the layers' trainable parameters would silently get no gradient.
            hidden_states = hidden_states.detach().requires_grad_(True)

        def run(start, end):
            def fn(h, mask, rope):
                for layer in self.layers[start:end]:
                    h, _ = self._layer_call(layer, h, mask, rope, None)
                return h
            return fn

        if cfg.recompute_method == "block":
            # megatron's meaning: each of the first `chunk` layers is checkpointed on its own, the rest keep their
            # activations (one checkpoint around all of them would rebuild them all at once in the backward)
            groups, kept_from = [(i, i + 1) for i in range(min(chunk, n))], min(chunk, n)
        else:  # "uniform": every layer, `chunk` layers per checkpoint
            groups, kept_from = [(s, min(s + chunk, n)) for s in range(0, n, chunk)], n
        for start, end in groups:
            hidden_states = quantization.recompute_checkpoint(cfg, run(start, end), hidden_states, attention_mask,
                                                              rotary_pos_emb)
        return run(kept_from, n)(hidden_states, attention_mask, rotary_pos_emb)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        sharded = {}
        for local, (layer, global_idx) in enumerate(zip(self.layers, self.global_indices)):
            module_prefix = f"{prefix}layers.{local}."
            layer_sd = layer.sharded_state_dict(prefix=module_prefix, sharded_offsets=sharded_offsets,
                                                metadata=metadata)
            replace_prefix_for_sharding(layer_sd, module_prefix, f"{prefix}layers.{global_idx}.")
            sharded.update(layer_sd)
        if self.final_norm is not None:
            from megatron.core.transformer.utils import sharded_state_dict_default

            sharded.update(sharded_state_dict_default(self.final_norm, f"{prefix}final_norm.", sharded_offsets,
                                                      metadata, self.pg_collection.tp))
        return sharded
