"""Decode state for generation (spec section 4.1): preallocated, updated in place, one slot per sequence.

Per Hyena layer (``B`` slots, ``C`` channels per TP rank), allocated on first use and then only written in place:

* ``proj``   - last 2 inputs of the 3-tap projection conv          (B, 3C, 2)
* ``short``  - last 6 values of ``u = x2*v`` for hcs (7 taps)        (B, C, 6)
* ``medium`` - last 127 values of ``u`` for hcm (128 taps)          (B, C, 127)
* ``modal``  - hcl modal state ``s[c, o] = sum_k lambda_o^(T-1-k) u[c, k]``, fp32 (B, C, 16)

Per attention layer, a fixed-size KV cache ``(B, heads, max_len, d)`` read through a length mask, so a decode step
has the same shapes at every position (no per-step kernel planning; capturable in a CUDA graph). RoPE is applied
here at each slot's own position, which lets slots sit at different positions (continuous batching).

All updates work on chunks of any length, so one code path does prefill and token-by-token decode. FIR windows start
as zeros, which is exact: the convolution's implicit left padding is zeros, so prompts shorter than a filter are
handled correctly (the reference's growing cache is not). :meth:`HyenaInferenceContext.slots` gives a view of
some slots (prefill of new prompts while the other slots keep their state).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from evo2_recipe.models.hyena import operators as ops
from evo2_recipe.models.hyena.kernels import opt_in_kernels_enabled


class _Storage:
    """Buffers shared by a context and its slot views: name -> tensor with the slot dimension first."""

    def __init__(self, batch: int, max_len: int):
        self.batch, self.max_len = batch, max_len
        self.tensors: dict[tuple, torch.Tensor] = {}
        self.positions: torch.Tensor | None = None  # (B,) next position of each slot, on the model's device
        self.rope_table: torch.Tensor | None = None  # (max_len, d) RoPE angles
        self.rope_config = None
        self.model_config = None  # the model's config: its kernel choice
        self.constants: dict[tuple, object] = {}  # per-layer decode constants derived from the weights
        self.fresh = [True] * batch  # host-side: slot holds no tokens yet (prefill may skip the carried state)
        self.attend_len = max_len  # cache positions a decode step reads (host-side bound, see limit_attention)

    def get(self, key: tuple, shape: tuple, like: torch.Tensor, dtype=None) -> torch.Tensor:
        t = self.tensors.get(key)
        if t is None:
            t = self.tensors[key] = like.new_zeros((self.batch, *shape), dtype=dtype or like.dtype)
        return t

    def all_fresh(self, rows: slice) -> bool:
        """No slot in ``rows`` holds tokens yet (windows, modal state and cache are empty), known on the host."""
        return all(self.fresh[rows])

    def positions_on(self, device) -> torch.Tensor:
        if self.positions is None:
            self.positions = torch.zeros(self.batch, dtype=torch.long, device=device)
        return self.positions


class HyenaLayerState:
    """One Hyena layer's view of the state (all slots, or one slot)."""

    def __init__(self, storage: _Storage, layer_number: int, rows: slice):
        self._storage, self._layer, self._rows = storage, layer_number, rows

    @property
    def fresh(self) -> bool:
        """No slot of this view holds tokens yet: windows and modal state are zeros, known without a device sync."""
        return self._storage.all_fresh(self._rows)

    def take_window(self, name: str, x_BCL: torch.Tensor, width: int) -> torch.Tensor | None:
        """Return the stored left context ``(B, C, width)`` for ``x`` and store the new one (its last ``width``).

        A fresh view returns None (its context is the zero padding of a whole sequence) and stores the prompt's
        tail with one copy; a fresh slot's window is zeros, which is right before a prompt shorter than ``width``."""
        buf = self.window(name, x_BCL.shape[1], width, x_BCL)
        if self.fresh:
            n = min(width, x_BCL.shape[-1])
            buf[..., width - n:].copy_(x_BCL[..., x_BCL.shape[-1] - n:])
            return None
        ctx = buf.clone()
        if x_BCL.shape[-1] >= width:  # a long chunk: its own tail (no concatenation of the whole chunk)
            buf.copy_(x_BCL[..., -width:])
        else:
            buf.copy_(torch.cat([ctx, x_BCL.to(buf.dtype)], dim=-1)[..., -width:])
        return ctx.to(x_BCL.dtype)

    def window(self, name: str, channels: int, width: int, like: torch.Tensor) -> torch.Tensor:
        """The stored window ``name`` of this view's slots, (b, channels, width) in ``like``'s dtype, in place."""
        return self._storage.get((self._layer, name), (channels, width), like)[self._rows]

    def fir_step(self, name: str, x_BC1: torch.Tensor, taps_CK: torch.Tensor) -> torch.Tensor:
        """One token of a causal FIR whose last tap is the current token, against the stored window of the previous
        ``K-1`` inputs (the same window :meth:`take_window` keeps): ``sum_k taps[c, k] window[c, k]`` (B, C, 1) fp32.

        Few kernels, no FFT: the decode step's unit of work (``taps`` fp32, prepared once, see :meth:`constant`).
        """
        buf = self.window(name, x_BC1.shape[1], taps_CK.shape[-1] - 1, x_BC1)
        window = torch.cat([buf, x_BC1.to(buf.dtype)], dim=-1)  # (B, C, K)
        buf.copy_(window[..., 1:])
        return (window.float() * taps_CK).sum(-1, keepdim=True)

    def constant(self, name: str, build):
        """``build()`` once per generation and layer (weights do not change while decoding), then the cached value:
        keeps filter construction out of every decode step (and out of its CUDA graph)."""
        key = (self._layer, name)
        if key not in self._storage.constants:
            with torch.no_grad():
                self._storage.constants[key] = build()
        return self._storage.constants[key]

    def modal_state(self, channels: int, order: int, like: torch.Tensor) -> torch.Tensor:
        return self._storage.get((self._layer, "modal"), (channels, order), like, torch.float32)[self._rows]


