"""Pure-PyTorch layers for the local (no Transformer Engine) spec, with TE's parameter names.

* :class:`RMSNorm` - ``x / sqrt(mean(x^2) + eps) * w`` (TE's formula), works with sequence parallelism; takes the
  fp32 residual stream as it is (cast and norm one kernel in no-grad forwards where the kernels run).
* :class:`RMSNormColumnParallelLinear` - RMSNorm fused in front of a megatron ``ColumnParallelLinear``; its norm weight
  is called ``layer_norm_weight`` exactly like ``TELayerNormColumnParallelLinear``, so checkpoints move between the TE
  and local specs, and the Hyena pre-mixer norm exists in both (the reference's local spec drops it).
* :class:`SDPAttention` - core attention through ``F.scaled_dot_product_attention`` (flash/cuDNN kernels on GPU; the
  megatron local ``DotProductAttention`` materialises the full score matrix and refuses context parallelism). With CP
  it all-gathers K/V over the CP group; each zigzag chunk of queries attends to the keys up to its own end. Where the
  kernels run, the stack hands it the rotary frequencies and it rotates queries and keys in one fused pass each.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from torch import nn
from torch.nn.attention.bias import causal_lower_right

from evo2_recipe.compat.megatron_fixes import accumulate_wgrad
from evo2_recipe.models.hyena import context_parallel as cp_comm
from evo2_recipe.models.hyena.kernels import fused_kernels_enabled
from evo2_recipe.models.hyena.mixer import _param_device


def _mark_sequence_parallel(param: nn.Parameter, config) -> None:
    # Under SP each TP rank sees a different slice of tokens, so the norm-weight grads are partial sums that
    # megatron's finalize_model_grads all-reduces over TP for params tagged like this.
    setattr(param, "sequence_parallel", bool(config.sequence_parallel))


def rms_norm(config, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``rms_norm(x.to(weight.dtype)) * weight`` (TE's formula) of any-dtype ``x`` (the fp32 residual stream): the
    fused cast+norm kernel where the kernels run and no gradient is taken, torch's norm after the cast otherwise."""
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    if not needs_grad and fused_kernels_enabled(config, x):
        from evo2_recipe.models.hyena.kernels.rms_norm import rms_norm as fused_rms_norm

        return fused_rms_norm(x, weight, eps)
    return F.rms_norm(x.to(weight.dtype), (x.shape[-1],), weight, eps)


