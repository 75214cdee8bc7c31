"""Hyena mixer (spec section 2.2): ``dense(x1 * (h * (x2 v) + D x2 v))`` with x1, x2, v from a 3H projection.

Per tensor-parallel rank (``Hp = H/TP`` channels, ``Gp = G/TP`` filter groups):

    features = dense_projection(x)                      # RMSNorm + column-parallel H -> 3H   (L, B, 3Hp)
    features = proj_conv(features)                      # depthwise causal conv, 3 taps      (B, 3Hp, L)
    x1, x2, v = features[:, 0::3], [:, 1::3], [:, 2::3] # channel-interleaved triplets       (B, Hp, L) each
    z = operator(x1, x2, v)                             # hcs / hcm / hcl below              (B, Hp, L)
    y, bias = dense(z)                                  # row-parallel H -> H                (L, B, H)

Operators (``u = x2 * v``):
    hcs: z = x1 * (conv7(u) [+ b * u for NV])        short explicit filter, grouped, direct conv
    hcm: z = x1 * (conv(h * decay, u) + D * u)       128-tap explicit filter with fixed decay, FFT conv
    hcl: z = x1 * (conv(h_modal, u) + D * u)         implicit modal filter, h[t] = sum_o R exp(glogp t), FFT conv

Every Hyena parameter is sharded along dim 0 over TP (rows = channels or filter groups). Context parallelism and the
recurrent decode state are handled by :mod:`.context_parallel` and :mod:`.inference_state`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint
from torch import nn

from evo2_recipe.models.hyena import context_parallel as cp_comm
from evo2_recipe.models.hyena import operators as ops
from evo2_recipe.models.hyena import quantization
from evo2_recipe.models.hyena.config import HYENA, HYENA_LONG, HYENA_MEDIUM, HYENA_SHORT, HyenaConfig
from evo2_recipe.models.hyena.kernels import fft_conv, fused_kernels_enabled, subquadratic
from evo2_recipe.models.hyena.inference_state import HyenaLayerState, modal_chunk_update, modal_step


# Inference-mode long convolutions process channels in chunks of about this many (channel x position) elements. A
# chunk's FFT buffers (padded input, spectra, product, output, cuFFT's copy) take ~56 bytes per element: 3.5 GiB, the
# largest transient of the evo2_7b forward at 131k tokens (memory trace, H200); 8,192-token forwards are one chunk.
INFERENCE_CHUNK_ELEMENTS = 1 << 26


def _rank_world(group) -> tuple[int, int]:
    """(rank, size) in a process group; no group (model parallelism not initialised) is a group of one."""
    return (group.rank(), group.size()) if group is not None else (0, 1)


def causal_conv_with_context(x_BCL: torch.Tensor, conv, halo: int, state: HyenaLayerState | None,
                             name: str, cp_group=None) -> torch.Tensor:
    """``conv(x, left_context)`` with the left context each mode needs: the decode state's window ``name``, the
    previous context-parallel chunk's last ``halo`` values (per zigzag half; ``cp_group`` of size > 1), or none (zero
    padding)."""
    if state is not None:
        return conv(x_BCL, state.take_window(name, x_BCL, halo))
    group = cp_comm.active_group(cp_group)
    if group is None:
        return conv(x_BCL, None)
    left_a, left_b = cp_comm.halo_left_context(x_BCL, halo, group)
    x_a, x_b = x_BCL.chunk(2, dim=-1)
    return torch.cat([conv(x_a, left_a), conv(x_b, left_b)], dim=-1)


def _sharded_param(full: torch.Tensor, config, tp_group, *, fp32: bool = False) -> nn.Parameter:
    """This TP rank's dim-0 slice of a full, rank-independently initialised tensor, as a TP-sharded parameter."""
    rank, world = _rank_world(tp_group)
    if full.shape[0] % world:
        raise ValueError(f"{full.shape[0]} rows cannot be split over tensor parallel size {world}")
    rows = full.shape[0] // world
    dtype = torch.float32 if fp32 else config.params_dtype
    param = nn.Parameter(full[rank * rows:(rank + 1) * rows].clone().to(device=_param_device(config), dtype=dtype))
    tensor_parallel.set_tensor_model_parallel_attributes(param, is_parallel=True, dim=0, stride=1)
    return param


