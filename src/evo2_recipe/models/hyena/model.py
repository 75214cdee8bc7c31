"""``HyenaModel``: token embedding -> Hyena/attention stack -> final RMSNorm -> (tied) output head -> loss.

Inputs are ``(B, L)`` token ids; inside the stack activations are sequence-first ``(L, B, H)`` as in megatron.
With ``labels`` the forward returns the per-token loss ``(B, L)`` of spec section 3.5: labels are upper-cased, the
cross-entropy of lowercase (soft-masked) positions is weighted by 0.1, and with ``to_upper="normalized_weighted"``
the weights are renormalised so their masked sum equals the number of masked tokens (summed over the whole
micro-batch and, under context parallelism, over all CP ranks so results do not depend on CP).
"""

from __future__ import annotations

import torch
from megatron.core import tensor_parallel
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.transformer.enums import ModelType

from evo2_recipe.models.hyena.block import HyenaStack
from evo2_recipe.models.hyena.config import HYENA, HyenaConfig
from evo2_recipe.models.hyena.specs import HyenaStackSpec

_LOWER_A, _LOWER_Z = ord("a"), ord("z")


def upper_case_labels(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Map ASCII a-z ids to A-Z; return the new labels and the mask of positions that were lowercase."""
    lower = (labels >= _LOWER_A) & (labels <= _LOWER_Z)
    return torch.where(lower, labels - 32, labels), lower


class HyenaModel(LanguageModule):
    def __init__(self, config, spec: HyenaStackSpec, *, vocab_size: int, max_sequence_length: int,
                 pre_process: bool = True, post_process: bool = True, parallel_output: bool = True,
                 share_embeddings_and_output_weights: bool = True, to_upper: str = "normalized_weighted",
                 hyena: HyenaConfig | None = None, pg_collection=None):
        # pg_collection: megatron's ProcessGroupCollection; None takes parallel_state's groups (LanguageModule)
        super().__init__(config=config, pg_collection=pg_collection)
        self.model_type = ModelType.encoder_or_decoder
        self.hyena = hyena or HYENA
        self.vocab_size = vocab_size
        self.max_sequence_length = max_sequence_length
        self.pre_process, self.post_process = pre_process, post_process
        self.parallel_output = parallel_output
        self.share_embeddings_and_output_weights = share_embeddings_and_output_weights
        self.to_upper = to_upper
        self.position_embedding_type = "rope"
        if pre_process:
            self.embedding = LanguageModelEmbedding(config, vocab_size, max_sequence_length,
                                                    position_embedding_type="rope", tp_group=self.pg_collection.tp)
        self.rotary_pos_emb = RotaryEmbedding(
            kv_channels=config.kv_channels, rotary_percent=config.rotary_percent,
            seq_len_interpolation_factor=config.seq_len_interpolation_factor, rotary_base=config.rotary_base,
            use_cpu_initialization=config.use_cpu_initialization,
            cp_group=self.pg_collection.cp,
        )
        self.decoder = HyenaStack(config, spec, pre_process=pre_process, post_process=post_process,
                                  pg_collection=self.pg_collection)
        if post_process:
            self.output_layer = tensor_parallel.ColumnParallelLinear(
                config.hidden_size, vocab_size, config=config, init_method=config.init_method,
                bias=bool(getattr(config, "add_bias_output", False)),
                skip_bias_add=False, gather_output=not parallel_output,
                skip_weight_param_allocation=pre_process and share_embeddings_and_output_weights,
                tp_group=self.pg_collection.tp,
            )
        if pre_process or post_process:
            self.setup_embeddings_and_output_layer()

    def set_input_tensor(self, input_tensor) -> None:
        if isinstance(input_tensor, list):
            input_tensor = input_tensor[0]
        self.decoder.set_input_tensor(input_tensor)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None, attention_mask=None,
                labels: torch.Tensor | None = None, loss_mask: torch.Tensor | None = None, inference_context=None,
                runtime_gather_output: bool | None = None, decoder_input: torch.Tensor | None = None,
                hidden_layer: int | None = None, **_unused):
        """Logits ``(B, L, V)``, or the per-token loss with ``labels``; ``hidden_layer`` (negative counts from the end)
        returns that layer's output ``(L, B, H)`` before the final norm instead (embeddings, PP=1)."""
        if decoder_input is None and self.pre_process:
            if position_ids is None:
                position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
            decoder_input = self.embedding(input_ids=input_ids, position_ids=position_ids)  # (L, B, H)
        if inference_context is None:
            rotary_len = self.rotary_pos_emb.get_rotary_seq_len(None, self.decoder, decoder_input, self.config, None)
            rotary_pos_emb = self.rotary_pos_emb(rotary_len)
        else:  # decoding: the KV cache applies RoPE at each slot's own position
            inference_context.bind_rotary(self.rotary_pos_emb, self.config, self.output_layer.weight.device
                                          if self.post_process and self.output_layer.weight is not None
                                          else next(self.parameters()).device)
            rotary_pos_emb = None
        # generation samples from the last position only (with sequence parallelism each rank holds a shard)
        last_only = (getattr(inference_context, "materialize_only_last_token_logits", False)
                     and not self.config.sequence_parallel and hidden_layer is None)
        hidden = self.decoder(decoder_input, attention_mask, rotary_pos_emb=rotary_pos_emb,
                              inference_context=inference_context, num_layers=self._layers_up_to(hidden_layer),
                              last_position_only=last_only)
        if not self.post_process or hidden_layer is not None:
            return hidden
        weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
        logits, _ = self.output_layer(hidden, weight=weight, runtime_gather_output=runtime_gather_output)
        if labels is None:
            return logits.transpose(0, 1).contiguous()  # (B, L, V)
        return self.reweighted_loss(labels, logits, loss_mask)

    def _layers_up_to(self, hidden_layer: int | None) -> int | None:
        if hidden_layer is None:
            return None
        n = len(self.decoder.layers)
        if self.pg_collection.pp is not None and self.pg_collection.pp.size() > 1:
            raise ValueError("hidden_layer needs the whole stack on one pipeline stage (PP=1)")
        if not -n <= hidden_layer < n:
            raise ValueError(f"Invalid embedding_layer={hidden_layer} for model with {n} layers. "
                             f"Valid range: -{n} to {n - 1}.")
        return hidden_layer % n + 1

    def reweighted_loss(self, labels: torch.Tensor, logits_LBV: torch.Tensor, loss_mask: torch.Tensor | None):
        """Per-token loss ``ce * w * mask`` (B, L) with lowercase positions down-weighted (spec section 3.5)."""
        labels, lower = upper_case_labels(labels)
        ce = self.compute_language_model_loss(labels, logits_LBV)  # (B, L), vocab-parallel cross-entropy
        mask = torch.ones_like(ce) if loss_mask is None else loss_mask.to(ce.dtype)
        weights = torch.where(lower, self.hyena.lowercase_loss_reweighting, 1.0).to(ce.dtype) * mask
        if self.to_upper == "normalized_weighted":
            sums = torch.stack([mask.sum(), weights.sum()]).float()
            if self.cp_group is not None and self.cp_group.size() > 1:
                torch.distributed.all_reduce(sums, group=self.cp_group)
            weights = weights * (sums[0] / sums[1].clamp(min=1.0)).to(ce.dtype)
        return ce * weights