class RMSNorm(nn.Module):
    casts_input = True  # takes the fp32 residual stream as it is (TE's norm needs it cast first)

    def __init__(self, config, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.config, self.eps = config, eps
        self.weight = nn.Parameter(torch.ones(hidden_size, device=_param_device(config), dtype=config.params_dtype))
        _mark_sequence_parallel(self.weight, config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(self.config, x, self.weight, self.eps)


class RMSNormColumnParallelLinear(tensor_parallel.ColumnParallelLinear):
    """``ColumnParallelLinear(rmsnorm(x))`` with the norm weight named ``layer_norm_weight``."""

    def __init__(self, input_size, output_size, *, config, init_method, gather_output=False, bias=False,
                 skip_bias_add=True, is_expert=False, tp_comm_buffer_name=None, **kwargs):
        kwargs.pop("skip_weight_param_allocation", None)
        super().__init__(input_size, output_size, config=config, init_method=init_method, bias=bias,
                         gather_output=gather_output, skip_bias_add=skip_bias_add, is_expert=is_expert,
                         tp_comm_buffer_name=tp_comm_buffer_name, **kwargs)
        self.eps = config.layernorm_epsilon
        self.layer_norm_weight = nn.Parameter(torch.ones(input_size, device=self.weight.device,
                                                         dtype=config.params_dtype))
        _mark_sequence_parallel(self.layer_norm_weight, config)

    return_layernorm_output = False  # as TE's fused norm+linear: LoRA adapters read the normed input
    # set by HyenaLayer around one call: the norm already ran, fused into the residual join before this linear
    input_is_normed = False

    def forward(self, x: torch.Tensor, weight=None, runtime_gather_output=None):
        if not self.input_is_normed:
            x = rms_norm(self.config, x, self.layer_norm_weight, self.eps)  # x: any dtype (the fp32 residual stream)
        out, bias = super().forward(x, weight=weight, runtime_gather_output=runtime_gather_output)
        return ((out, x), bias) if self.return_layernorm_output else (out, bias)

    def channel_first(self, x_LBH: torch.Tensor) -> torch.Tensor:
        """:meth:`forward`'s output laid out channel-first, (B, out, L), for callers whose next step wants that layout
        (the Hyena prologue): ``W @ x_b^T`` per sequence instead of ``x @ W^T`` and a transpose. The rank's rows of
        the output; no bias, no gather, no sequence parallelism (the callers check). Under tensor parallelism the
        input's gradient is all-reduced over the TP group, as the column-parallel forward's is."""
        x = x_LBH if self.input_is_normed else rms_norm(self.config, x_LBH, self.layer_norm_weight, self.eps)
        x = tensor_parallel.copy_to_tensor_model_parallel_region(x, group=self.tp_group)  # identity forward
        return _ChannelFirstLinear.apply(x, self.weight, self.gradient_accumulation_fusion)


class _ChannelFirstLinear(torch.autograd.Function):
    """``out[b] = W @ x[:, b]^T``: (L, B, in) x (out, in) -> (B, out, L), one GEMM per sequence. Backward:
    ``g_x[:, b] = g[b]^T @ W`` and ``g_W = sum_b g[b] @ x[:, b]`` (the wgrad GEMM reads both operands along time);
    with ``gradient_accumulation_fusion`` the wgrad GEMMs accumulate into the weight's fp32 ``main_grad`` as megatron's
    linears do, and the returned gradient is megatron's placeholder."""

    @staticmethod
    def forward(ctx, x_LBH, weight, gradient_accumulation_fusion):
        ctx.save_for_backward(x_LBH, weight)
        ctx.main_grad = weight.main_grad if gradient_accumulation_fusion and hasattr(weight, "main_grad") else None
        L, B, _ = x_LBH.shape
        out = torch.empty((B, weight.shape[0], L), dtype=x_LBH.dtype, device=x_LBH.device)
        for b in range(B):
            torch.mm(weight, x_LBH[:, b].t(), out=out[b])
        return out

    @staticmethod
    def backward(ctx, g_BOL):
        x, weight = ctx.saved_tensors
        L, B, _ = x.shape
        g_x = g_w = None
        if ctx.needs_input_grad[0]:
            g_x = torch.empty_like(x)
            for b in range(B):
                torch.mm(g_BOL[b].t(), weight, out=g_x[:, b])
        if ctx.needs_input_grad[1]:
            fused = ctx.main_grad is not None
            g_w = ctx.main_grad if fused else torch.zeros_like(weight)
            for b in range(B):
                accumulate_wgrad(g_w, g_BOL[b], x[:, b])
            if fused:
                g_w = _wgrad_placeholder(weight, x.dtype)
        return g_x, g_w, None


def _wgrad_placeholder(weight: nn.Parameter, dtype: torch.dtype) -> torch.Tensor | None:
    """What megatron's linears return as the weight's gradient once it is in ``main_grad``: a tensor, so that DDP's
    hook on the parameter still fires (it skips the add: ``grad_added_to_main_grad``), zeros where the parameter has
    another use whose gradient autograd sums into it (``zero_out_wgrad``: the tied embedding)."""
    if not hasattr(weight, "grad_added_to_main_grad"):
        return None
    weight.grad_added_to_main_grad = True
    make = torch.zeros if getattr(weight, "zero_out_wgrad", False) else torch.empty
    return make(weight.shape, dtype=dtype, device=weight.device)


class SDPAttention(MegatronModule):
    """Drop-in for megatron's core attention: (Lq, B, heads, d) q/k/v -> (Lq, B, heads*d)."""

    # set by HyenaStack around one call (kernels on): RoPE applied here by the fused kernel instead of by megatron
    fused_rotary_pos_emb: torch.Tensor | None = None

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str = "self",
                 attention_dropout: float | None = None, softmax_scale: float | None = None, cp_comm_type=None,
                 pg_collection=None):
        super().__init__(config)
        self.attn_mask_type = attn_mask_type
        self.softmax_scale = softmax_scale
        # megatron's Attention hands its ProcessGroupCollection to the core attention it builds
        self.cp_group = cp_comm.active_group(pg_collection.cp if pg_collection is not None else None)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None:
            raise NotImplementedError("packed sequences are not supported by the local attention; use the TE spec")
        if self.fused_rotary_pos_emb is not None:
            from evo2_recipe.models.hyena.kernels.rope import apply_rotary_pos_emb

            query, key = apply_rotary_pos_emb(self.fused_rotary_pos_emb, query, key)
        Lq, B, nh, d = query.shape
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # (B, heads, L, d)
        if k.shape[1] != nh:  # GQA: repeat key/value groups
            k = k.repeat_interleave(nh // k.shape[1], dim=1)
            v = v.repeat_interleave(nh // v.shape[1], dim=1)
        dropout = self.dropout if self.training else 0.0
        mask_type = attn_mask_type or self.attn_mask_type
        if self.cp_group is not None:
            out = self._cp_attention(q, k, v, dropout)
        elif Lq == k.shape[2] and mask_type == AttnMaskType.causal:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout, scale=self.softmax_scale)
        else:  # queries are the last Lq positions of the Lk keys (a KV cache): causal aligned lower-right
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(Lq, k.shape[2]),
                                                 dropout_p=dropout, scale=self.softmax_scale)
        return out.permute(2, 0, 1, 3).reshape(Lq, B, nh * d)

    def _cp_attention(self, q, k, v, dropout):
        """Zigzag CP: all-gather keys/values into natural order; each local query chunk (global chunk ``j``) attends
        to the first ``j + 1`` key chunks, causal aligned lower-right - flash kernels and ~half the work of masking
        all of them (the two chunks of a rank see 2*CP + 1 key chunks together, the same on every rank)."""
        rank = self.cp_group.rank()
        c = q.shape[2] // 2  # chunk length; this rank holds global chunks a and b
        k_full, v_full = (cp_comm.gathered_shards_to_natural(cp_comm.all_gather_cp(t, self.cp_group), dim=2)
                          for t in (k, v))  # (B, heads, 2*CP*c, d)
        outs = []
        for q_chunk, j in zip(q.chunk(2, dim=2), cp_comm.zigzag_chunk_ids(rank, self.cp_group.size())):
            n = (j + 1) * c
            outs.append(F.scaled_dot_product_attention(q_chunk, k_full[:, :, :n], v_full[:, :, :n],
                                                       attn_mask=causal_lower_right(c, n), dropout_p=dropout,
                                                       scale=self.softmax_scale))
        return torch.cat(outs, dim=2)