def _param_device(config):
    """Where parameters live at construction: the default device for CPU init (so meta-device builds work)."""
    if config.use_cpu_initialization or not torch.cuda.is_available():
        return torch.get_default_device()
    return torch.cuda.current_device()


def _uniform(shape, bound: float, gen: torch.Generator) -> torch.Tensor:
    return torch.empty(shape).uniform_(-bound, bound, generator=gen)


def init_generator(layer_number: int) -> torch.Generator:
    """CPU generator for Hyena parameter init, seeded from the run seed and the layer only.

    Independent of the global RNG *state*, so the full (unsharded) filters are identical for every TP/CP layout
    and every amount of randomness consumed before the model is built; each rank then keeps its TP slice.
    """
    return torch.Generator().manual_seed((torch.initial_seed() + 7919 * layer_number) % (2**63))


class _ShardedDim0(MegatronModule):
    """Base for Hyena modules whose every parameter and buffer is TP-sharded along dim 0."""

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        state = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(state, prefix, {k: 0 for k in state}, sharded_offsets)


class ShortConv(_ShardedDim0):
    """Depthwise causal conv on the 3H projection; weight ``short_conv_weight`` (3Hp, K), last tap = current token."""

    def __init__(self, config, channels: int, kernel_size: int, gen: torch.Generator, tp_group=None):
        super().__init__(config)
        self.kernel_size = kernel_size
        self.short_conv_weight = _sharded_param(_uniform((channels, kernel_size), math.sqrt(1 / kernel_size), gen),
                                                config, tp_group)

    def forward(self, x_BCL: torch.Tensor, left_context: torch.Tensor | None = None) -> torch.Tensor:
        return ops.causal_depthwise_conv(x_BCL, self.short_conv_weight, left_context)


class GroupedShortConv(_ShardedDim0):
    """hcs inner conv: grouped weight ``short_conv_weight`` (Gp, 1, 7) expanded to the rank's channels."""

    def __init__(self, config, num_groups: int, kernel_size: int, init_bound: float, gen: torch.Generator,
                 tp_group=None):
        super().__init__(config)
        self.kernel_size = kernel_size
        self.short_conv_weight = _sharded_param(_uniform((num_groups, 1, kernel_size), init_bound, gen), config,
                                                tp_group)

    def weight_CK(self, channels: int) -> torch.Tensor:
        return ops.expand_groups(self.short_conv_weight[:, 0], channels)


class _Fp32Filter(_ShardedDim0):
    """Filter parameters/buffers created in fp32 (the StripedHyena authors keep long/medium filters in fp32).

    With ``keep_fp32`` set (see :func:`keep_hyena_filters_fp32`) dtype casts of the whole model such as
    ``Float16Module``'s ``.bfloat16()`` leave them untouched (exactly: the fp32 values are kept, not re-widened).
    """

    keep_fp32 = False

    def _apply(self, fn, recurse=True):
        if not self.keep_fp32:
            return super()._apply(fn, recurse)
        fp32 = {**{n: t.data for n, t in self._parameters.items() if t is not None},
                **{n: t for n, t in self._buffers.items() if t is not None}}
        super()._apply(fn, recurse)
        for name, value in fp32.items():
            if name in self._parameters and self._parameters[name].dtype != value.dtype:
                self._parameters[name].data = value.to(self._parameters[name].device)
            elif name in self._buffers and self._buffers[name].dtype != value.dtype:
                self._buffers[name] = value.to(self._buffers[name].device)
        return self


def keep_hyena_filters_fp32(model: torch.nn.Module) -> torch.nn.Module:
    """Keep the long/medium filter parameters and ``decay`` in fp32 through later dtype casts of ``model``.

    ``HyenaModelProvider.provide`` calls it, so training and inference both keep them fp32 inside a bf16/fp16 model,
    as the StripedHyena authors (and Vortex) do: bf16 poles and residues visibly change the filter. Checkpointing the
    optimizer of such a mixed-dtype model needs :mod:`evo2_recipe.compat.mixed_dtype_optimizer`.
    """
    for module in model.modules():
        if isinstance(module, _Fp32Filter):
            module.float()
            module.keep_fp32 = True
    return model


