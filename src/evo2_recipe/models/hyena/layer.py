"""One Hyena layer (spec section 2.1): pre-norm mixer branch and pre-norm GLU MLP branch, both residual.

    x = x + mixer(norm(x))          # norm is fused into mixer.dense_projection (``layer_norm_weight``)
    x = x + mlp(norm(x))            # norm is fused into mlp.linear_fc1

The residual stream stays in the dtype it arrives in (fp32 with ``fp32_residual_connection``); each branch runs in
``params_dtype``. Dropout is 0 in every Evo 2 config, so the branches are plain adds (one fused kernel on the GPU,
``kernels/residual.py``). In forwards without autograd (local spec, kernels on) each norm runs inside the join before
it: the MLP's in the mixer branch's join, and the next layer's pre-mixer norm (or the final norm) in the MLP branch's
join, handed over by the stack (``next_norm`` in, ``normed_input`` out to the next layer).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from evo2_recipe.models.hyena import operators as ops
from evo2_recipe.models.hyena.kernels import fused_kernels_enabled
from evo2_recipe.models.hyena.local_layers import RMSNormColumnParallelLinear
from evo2_recipe.models.hyena.mixer import HyenaMixer


def join_norm(norm_linear) -> tuple[torch.Tensor, float] | None:
    """(weight, eps) of ``norm_linear``'s norm when it can run in the residual join before it: the local spec's
    norm+linear with nothing around it (an adapter reads the normed input from it), else None."""
    if isinstance(norm_linear, RMSNormColumnParallelLinear) and not norm_linear.return_layernorm_output:
        return norm_linear.layer_norm_weight, norm_linear.eps
    return None


@contextlib.contextmanager
def _input_normed(norm_linear):
    """``norm_linear`` (if any) skips its own norm inside the block: its input arrives normed."""
    if norm_linear is None:
        yield
        return
    norm_linear.input_is_normed = True
    try:
        yield
    finally:
        norm_linear.input_is_normed = False


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
                last_position_only: bool = False, normed_input: torch.Tensor | None = None,
                next_norm: tuple[torch.Tensor, float] | None = None, **_unused):
        """-> (output stream, ``next_norm`` applied to it or None).

        ``last_position_only``: the mixer sees (and caches) every position, the MLP branch runs on the last one only
        and the output is (1, B, H) - a prefill's last layer, when only the next token's logits are asked for.
        ``normed_input``: this layer's pre-mixer norm of ``hidden_states``, already applied by the previous layer's
        join. ``next_norm``: (weight, eps) of the norm that reads this layer's output, applied in the last join when
        the kernels can (no autograd)."""
        state = inference_context.hyena_state(self.layer_number) if inference_context is not None else None
        if normed_input is None:  # the stream goes in as it is (fp32): the norm fused into dense_projection casts it
            y, bias = self.mixer(self.norm(hidden_states), state)
        else:
            with _input_normed(self.mixer.dense_projection):
                y, bias = self.mixer(normed_input, state)
        fc1 = getattr(self.mlp, "linear_fc1", None)
        mlp_norm = join_norm(fc1)
        if mlp_norm is not None and self._norm_fusable(y, bias):  # the join and the MLP's norm in one kernel
            hidden_states, x = self._join_and_norm(hidden_states, y, bias, mlp_norm)
        else:
            fc1 = None
            hidden_states, x = self._join(hidden_states, y, bias, self.config.params_dtype)
        if last_position_only:
            hidden_states, x = hidden_states[-1:], x[-1:]
        with _input_normed(fc1):
            m, bias = self.mlp(self.pre_mlp_layernorm(x))
        if next_norm is not None and self._norm_fusable(m, bias):
            return self._join_and_norm(hidden_states, m, bias, next_norm)
        return self._join(hidden_states, m, bias), None

    def _norm_fusable(self, y: torch.Tensor, bias: torch.Tensor | None) -> bool:
        """The join of ``y`` may apply the norm after it: no autograd, the kernels on, a bias in the branch dtype."""
        return (not torch.is_grad_enabled() and (bias is None or bias.dtype == y.dtype)
                and fused_kernels_enabled(self.config, y))

    @staticmethod
    def _join_and_norm(residual, y, bias, norm: tuple[torch.Tensor, float]):
        """``(s, rms_norm(s) * weight)`` with ``s = residual + (y + bias)``: one kernel."""
        from evo2_recipe.models.hyena.kernels.residual import residual_add_rms_norm

        return residual_add_rms_norm(residual, y, bias, *norm)

    def _join(self, residual: torch.Tensor, y: torch.Tensor, bias: torch.Tensor | None, low_dtype=None):
        """``residual + (y + bias)`` (and, with ``low_dtype``, the sum cast for the next norm): one fused pass where
        the kernels are on, else the plain ops."""
        if fused_kernels_enabled(self.config, y) and (bias is None or bias.dtype == y.dtype):
            from evo2_recipe.models.hyena.kernels.residual import residual_add

            return residual_add(residual, y, bias, low_dtype)
        out = ops.residual_add(residual, y, bias)
        return out if low_dtype is None else (out, out.to(low_dtype))
