"""LoRA for Evo 2 on Megatron-Bridge's PEFT stack: ``Evo2LoRA`` = Bridge's ``LoRA`` + skip-freeze + tying rules.

Module patterns (targets and skip-freeze alike) match a module's short name at any depth (``dense``) or its full
dotted path with ``*`` wildcards (``decoder.layers.1*.mixer.dense``), exactly as Bridge matches LoRA targets.

Default targets include the Hyena mixer's out-projection ``dense`` (the reference's CLI does; its recipe function
does not): every GEMM of every layer then carries an adapter.

Tied embeddings (``share_embeddings_and_output_weights``) are one weight under two names, so:
* ``word_embeddings`` is never a target (a vocab-parallel embedding takes no adapter);
* ``output_layer`` is a target only when untied;
* skip-freeze names both sides of the pair or neither;
* nothing is both a target and skip-frozen (the LoRA wrapper freezes its base weight).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from evo2_recipe.compat import megatron_fixes

megatron_fixes.install_import_guard()  # Bridge's LoRA layers import TE unconditionally (see megatron_fixes)

from megatron.bridge.peft.lora import LoRA  # noqa: E402
from megatron.bridge.peft.lora_layers import LoRALinear  # noqa: E402
from megatron.bridge.peft.lora_merge import LoRAMerge  # noqa: E402
from megatron.bridge.peft.utils import wildcard_match  # noqa: E402

from evo2_recipe.models.hyena.local_layers import RMSNormColumnParallelLinear  # noqa: E402

logger = logging.getLogger(__name__)

DEFAULT_TARGETS = ["dense_projection", "dense", "linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
EMBEDDING, OUTPUT = "embedding.word_embeddings", "output_layer"


def matches(patterns, full_name: str) -> bool:
    """``full_name`` (a dotted module path) matches a short name or a wildcard path in ``patterns``."""
    short = full_name.rsplit(".", 1)[-1]
    return any(p == short or wildcard_match(p, full_name) for p in patterns or ())


def _chunks(model) -> list[torch.nn.Module]:
    from megatron.core.utils import unwrap_model

    return list(unwrap_model(model if isinstance(model, list) else [model]))


@dataclass
class Evo2LoRA(LoRA):
    """Bridge ``LoRA`` with ``skip_freeze_modules`` (left fully trainable) and Evo 2's weight-tying rules."""

    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    dim: int = 16
    alpha: int = 32
    dropout: float = 0.1
    skip_freeze_modules: list[str] = field(default_factory=list)

    def __call__(self, model, training: bool = True):
        self.validate(model)
        model = super().__call__(model, training=training)
        if training:
            total = sum(p.numel() for c in _chunks(model) for p in c.parameters())
            trainable = sum(p.numel() for c in _chunks(model) for p in c.parameters() if p.requires_grad)
            logger.info("LoRA: %s trainable parameters of %s (%.3f%%), dim %d, alpha %d, targets %s%s",
                        f"{trainable:,}", f"{total:,}", 100 * trainable / max(total, 1), self.dim, self.alpha,
                        ",".join(self.target_modules),
                        f", skip-freeze {','.join(self.skip_freeze_modules)}" if self.skip_freeze_modules else "")
        return model

    def validate(self, model) -> None:
        """The tying and overlap rules (module docstring), with what to do instead."""
        names = [n for c in _chunks(model) for n, _ in c.named_modules() if n]
        tied = getattr(_chunks(model)[0].config, "share_embeddings_and_output_weights", False)
        targets, skip = self.target_modules, self.skip_freeze_modules
        if matches(targets, EMBEDDING):
            raise ValueError("word_embeddings cannot be a LoRA target (a vocab-parallel embedding takes no adapter); "
                             "to train it, list it in --lora-skip-freeze-modules"
                             + (" together with output_layer (the two share one weight)" if tied else ""))
        if tied and matches(targets, OUTPUT):
            raise ValueError("output_layer cannot be a LoRA target while share_embeddings_and_output_weights=True "
                             "(its weight is the word embedding's); train the pair with --lora-skip-freeze-modules "
                             "word_embeddings,output_layer, or use a model with untied embeddings")
        if tied and matches(skip, EMBEDDING) != matches(skip, OUTPUT):
            raise ValueError("share_embeddings_and_output_weights=True: word_embeddings and output_layer are one "
                             "weight; list both in --lora-skip-freeze-modules or neither")
        both = sorted(n for n in names if matches(targets, n) and matches(skip, n))
        if both:
            raise ValueError(f"{both[:4]} match both --lora-target-modules and --lora-skip-freeze-modules; a LoRA "
                             f"target's base weight stays frozen, so list each module in one of them only")
        for pattern in skip:
            if not any(matches([pattern], n) for n in names):
                logger.warning("--lora-skip-freeze-modules %r matches no module of this model", pattern)

    def freeze_model(self, model, training: bool = True) -> None:
        """Freeze the direct parameters of every module except the skip-freeze ones (all of them for inference)."""
        for chunk in _chunks(model):
            for name, module in chunk.named_modules():
                keep = training and name and matches(self.skip_freeze_modules, name)
                for p in module.parameters(recurse=False):
                    p.requires_grad = bool(keep)
            chunk.train(mode=training)

    def transform(self, module, name=None, prefix=None):
        full = f"{prefix}.{name}" if prefix else name
        if isinstance(module, RMSNormColumnParallelLinear) and name and matches(self.target_modules, full):
            module.return_layernorm_output = True  # the adapter reads the normed input, as with TE's fused norm
        return super().transform(module, name, prefix)


def merge_lora_(model) -> int:
    """Fold every adapter into its base weight (``W + alpha/dim * B @ A``, TP-aware) and unwrap it, in place.

    Returns the number of merged linears. The model is then a plain dense model of the base architecture.
    """
    merged = 0
    for chunk in _chunks(model):
        for parent in list(chunk.modules()):
            for child_name, child in list(parent.named_children()):
                if not isinstance(child, LoRALinear):
                    continue
                base, ad = child.to_wrap, child.adapter
                with torch.no_grad():
                    w = LoRAMerge().merge(base.weight.float(), ad.linear_out.weight.float(),
                                          ad.linear_in.weight.float(), ad.alpha, ad.dim,
                                          tp_group=getattr(ad, "tp_group", None))
                    base.weight.copy_(w.to(base.weight.dtype))
                if isinstance(base, RMSNormColumnParallelLinear):
                    base.return_layernorm_output = False
                setattr(parent, child_name, base)
                merged += 1
    return merged