class ExplicitDecayFilter(_Fp32Filter):
    """hcm filter: ``h`` (Gp, 128) times the fixed persistent buffer ``decay`` (Gp, 128), both fp32."""

    def __init__(self, config, num_groups: int, length: int, preset: str, gen: torch.Generator, tp_group=None):
        super().__init__(config)
        self.h = _sharded_param(torch.randn(num_groups, length, generator=gen) / math.sqrt(length) * 1e-5, config,
                                tp_group, fp32=True)
        rank, world = _rank_world(tp_group)
        rows = num_groups // world
        decay = ops.decay_rates(num_groups, length, preset)[rank * rows:(rank + 1) * rows]
        self.register_buffer("decay", decay.to(self.h.device), persistent=True)

    def forward(self, L: int | None = None, groups: slice = slice(None)) -> torch.Tensor:
        """``(h * decay)[groups]`` (G', 128) fp32; ``L`` is ignored (the filter has fixed length)."""
        return ops.decay_filter(self.h[groups], self.decay[groups])


class ImplicitModalFilter(_Fp32Filter):
    """hcl filter: ``gamma``, ``R``, ``p`` (Gp, 16) fp32; ``h[g, t] = sum_o R exp(-exp(p) exp(gamma) t)``."""

    def __init__(self, config, num_groups: int, order: int, gamma_min: float, gamma_max: float,
                 gen: torch.Generator, tp_group=None):
        super().__init__(config)
        self.gamma = _sharded_param(torch.empty(num_groups, order).uniform_(gamma_min, gamma_max, generator=gen).log(),
                                    config, tp_group, fp32=True)
        self.R = _sharded_param(0.1 * torch.randn(num_groups, order, generator=gen) / math.sqrt(order), config,
                                tp_group, fp32=True)
        self.p = _sharded_param(torch.full((num_groups, order), -1.0), config, tp_group, fp32=True)

    def forward(self, L: int, groups: slice = slice(None)) -> torch.Tensor:
        """The modal filter of ``groups`` (all by default) for ``L`` positions: (G', L) fp32 (one Triton pass where
        the kernel is on, see ``kernels/modal_filter.py``)."""
        if fused_kernels_enabled(self.config, self.p):
            from evo2_recipe.models.hyena.kernels.modal_filter import modal_filter

            return modal_filter(self.p[groups], self.gamma[groups], self.R[groups], L)
        return ops.modal_filter(self.p[groups], self.gamma[groups], self.R[groups], L)

    def log_poles(self) -> torch.Tensor:
        return ops.modal_log_poles(self.p, self.gamma)