def modal_step(state: HyenaLayerState, u_BC1: torch.Tensor, poles_CO: torch.Tensor,
               residue_poles_CO: torch.Tensor) -> torch.Tensor:
    """:func:`modal_chunk_update` for one token: ``y_carry = sum_o R_o lambda_o s_o``, ``s <- lambda s + u`` in place."""
    s = state.modal_state(u_BC1.shape[1], poles_CO.shape[-1], u_BC1)
    u = u_BC1.float()
    y_carry = (s * residue_poles_CO).sum(-1, keepdim=True)
    s.mul_(poles_CO).add_(u)
    return y_carry


def modal_chunk_update(state: HyenaLayerState, u_BCL: torch.Tensor, log_poles_GO: torch.Tensor,
                       residues_GO: torch.Tensor, fused: bool = False) -> torch.Tensor | None:
    """Contribution of the carried modal state to this chunk's output, and advance the state past the chunk.

    With poles ``lambda = exp(log_poles)`` (per filter group, ``(G, O)``) and carried state ``s``:
    ``y_carry[t] = sum_o R_o lambda_o^(t+1) s_o`` and ``s <- lambda^T s + sum_k lambda^(T-1-k) u[k]`` for a chunk of
    length ``T``. Returns ``y_carry`` (B, C, T) fp32, or None for a fresh state (a prompt's prefill: ``s = 0``, no
    carry and no (C, O, T) power table). The decayed sum is one Triton pass when ``fused``
    (``kernels.modal_filter.modal_prompt_state``), else :func:`decayed_sum`.
    """
    B, C, T = u_BCL.shape
    log_poles = None if fused and state.fresh else ops.expand_groups(log_poles_GO.float(), C)  # (C, O)
    if fused:
        from evo2_recipe.models.hyena.kernels.modal_filter import modal_prompt_state

        chunk_sum = modal_prompt_state(u_BCL, log_poles_GO)
    else:
        chunk_sum = decayed_sum(u_BCL.float(), log_poles)
    s_buf = state.modal_state(C, log_poles_GO.shape[-1], u_BCL)
    if state.fresh:
        s_buf.copy_(chunk_sum)
        return None
    t = torch.arange(1, T + 1, device=u_BCL.device, dtype=torch.float32)
    y_carry = torch.einsum("bco,co,cot->bct", s_buf, ops.expand_groups(residues_GO.float(), C),
                           torch.exp(log_poles[..., None] * t))
    s_buf.mul_(torch.exp(log_poles * T)).add_(chunk_sum)
    return y_carry


