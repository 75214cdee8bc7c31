"""Module specs: Transformer Engine layers when TE imports, pure-PyTorch local layers otherwise.

Parameter names are identical in both (``layer_norm_weight`` fused norms, ``linear_qkv``/``linear_proj``,
``linear_fc1``/``linear_fc2``, ``dense_projection``/``dense``), so checkpoints move between them. This is the only
module that names Transformer Engine classes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from functools import partial

import torch
from megatron.core.tensor_parallel import RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from evo2_recipe.compat.megatron_fixes import te_spec_by_default, transformer_engine_available
from evo2_recipe.models.hyena.layer import HyenaLayer, HyenaLayerSubmodules
from evo2_recipe.models.hyena.local_layers import RMSNorm, RMSNormColumnParallelLinear, SDPAttention
from evo2_recipe.models.hyena.mixer import HyenaMixer, HyenaMixerSubmodules


@functools.cache
def with_attention_output_bias(row_linear: type) -> type:
    """``row_linear`` built with ``bias=config.add_attn_proj_bias`` instead of megatron's ``add_bias_linear``.

    ARC models carry a bias on the attention output projection only. Asking for it at construction is the one way
    that works for every linear: Transformer Engine fixes whether its forward returns a bias when it is built, so a
    bias attached afterwards is silently dropped. With ``skip_bias_add`` the layer's bias-dropout-add adds it.
    """

    def __init__(self, *args, config, bias=False, **kwargs):
        row_linear.__init__(self, *args, config=config, bias=bool(bias or config.add_attn_proj_bias), **kwargs)

    return type(f"{row_linear.__name__}WithAttnBias", (row_linear,), {"__init__": __init__})


@functools.cache
def with_input_in_params_dtype(norm_linear: type) -> type:
    """``norm_linear`` that casts its input to ``config.params_dtype`` first.

    With ``fp32_residual_connection`` the residual stream is fp32 while the weights are bf16; Transformer Engine
    refuses mixed input/parameter dtypes outside autocast. Casting here keeps the fp32 residual and feeds TE's fused
    norm+linear what its weights are. (The local layers take the stream as it is: their norm casts, in the same
    kernel where the kernels run.)
    """

    def forward(self, x, *args, **kwargs):
        return norm_linear.forward(self, x.to(self.config.params_dtype), *args, **kwargs)

    return type(f"{norm_linear.__name__}InParamsDtype", (norm_linear,), {"forward": forward})


@functools.cache
def with_decode_cache(core_attention: type) -> type:
    """``core_attention`` that, while ``decode_cache`` is set (generation), attends over that KV cache instead.

    The cache applies RoPE at each sequence's own position and reads a fixed-size buffer through a length mask
    (:class:`~evo2_recipe.models.hyena.inference_state.KVCache`); the same code runs under both specs.
    """

    def forward(self, query, key, value, attention_mask, *args, **kwargs):
        cache = getattr(self, "decode_cache", None)
        if cache is None:
            return core_attention.forward(self, query, key, value, attention_mask, *args, **kwargs)
        return cache.attend(query, key, value, getattr(self, "softmax_scale", None))

    return type(f"{core_attention.__name__}WithDecodeCache", (core_attention,), {"forward": forward})


# Inference-mode MLPs see at most this many tokens at once (at 1M tokens the 7b's fc1 output alone is 46 GB).
MLP_INFERENCE_CHUNK_TOKENS = 1 << 16


class SequenceChunkedMLP(MLP):
    """Megatron's MLP, run over chunks of the sequence when no gradient is taken and the sequence is long.

    The MLP acts on each token alone, so the chunks' outputs are the whole sequence's (up to the GEMMs' summation
    order over fewer rows: fp32 ulps); only the (tokens, 2 * ffn) intermediate is bounded. Under sequence parallelism fc1 gathers the sequence itself, so the
    sequence is never split there.
    """

    def forward(self, hidden_states, *args, **kwargs):
        L = hidden_states.shape[0]
        if (torch.is_grad_enabled() or self.config.sequence_parallel or args or kwargs
                or L * hidden_states.shape[1] <= MLP_INFERENCE_CHUNK_TOKENS):
            return super().forward(hidden_states, *args, **kwargs)
        step = max(1, MLP_INFERENCE_CHUNK_TOKENS // hidden_states.shape[1])
        out, bias = None, None
        for a in range(0, L, step):
            y, bias = super().forward(hidden_states[a:a + step])
            if out is None:
                out = y.new_empty((L, *y.shape[1:]))
            out[a:a + step] = y
        return out, bias


@dataclass
class HyenaStackSpec:
    hyena_layer: ModuleSpec
    attention_layer: ModuleSpec
    final_norm: ModuleSpec | type | object


def _layers(norm_linear, row_linear, core_attention) -> tuple[ModuleSpec, ModuleSpec]:
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add

    mlp_submodules = MLPSubmodules(linear_fc1=norm_linear, linear_fc2=row_linear)
    mlp = ModuleSpec(module=SequenceChunkedMLP, submodules=mlp_submodules)
    hyena = ModuleSpec(module=HyenaLayer, submodules=HyenaLayerSubmodules(
        norm=IdentityOp,
        mixer=ModuleSpec(module=HyenaMixer, submodules=HyenaMixerSubmodules(dense_projection=norm_linear,
                                                                            dense=row_linear)),
        pre_mlp_layernorm=IdentityOp, mlp=mlp))
    attention = ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(
        input_layernorm=IdentityOp,
        self_attention=ModuleSpec(module=SelfAttention, params={"attn_mask_type": AttnMaskType.causal},
                                  submodules=SelfAttentionSubmodules(linear_qkv=norm_linear,
                                                                     core_attention=with_decode_cache(
                                                                         core_attention),
                                                                     linear_proj=with_attention_output_bias(
                                                                         row_linear),
                                                                     q_layernorm=IdentityOp, k_layernorm=IdentityOp)),
        self_attn_bda=get_bias_dropout_add, pre_mlp_layernorm=IdentityOp,
        mlp=partial(SequenceChunkedMLP.as_mlp_submodule, submodules=mlp_submodules), mlp_bda=get_bias_dropout_add))
    return hyena, attention


def local_stack_spec() -> HyenaStackSpec:
    hyena, attention = _layers(RMSNormColumnParallelLinear, RowParallelLinear, SDPAttention)
    return HyenaStackSpec(hyena, attention, RMSNorm)


def te_stack_spec() -> HyenaStackSpec:
    from megatron.core.extensions.transformer_engine import (
        TEDotProductAttention,
        TELayerNormColumnParallelLinear,
        TENorm,
        TERowParallelLinear,
    )

    hyena, attention = _layers(with_input_in_params_dtype(TELayerNormColumnParallelLinear), TERowParallelLinear,
                               TEDotProductAttention)
    return HyenaStackSpec(hyena, attention, TENorm)


def get_hyena_stack_spec(use_te: bool | None = None) -> HyenaStackSpec:
    """TE spec when ``use_te`` (default: whenever Transformer Engine imports and a GPU is visible), local spec
    otherwise."""
    if use_te is None:
        use_te = te_spec_by_default()
    if use_te and not transformer_engine_available():
        raise RuntimeError("use_te=True but transformer_engine.pytorch does not import; set use_te=False")
    return te_stack_spec() if use_te else local_stack_spec()