class HyenaOperator(_ShardedDim0):
    """One of hcs / hcm / hcl acting on de-interleaved ``x1, x2, v`` (B, Hp, L)."""

    def __init__(self, config, operator_type: str, hyena: HyenaConfig, use_short_conv_bias: bool,
                 gen: torch.Generator, tp_group=None, cp_group=None):
        super().__init__(config)
        _, tp = _rank_world(tp_group)
        self.cp_group = cp_comm.active_group(cp_group)  # None without context parallelism
        H = config.hidden_size
        self.operator_type = operator_type
        self.channels = H // tp
        if operator_type == HYENA_SHORT:
            G = config.num_groups_hyena_short
            self.short_conv = GroupedShortConv(config, G, hyena.hyena_short_conv_len,
                                               init_bound=math.sqrt(1 / hyena.short_conv_L), gen=gen,
                                               tp_group=tp_group)
            self.conv_bias = (_sharded_param(_uniform((G,), math.sqrt(1 / hyena.hyena_short_conv_len), gen), config,
                                             tp_group) if use_short_conv_bias else None)
        elif operator_type == HYENA_MEDIUM:
            K = hyena.hyena_medium_conv_len
            self.filter = ExplicitDecayFilter(config, config.num_groups_hyena_medium, K,
                                              hyena.explicit_filter_decay_preset, gen, tp_group)
            self.conv_bias = _sharded_param(_uniform((H,), math.sqrt(1 / K), gen), config, tp_group)
        elif operator_type == HYENA_LONG:
            self.filter = ImplicitModalFilter(config, config.num_groups_hyena, hyena.hyena_filter_order,
                                              hyena.modal_gamma_min, hyena.modal_gamma_max, gen, tp_group)
            self.conv_bias = _sharded_param(_uniform((H,), math.sqrt(1 / config.seq_length), gen), config, tp_group)
        else:
            raise ValueError(f"unknown Hyena operator type {operator_type!r}")

    def forward(self, x1, u, state: HyenaLayerState | None = None) -> torch.Tensor:
        """``z = x1 * y(u)`` (B, Hp, L) for a whole sequence (``state`` None) or a chunk continuing a cached one."""
        return x1 * self.convolve(u, state).to(u.dtype)

    def convolve(self, u, state: HyenaLayerState | None = None) -> torch.Tensor:
        """``y(u)``: the operator's convolution with its skip term, (B, Hp, L)."""
        return self._short(u, state) if self.operator_type == HYENA_SHORT else self._long(u, state)

    def step(self, x1, x2, v, state: HyenaLayerState) -> torch.Tensor:
        """:meth:`forward` for one decode token (B, Hp, 1), from the constants of :meth:`step_constants`: a FIR is a
        dot product with the stored window, hcl the 16-mode recurrence (the fused kernel's oracle)."""
        u = x2 * v
        kind, *const = self.step_constants(state)
        if kind == "modal":
            poles, residue_poles, direct = const
            y = modal_step(state, u, poles, residue_poles) + direct * u.float()
        else:
            y = state.fir_step(kind, u, const[0])
        return x1 * y.to(v.dtype)

    def step_constants(self, state: HyenaLayerState) -> tuple:
        """fp32 constants of the one-token step, built once per generation: ``(window_name, taps (Hp, K))`` for
        hcs/hcm or ``("modal", poles, R*poles, direct)`` for hcl.

        hcs: the NV skip term ``b u`` folds into the current-token tap. hcm: ``y = sum_k h[k] u[t-k] + D u``, the
        filter flipped with ``D`` folded into the current tap. hcl: ``h[0] = sum_o R_o``, so ``y = (sum_o R_o + D) u
        + sum_o R_o lambda_o s_o`` and ``s <- lambda s + u``.
        """
        if self.operator_type in (HYENA_SHORT, HYENA_MEDIUM):
            def taps():
                w, skip = self.direct_taps()
                w = w.float().clone()
                if skip is not None:
                    w[:, -1] += skip.float()
                return w.contiguous()
            kind = "short" if self.operator_type == HYENA_SHORT else "medium"
            return kind, state.constant(f"{kind}_taps", taps)

        def modal():
            poles = torch.exp(ops.expand_groups(self.filter.log_poles(), self.channels))  # (Hp, O)
            residues = ops.expand_groups(self.filter.R.float(), self.channels)
            return (poles.contiguous(), (residues * poles).contiguous(),
                    (residues.sum(-1) + self.conv_bias.float())[:, None].contiguous())
        return ("modal", *state.constant("modal", modal))

    def direct_taps(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hcs / hcm as a direct conv: per-channel taps (Hp, K) with the last on the current token, and the skip
        (NV hcs bias, hcm ``D``; None for ARC hcs)."""
        if self.operator_type == HYENA_SHORT:
            return self.short_conv.weight_CK(self.channels), self.short_skip()
        return self._filter_CK(1).flip(-1), self.conv_bias  # the medium filter has a fixed length

    def _short(self, u, state):
        w, skip = self.short_conv.weight_CK(self.channels), self.short_skip()
        return causal_conv_with_context(u, lambda x, left: ops.short_conv(x, w, skip, left), w.shape[-1] - 1,
                                        state, "short", self.cp_group)

    def short_skip(self) -> torch.Tensor | None:
        """hcs skip term per channel (NV models' ``conv_bias`` per group), or None (ARC)."""
        return ops.expand_groups(self.conv_bias, self.channels) if self.conv_bias is not None else None

    @property
    def filter_groups(self) -> int:
        """Filter groups on this TP rank (rows of ``h`` / ``p``)."""
        return (self.filter.h if self.operator_type == HYENA_MEDIUM else self.filter.p).shape[0]

    def _filter_CK(self, L: int, channels: slice = slice(None)) -> torch.Tensor:
        """Per-channel filter (C', K) of the rank's ``channels``, built only for the groups those channels use."""
        start, stop, _ = channels.indices(self.channels)
        groups, within = ops.groups_of_channels(start, stop, self.channels, self.filter_groups)
        h = self.filter(L, groups)
        return ops.expand_groups(h, h.shape[0] * (self.channels // self.filter_groups))[within]

    def _long(self, u, state):
        group = self.cp_group
        if self.operator_type == HYENA_MEDIUM and (group is None or u.shape[-1] // 2 >= self.medium_halo):
            return causal_conv_with_context(u, self._medium_conv, self.medium_halo, state, "medium", group)
        if state is not None:  # CP=1 (HyenaMixer.forward refuses a decode state under context parallelism)
            return self._long_with_state(u, state)
        if group is None:
            if not torch.is_grad_enabled() and fused_kernels_enabled(self.config, u):  # hcl as a chunked scan
                from evo2_recipe.models.hyena.kernels.modal_conv import modal_conv

                return modal_conv(u, self.filter.log_poles(), self.filter.R, self.conv_bias)
            return self._fft_conv(u, 0)
        # hcl's filter spans the whole sequence (and hcm's when a CP chunk is shorter than its halo): all-to-all
        cp_rank = group.rank()
        u_full = cp_comm.seq_to_channel_split(u, group)  # (B, Hp/CP, L)
        y = self._fft_conv(u_full, cp_rank * u_full.shape[1])  # filters of this rank's channels only
        return cp_comm.channel_to_seq_split(y, group)

    def _conv_filter(self, L: int, start: int, stop: int) -> torch.Tensor:
        """Filter rows for channels ``[start, stop)``: one per filter group when the range covers whole groups (the
        FFT broadcasts them), else one per channel."""
        per_group = self.channels // self.filter_groups
        if start % per_group or (stop - start) % per_group:
            return self._filter_CK(L, slice(start, stop))
        return self.filter(L, slice(start // per_group, stop // per_group))

    def _fft_conv(self, u, first_channel: int) -> torch.Tensor:
        """``h * u + D u`` for channels ``first_channel ..`` of this TP rank, (B, c, L) fp32 (model dtype when
        chunked).

        Without autograd (scoring, prefill) the channels go in chunks, so the filters and FFT buffers of only
        ``INFERENCE_CHUNK_ELEMENTS / L`` channels exist at once (at 131k tokens the whole-layer buffers are tens of GB).
        """
        B, c, L = u.shape
        per_group = self.channels // self.filter_groups
        chunk = max(per_group, INFERENCE_CHUNK_ELEMENTS // max(L * B, 1) // per_group * per_group)
        D = self.conv_bias

        def conv(a: int, b: int) -> torch.Tensor:  # channels [a, b) of u
            first, last = first_channel + a, first_channel + b
            return self._fft(u[:, a:b], self._conv_filter(L, first, last), D[first:last])

        if torch.is_grad_enabled() or chunk >= c or first_channel % per_group:
            return conv(0, c)
        y = torch.empty_like(u)
        for a in range(0, c, chunk):
            y[:, a:a + chunk] = conv(a, min(a + chunk, c))
        return y

    @property
    def medium_halo(self) -> int:
        """Samples of left context the hcm FIR reads (taps - 1)."""
        return self.filter.h.shape[-1] - 1

    def _medium_conv(self, u, left: torch.Tensor | None) -> torch.Tensor:
        """hcm ``h * u + D u`` (B, Hp, L) continuing ``left`` (B, Hp, 127): the decode state's window or, under
        context parallelism, the previous chunk's tail - a 128-tap FIR needs nothing older, so CP exchanges halos
        instead of all-to-alls. No left context: the whole sequence (chunked without autograd)."""
        if left is None:
            return self._fft_conv(u, 0)
        u_ext = torch.cat([left.to(u.dtype), u], dim=-1)
        return self._fft(u_ext, self.filter(u_ext.shape[-1]), self.conv_bias)[..., left.shape[-1]:]

    def _fft(self, u, h, skip) -> torch.Tensor:
        """:func:`operators.fft_causal_conv`; under autograd with the kernels on, its hand-derived backward."""
        if torch.is_grad_enabled() and fused_kernels_enabled(self.config, u):
            return fft_conv.fft_causal_conv(u, h, skip)
        return ops.fft_causal_conv(u, h, skip)

    def _long_with_state(self, u, state: HyenaLayerState):
        """hcl: a chunk continuing a cached sequence (a fresh slot takes the scoring path, ``HyenaMixer.forward``)."""
        D = self.conv_bias
        y = ops.fft_causal_conv(u, self.filter(u.shape[-1]), D)
        return y + modal_chunk_update(state, u, self.filter.log_poles(), self.filter.R,
                                      fused_kernels_enabled(self.config, u))


@dataclass
class HyenaMixerSubmodules:
    dense_projection: ModuleSpec | type
    dense: ModuleSpec | type


def _fused_left_contexts(x_BCL: torch.Tensor, halo: int, group) -> tuple[list[torch.Tensor], int]:
    """Left contexts of the two zigzag halves for the fused kernels, ``(B, C, pad)`` each: zeros, then the
    neighbour's last ``halo`` samples, ``pad`` a multiple of 16 (the kernels drop the first ``pad`` outputs).
    Triton specialises a kernel on integer arguments divisible by 16, which is what lets it prove the (B, C, L) rows
    aligned and use vector loads; a half of 2,048 rows plus a 2-row halo lost that (CP=2 profile on the H200: the
    fused prologue 160 us per 2,050-row half against 112 us for 8,192 rows on one GPU; the padded version is not yet
    measured). The zeros only reach outputs that are dropped with the halo's."""
    pad = -(-halo // 16) * 16
    lefts = cp_comm.halo_left_context(x_BCL, halo, group)
    return [nn.functional.pad(left, (pad - halo, 0)) for left in lefts], pad


class HyenaMixer(MegatronModule):
    """Projection + short conv + Hyena operator + output projection (one per Hyena layer)."""

    def __init__(self, config, submodules: HyenaMixerSubmodules, operator_type: str, layer_number: int,
                 hyena: HyenaConfig | None = None, pg_collection=None):
        super().__init__(config)
        hyena = hyena or HYENA
        tp_group, cp_group = (pg_collection.tp, pg_collection.cp) if pg_collection is not None else (None, None)
        _, tp = _rank_world(tp_group)
        H = config.hidden_size
        for name in ("num_groups_hyena", "num_groups_hyena_medium", "num_groups_hyena_short"):
            if getattr(config, name) % tp:
                raise ValueError(f"{name}={getattr(config, name)} is not divisible by tensor parallel size {tp}")
            if H % getattr(config, name):
                raise ValueError(f"hidden_size {H} is not divisible by {name}={getattr(config, name)}")
        if H % tp:
            raise ValueError(f"hidden_size {H} is not divisible by tensor parallel size {tp}")
        self.layer_number = layer_number
        self.dense_projection = build_module(
            submodules.dense_projection, H, 3 * H, config=config, init_method=config.init_method,
            gather_output=False, bias=False, skip_bias_add=True, is_expert=False, tp_comm_buffer_name="fc1",
            tp_group=tp_group,
        )
        gen = init_generator(layer_number)
        self.hyena_proj_conv = ShortConv(config, 3 * H, hyena.short_conv_L, gen, tp_group)
        self.mixer = HyenaOperator(config, operator_type, hyena, config.use_short_conv_bias, gen, tp_group, cp_group)
        self.dense = build_module(
            submodules.dense, H, H, config=config, init_method=config.output_layer_init_method, bias=True,
            input_is_parallel=True, skip_bias_add=True, is_expert=False, tp_comm_buffer_name="fc2",
            tp_group=tp_group,
        )

    def _operator(self, features_LBC3: torch.Tensor, need_u: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A whole sequence (no decode state): ``z`` (L, B, Hp) and ``u = x2 * v`` (B, Hp, L; None when not
        ``need_u`` and NVIDIA's package ran the block). NVIDIA's subquadratic-ops when asked for and it serves, else
        the fused Triton prologue/epilogue when enabled, else the plain operators (same math)."""
        op = self.mixer
        sq = (getattr(self.config, "use_subquadratic_ops", False) and op.cp_group is None
              and subquadratic.serves(features_LBC3))
        if sq and not need_u and op.operator_type != HYENA_LONG:
            return subquadratic.short_block(features_LBC3, self.hyena_proj_conv.short_conv_weight,
                                            *op.direct_taps()), None
        if fused_kernels_enabled(self.config, features_LBC3):
            return self._fused_operator(*self._fused_prologue(features_LBC3), sq)
        features = causal_conv_with_context(features_LBC3.permute(1, 2, 0), self.hyena_proj_conv,
                                            self.hyena_proj_conv.kernel_size - 1, None, "proj", op.cp_group)
        x1, x2, v = features[:, 0::3], features[:, 1::3], features[:, 2::3]  # channel-interleaved (spec 2.3)
        u = x2 * v
        return self.mixer(x1, u).permute(2, 0, 1).contiguous(), u

    def _fused_operator(self, x1: torch.Tensor, u: torch.Tensor, sq: bool = False
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """After the fused prologue: the operator with its gate fused -> z (L, B, Hp), u (B, Hp, L)."""
        op = self.mixer
        if op.operator_type == HYENA_SHORT:  # the 7-tap conv runs inside the epilogue
            return self._fused_short_epilogue(x1, u), u
        from evo2_recipe.models.hyena.kernels import gating

        if sq and op.operator_type == HYENA_LONG:
            return gating.hyena_epilogue(x1, subquadratic.fft_conv(u, op._filter_CK(u.shape[-1]), op.conv_bias)), u
        if op.operator_type == HYENA_MEDIUM and op.cp_group is None and not torch.is_grad_enabled():
            from evo2_recipe.models.hyena.kernels.medium_conv import medium_conv_epilogue

            return medium_conv_epilogue(x1, u, op.filter(), op.conv_bias), u
        return gating.hyena_epilogue(x1, op.convolve(u)), u

    def _channel_first_features(self, x_LBH: torch.Tensor, state: HyenaLayerState | None) -> torch.Tensor | None:
        """(B, 3Hp, L) features straight from the projection (``W @ x^T``) where the fused prologue then reads them
        without a transpose, forward and backward: whole-sequence forwards (training, scoring, a fresh prefill) with
        the local spec's projection and the kernels on, without context or sequence parallelism, NVIDIA's ops or FP8
        padding. None elsewhere (the projection's usual sequence-first output)."""
        cfg = self.config
        project = getattr(self.dense_projection, "channel_first", None)  # not TE's, not under a LoRA adapter
        if (project is None or x_LBH.shape[0] == 1 or self.mixer.cp_group is not None
                or (state is not None and not state.fresh) or cfg.sequence_parallel
                or getattr(cfg, "use_subquadratic_ops", False) or getattr(cfg, "vortex_style_fp8", False)
                or not fused_kernels_enabled(cfg, x_LBH)):
            return None
        return project(x_LBH)

    def _fused_prologue(self, features_LBC3: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fused prologue -> x1, u (B, Hp, L). Under context parallelism each zigzag half runs with its left
        neighbour's last ``K-1`` feature rows prepended (the outputs of those rows are dropped), as
        :func:`causal_conv_with_context` gives the plain conv its left context."""
        from evo2_recipe.models.hyena.kernels import gating

        w = self.hyena_proj_conv.short_conv_weight
        group = self.mixer.cp_group
        if group is None:
            return gating.hyena_prologue(features_LBC3, w)
        halo = self.hyena_proj_conv.kernel_size - 1
        lefts, pad = _fused_left_contexts(features_LBC3.permute(1, 2, 0), halo, group)  # (B, 3Hp, pad) each
        halves = [gating.hyena_prologue(torch.cat([left.permute(2, 0, 1).to(f.dtype), f]), w)
                  for left, f in zip(lefts, features_LBC3.chunk(2, dim=0))]
        return tuple(torch.cat([half[i][..., pad:] for half in halves], dim=-1) for i in range(2))

    def _fused_short_epilogue(self, x1_BCL: torch.Tensor, u_BCL: torch.Tensor) -> torch.Tensor:
        """hcs: the 7-tap conv and the gate in one kernel -> z (L, B, Hp); under context parallelism per zigzag half
        with the left neighbour's last ``u`` values prepended (their gated outputs dropped)."""
        from evo2_recipe.models.hyena.kernels import gating

        op = self.mixer
        w, skip = op.short_conv.weight_CK(op.channels), op.short_skip()
        if op.cp_group is None:
            return gating.short_conv_epilogue(x1_BCL, u_BCL, w, skip)
        halo = w.shape[-1] - 1
        lefts, pad = _fused_left_contexts(u_BCL, halo, op.cp_group)
        return torch.cat([gating.short_conv_epilogue(nn.functional.pad(x1, (pad, 0)),
                                                     torch.cat([left.to(u.dtype), u], dim=-1), w, skip)[pad:]
                          for left, x1, u in zip(lefts, x1_BCL.chunk(2, dim=-1), u_BCL.chunk(2, dim=-1))])

    def forward(self, x_LBH: torch.Tensor, state: HyenaLayerState | None = None):
        features_BC3L = self._channel_first_features(x_LBH, state)
        if features_BC3L is not None:
            from evo2_recipe.models.hyena.kernels import gating

            x1, u = gating.hyena_prologue_channel_first(features_BC3L, self.hyena_proj_conv.short_conv_weight)
            z, u = self._fused_operator(x1, u)
            if state is not None:
                self._store_prompt_state(features_BC3L, u, state)
            return self.dense(z)
        features, _ = quantization.hyena_input_projection(self.config, self.dense_projection, x_LBH)  # (L, B, 3Hp)
        if state is not None and self.mixer.cp_group is not None:
            raise NotImplementedError("cached decoding with context parallelism is not supported; use CP=1")
        if state is not None and features.shape[0] == 1:  # one decode token
            return self.dense(self._decode_step(features, state))
        if state is None or state.fresh:  # a whole sequence, or a new prompt's prefill: the scoring forward's path
            z, u = self._operator(features, need_u=state is not None)
            if state is not None:
                self._store_prompt_state(features.permute(1, 2, 0), u, state)
            return self.dense(z)
        # a chunk continuing a cached sequence: every convolution reads its left context from the state
        features = causal_conv_with_context(features.permute(1, 2, 0), self.hyena_proj_conv,
                                            self.hyena_proj_conv.kernel_size - 1, state, "proj")
        x1, x2, v = features[:, 0::3], features[:, 1::3], features[:, 2::3]
        z = self.mixer(x1, x2 * v, state)  # (B, Hp, L)
        return self.dense(z.permute(2, 0, 1).contiguous())  # (y, bias), (L, B, H)

    def _store_prompt_state(self, features_BC3L: torch.Tensor, u_BCL: torch.Tensor, state: HyenaLayerState) -> None:
        """Fill a fresh slot's state from its prompt (the chunk updates' fresh case): the FIR windows are the prompt's
        last inputs, the hcl modal state the decayed sum over all of ``u`` (what the token-by-token recurrence would
        hold after the prompt)."""
        op = self.mixer
        state.take_window("proj", features_BC3L, self.hyena_proj_conv.kernel_size - 1)
        if op.operator_type == HYENA_LONG:
            modal_chunk_update(state, u_BCL, op.filter.log_poles(), op.filter.R,
                               fused_kernels_enabled(self.config, u_BCL))
        elif op.operator_type == HYENA_SHORT:
            state.take_window("short", u_BCL, op.short_conv.kernel_size - 1)
        else:
            state.take_window("medium", u_BCL, op.filter.h.shape[-1] - 1)

    def _decode_step(self, features_1BC3: torch.Tensor, state: HyenaLayerState) -> torch.Tensor:
        """z (1, B, Hp) of one token: the fused kernel on CUDA (one launch instead of ~20), else the eager step."""
        proj_taps = state.constant("proj_taps", lambda: self.hyena_proj_conv.short_conv_weight.float().contiguous())
        if not fused_kernels_enabled(self.config, features_1BC3):
            features = state.fir_step("proj", features_1BC3.permute(1, 2, 0), proj_taps).to(features_1BC3.dtype)
            x1, x2, v = features[:, 0::3], features[:, 1::3], features[:, 2::3]
            return self.mixer.step(x1, x2, v, state).permute(2, 0, 1).contiguous()
        from evo2_recipe.models.hyena.kernels.hyena_decode import hyena_decode_step

        op = self.mixer
        C = op.channels
        proj_window = state.window("proj", 3 * C, self.hyena_proj_conv.kernel_size - 1, features_1BC3)
        kind, *const = op.step_constants(state)
        if kind == "modal":
            poles, residue_poles, direct = const
            return hyena_decode_step(features_1BC3.contiguous(), proj_window, proj_taps,
                                     modal_state=state.modal_state(C, poles.shape[-1], features_1BC3),
                                     poles=poles, residue_poles=residue_poles, direct=direct)
        taps = const[0]
        return hyena_decode_step(features_1BC3.contiguous(), proj_window, proj_taps,
                                 window=state.window(kind, C, taps.shape[-1] - 1, features_1BC3), taps=taps)