def decayed_sum(u_BCT: torch.Tensor, log_poles_CO: torch.Tensor) -> torch.Tensor:
    """``sum_k lambda^(T-1-k) u[k]`` (B, C, O) in two levels, so no (C, O, T) power table is built: within blocks of
    ``K ~ sqrt(T)`` positions against one shared (C, O, K) table, then the per-block sums decayed by
    ``lambda^(K * blocks after)``. The left zero padding to a multiple of ``K`` adds nothing."""
    B, C, T = u_BCT.shape
    K = 1 << (max(T - 1, 1).bit_length() + 1) // 2
    n = -(-T // K)
    u = (F.pad(u_BCT, (n * K - T, 0)) if n * K != T else u_BCT).view(B, C, n, K)
    j = torch.arange(K - 1, -1, -1, device=u.device, dtype=torch.float32)  # K-1-j for in-block offset j
    per_block = torch.einsum("bcnk,cok->bcno", u, torch.exp(log_poles_CO[..., None] * j))
    after = torch.arange(n - 1, -1, -1, device=u.device, dtype=torch.float32) * K  # positions after block c's end
    return torch.einsum("bcno,con->bco", per_block, torch.exp(log_poles_CO[..., None] * after))


class KVCache:
    """One attention layer's fixed-size KV cache view; :meth:`attend` replaces core attention while decoding."""

    def __init__(self, storage: _Storage, layer_number: int, rows: slice):
        self._storage, self._layer, self._rows = storage, layer_number, rows
        # Set by the block for a last layer whose later positions nobody reads (generation): every key and value is
        # still cached, the output is the last query's, (1, b, heads*d).
        self.last_query_only = False

    def attend(self, query, key, value, softmax_scale=None) -> torch.Tensor:
        """``(L, b, heads, d)`` q/k/v of new tokens (no RoPE yet) -> ``(L, b, heads*d)`` attention over the cache.

        One-token steps take the split-KV kernel (``kernels/decode_attention.py``) when the fused kernels are asked
        for; the masked SDPA below is its oracle and the default."""
        from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

        L, b, nh, d = query.shape
        st, max_len = self._storage, self._storage.max_len
        k_cache = st.get((self._layer, "k"), (key.shape[2], max_len, d), key)[self._rows]
        v_cache = st.get((self._layer, "v"), (value.shape[2], max_len, d), value)[self._rows]
        if st.all_fresh(self._rows):  # a new prompt: positions 0..L-1 in every slot, plain causal attention
            if L > max_len:
                raise ValueError(f"a {L}-token prompt does not fit a context of max_sequence_length {max_len}")
            freqs = st.rope_table[:L, None, None, :]  # (L, 1, 1, d): slices, no per-slot gather or scatter
            query = apply_rotary_pos_emb(query, freqs, config=st.rope_config)
            key = apply_rotary_pos_emb(key, freqs, config=st.rope_config)
            k_cache[:, :, :L].copy_(key.permute(1, 2, 0, 3))
            v_cache[:, :, :L].copy_(value.permute(1, 2, 0, 3))
            q, k, v, mask = query.permute(1, 2, 0, 3), key.permute(1, 2, 0, 3), value.permute(1, 2, 0, 3), None
        else:  # the first attend_len cache positions, those past each slot's own masked out (static shapes)
            pos = st.positions_on(query.device)[self._rows][:, None] + torch.arange(L, device=query.device)
            pos = pos.clamp(max=max_len - 1)  # only idle (finished) slots run past the end; their outputs are unused
            freqs = st.rope_table[pos].transpose(0, 1)[:, :, None, :]  # (L, b, 1, d): per-slot positions
            query = apply_rotary_pos_emb(query, freqs, config=st.rope_config)
            key = apply_rotary_pos_emb(key, freqs, config=st.rope_config)
            slot = torch.arange(b, device=query.device)[:, None]
            k_cache[slot, :, pos] = key.permute(1, 0, 2, 3).to(k_cache.dtype)  # (b, L, heads, d) at (slot, pos)
            v_cache[slot, :, pos] = value.permute(1, 0, 2, 3).to(v_cache.dtype)
            q, n = query.permute(1, 2, 0, 3), st.attend_len  # (b, heads, L, d)
            k, v = k_cache[:, :, :n], v_cache[:, :, :n]
            mask = (torch.arange(n, device=query.device)[None, None, :] <= pos[:, :, None])[:, None]
        causal = mask is None
        if self.last_query_only and L > 1:
            q, L, causal = q[:, :, -1:], 1, False  # a fresh prompt's last query sees every key: no mask
            if mask is not None:
                mask, pos = mask[:, :, -1:], pos[:, -1:]
        if mask is not None and L == 1 and opt_in_kernels_enabled(self._storage.model_config, q):
            from evo2_recipe.models.hyena.kernels.decode_attention import split_kv_decode_attention

            out = split_kv_decode_attention(q, k, v, pos[:, 0], softmax_scale)  # (b, heads, 1, d)
            return out.permute(2, 0, 1, 3).reshape(L, b, nh * d)
        if k.shape[1] != nh:  # GQA: repeat key/value groups
            k, v = k.repeat_interleave(nh // k.shape[1], dim=1), v.repeat_interleave(nh // v.shape[1], dim=1)
        out = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, is_causal=causal,
                                             scale=softmax_scale)
        return out.permute(2, 0, 1, 3).reshape(L, b, nh * d)


class HyenaInferenceContext:
    """Generation state of a whole model for ``max_batch_size`` slots and up to ``max_sequence_length`` positions.

    Usage: ``logits = model(tokens, inference_context=ctx)``, then ``ctx.advance(tokens.shape[1])`` before the next
    chunk (logits of the chunk's last position only with ``materialize_only_last_token_logits``, as megatron's
    inference contexts name it). ``ctx.slots(i, j)`` is the same state restricted to slots ``i .. j-1`` (prefill of
    new prompts), ``ctx.reset_slots(i, j)`` empties them for their next sequences. Positions live on the device, so
    decoding needs no host synchronisation.
    """

    def __init__(self, max_batch_size: int, max_sequence_length: int, *,
                 materialize_only_last_token_logits: bool = False, _storage: _Storage | None = None,
                 _rows: slice = slice(None)):
        self._storage = _storage or _Storage(max_batch_size, max_sequence_length)
        self._rows = _rows
        self.materialize_only_last_token_logits = materialize_only_last_token_logits  # logits (B, 1, V) per chunk
        self.max_batch_size, self.max_sequence_length = max_batch_size, max_sequence_length

    def bind_rotary(self, rotary: torch.nn.Module, config, device) -> None:
        """Called by the model: RoPE angles for every position (megatron's RotaryEmbedding, so interpolation is
        included), and the slot positions on the model's device."""
        st = self._storage
        if st.rope_table is None:
            st.rope_table = rotary(self.max_sequence_length)[:, 0, 0, :].float().to(device)  # (max_len, d)
            st.rope_config = copy.copy(config)
            st.rope_config.apply_rope_fusion = False  # per-slot positions: the unfused formula broadcasts
            st.model_config = config
        st.positions_on(device)

    def hyena_state(self, layer_number: int) -> HyenaLayerState:
        return HyenaLayerState(self._storage, layer_number, self._rows)

    def kv_cache(self, layer_number: int) -> KVCache:
        return KVCache(self._storage, layer_number, self._rows)

    def limit_attention(self, length: int, minimum: int = 2048) -> int:
        """Let cache attention read only positions ``< length`` (every live slot's position must be below it; the
        caller knows this on the host). Rounded up to a power of two (at least ``minimum``) so a CUDA graph per
        bound serves many steps; returns the bound in effect."""
        bound = min(self.max_sequence_length, max(minimum, 1 << (max(length, 1) - 1).bit_length()))
        self._storage.attend_len = bound
        return bound

    def positions(self) -> torch.Tensor:
        """Next position of each slot of this view, ``(b,)`` on the device."""
        return self._storage.positions[self._rows]

    def slots(self, start: int, stop: int) -> HyenaInferenceContext:
        """A view of slots ``start .. stop-1`` (prefill of several new prompts of one length in one forward)."""
        return HyenaInferenceContext(stop - start, self.max_sequence_length, _storage=self._storage,
                                     _rows=slice(start, stop),
                                     materialize_only_last_token_logits=self.materialize_only_last_token_logits)

    def reset_slots(self, start: int, stop: int) -> None:
        """Empty slots ``start .. stop-1`` for their next sequences (one in-place kernel per buffer, no host sync)."""
        for t in self._storage.tensors.values():
            t[start:stop].zero_()
        self._storage.fresh[start:stop] = [True] * (stop - start)
        if self._storage.positions is not None:
            self._storage.positions[start:stop].zero_()

    def advance(self, num_tokens: int) -> None:
        """Move the slots of this view past ``num_tokens`` positions (on the device: no host synchronisation, so
        lengths are not checked here; :func:`~evo2_recipe.inference.generation.generate` checks them up front)."""
        if self._storage.positions is not None:
            self._storage.positions[self._rows] += num_tokens
        for i in range(self._storage.batch)[self._rows]:
            self._storage.fresh[i] = False

    def reset(self) -> None:
        self._storage.fresh = [True] * self._storage.batch
        self._storage.attend_len = self._storage.max_len
        self._storage.tensors.clear()
        self._storage.constants.clear()
        self._storage.positions = None
