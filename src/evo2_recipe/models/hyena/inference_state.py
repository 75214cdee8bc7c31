"""Recurrent decode state for Hyena layers (spec section 4.1), plus a KV-cache context for attention layers.

Per Hyena layer the state holds (``B`` batch, ``C`` channels per TP rank):

* ``proj``   - last 2 inputs of the 3-tap projection conv          (B, 3C, 2)
* ``short``  - last 6 values of ``u = x2*v`` for hcs (7 taps)        (B, C, 6)
* ``medium`` - last 127 values of ``u`` for hcm (128 taps)          (B, C, 127)
* ``modal``  - hcl modal state ``s[c, o] = sum_k lambda_o^(T-1-k) u[c, k]``, fp32 (B, C, 16)

All updates work on chunks of any length, so one code path does prefill (state empty = zeros) and token-by-token
decode (chunks of 1). FIR windows start as zeros, which is exact: the convolution's implicit left padding is zeros,
so prompts shorter than a filter are handled correctly (the reference's growing cache is not).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

_MODAL_CHUNK = 1024  # bounds the (C, O, chunk) power table of the modal state update


@dataclass
class HyenaLayerState:
    windows: dict[str, torch.Tensor] = field(default_factory=dict)
    modal: torch.Tensor | None = None

    def take_window(self, name: str, x_BCL: torch.Tensor, width: int) -> torch.Tensor:
        """Return the stored left context ``(B, C, width)`` for ``x`` and store the new one (its last ``width``)."""
        ctx = self.windows.get(name)
        if ctx is None:
            ctx = x_BCL.new_zeros(*x_BCL.shape[:-1], width)
        ext = torch.cat([ctx.to(x_BCL.dtype), x_BCL], dim=-1)
        self.windows[name] = ext[..., -width:].detach()
        return ctx


def modal_chunk_update(state: HyenaLayerState, u_BCL: torch.Tensor, log_poles_CO: torch.Tensor,
                       residues_CO: torch.Tensor) -> torch.Tensor:
    """Contribution of the carried modal state to this chunk's output, and advance the state past the chunk.

    With poles ``lambda = exp(log_poles)`` and carried state ``s``: ``y_carry[t] = sum_o R_o lambda_o^(t+1) s_o`` and
    ``s <- lambda^T s + sum_k lambda^(T-1-k) u[k]`` for a chunk of length ``T``. Returns ``y_carry`` (B, C, T) fp32.
    """
    B, C, T = u_BCL.shape
    u = u_BCL.float()
    s = state.modal if state.modal is not None else u.new_zeros(B, C, log_poles_CO.shape[-1])
    t = torch.arange(1, T + 1, device=u.device, dtype=torch.float32)
    y_carry = torch.einsum("bco,co,cot->bct", s, residues_CO, torch.exp(log_poles_CO[..., None] * t))
    s_new = s * torch.exp(log_poles_CO * T)
    for start in range(0, T, _MODAL_CHUNK):  # sum_k lambda^(T-1-k) u[k], in chunks
        k = torch.arange(start, min(start + _MODAL_CHUNK, T), device=u.device, dtype=torch.float32)
        powers = torch.exp(log_poles_CO[..., None] * (T - 1 - k))  # (C, O, chunk)
        s_new = s_new + torch.einsum("bck,cok->bco", u[..., start:start + k.numel()], powers)
    state.modal = s_new
    return y_carry


def _static_context_base():
    from megatron.core.inference.contexts import StaticInferenceContext

    return StaticInferenceContext


class HyenaInferenceContext(_static_context_base()):
    """Megatron's static-batch inference context (KV cache for attention layers) plus per-layer Hyena state.

    Usage: ``logits = model(tokens, inference_context=ctx)``, then ``ctx.advance(tokens.shape[1])`` before the next
    chunk. Any chunk length works, so prefill and token-by-token decode share one code path.
    """

    def __init__(self, max_batch_size: int, max_sequence_length: int):
        super().__init__(max_batch_size, max_sequence_length)
        self.hyena_states: dict[int, HyenaLayerState] = {}

    def hyena_state(self, layer_number: int) -> HyenaLayerState:
        return self.hyena_states.setdefault(layer_number, HyenaLayerState())

    def advance(self, num_tokens: int) -> None:
        self.sequence_len_offset += num_tokens
        if self.sequence_len_offset > self.max_sequence_length:
            raise ValueError(f"sequence length {self.sequence_len_offset} exceeds the inference context's "
                             f"max_sequence_length {self.max_sequence_length}")

    def reset(self) -> None:
        super().reset()
        self.hyena_states.clear()
        self.key_value_memory_dict.clear()
