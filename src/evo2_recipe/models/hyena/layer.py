"""One Hyena layer (spec section 2.1): pre-norm mixer branch and pre-norm GLU MLP branch, both residual.

    x = x + mixer(norm(x))          # norm is fused into mixer.dense_projection (``layer_norm_weight``)
    x = x + mlp(norm(x))            # norm is fused into mlp.linear_fc1

The residual stream stays in the dtype it arrives in (fp32 with ``fp32_residual_connection``); each branch runs in
``params_dtype``. Dropout is 0 in every Evo 2 config, so the branches are plain adds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from evo2_recipe.models.hyena.mixer import HyenaMixer


@dataclass
class HyenaLayerSubmodules:
    norm: ModuleSpec | type = IdentityOp
    mixer: ModuleSpec | type = IdentityOp
    pre_mlp_layernorm: ModuleSpec | type = IdentityOp
    mlp: ModuleSpec | type = IdentityOp
    extra: dict = field(default_factory=dict)


class HyenaLayer(MegatronModule):
    def __init__(self, config, submodules: HyenaLayerSubmodules, layer_number: int, operator_type: str,
                 pg_collection=None):
        super().__init__(config)
        self.layer_number = layer_number  # 1-based global index, as megatron's TransformerLayer
        self.operator_type = operator_type
        self.norm = build_module(submodules.norm, config=config, hidden_size=config.hidden_size,
                                 eps=config.layernorm_epsilon)
        self.mixer: HyenaMixer = build_module(submodules.mixer, config=config, operator_type=operator_type,
                                              layer_number=layer_number, pg_collection=pg_collection)
        self.pre_mlp_layernorm = build_module(submodules.pre_mlp_layernorm, config=config,
                                              hidden_size=config.hidden_size, eps=config.layernorm_epsilon)
        self.mlp = build_module(submodules.mlp, config=config,
                                tp_group=pg_collection.tp if pg_collection is not None else None)

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, rotary_pos_emb=None, inference_context=None,
                **_unused):
        state = inference_context.hyena_state(self.layer_number) if inference_context is not None else None
        residual = hidden_states
        y, bias = self.mixer(self.norm(hidden_states.to(self.config.params_dtype)), state)
        hidden_states = residual + (y if bias is None else y + bias).to(residual.dtype)
        residual = hidden_states
        m, bias = self.mlp(self.pre_mlp_layernorm(hidden_states.to(self.config.params_dtype)))
        hidden_states = residual + (m if bias is None else m + bias).to(residual.dtype)
        return hidden_states, None
