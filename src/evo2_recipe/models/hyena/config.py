"""Hyena-internal constants (the reference keeps these off the provider; spec section 1.3)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HyenaConfig:
    short_conv_L: int = 3                # taps of the depthwise conv on the 3H projection ("hyena_proj_conv")
    hyena_short_conv_len: int = 7        # taps of the hcs inner filter
    hyena_medium_conv_len: int = 128     # taps of the hcm explicit filter
    hyena_filter_order: int = 16         # modes of the hcl implicit modal filter
    modal_gamma_min: float = 0.01
    modal_gamma_max: float = 0.1
    explicit_filter_decay_preset: str = "weak"
    lowercase_loss_reweighting: float = 0.1


HYENA = HyenaConfig()  # the one instance every module uses unless a model is built with its own


# Layer-type letters of ``hybrid_override_pattern``.
HYENA_SHORT, HYENA_MEDIUM, HYENA_LONG, ATTENTION = "S", "D", "H", "*"


def parse_pattern(pattern: str, num_layers: int) -> list[str]:
    """Validate a hybrid pattern such as ``SDH*`` against ``num_layers``."""
    bad = sorted(set(pattern) - {HYENA_SHORT, HYENA_MEDIUM, HYENA_LONG, ATTENTION})
    if bad:
        raise ValueError(f"hybrid_override_pattern {pattern!r} has unknown layer letters {bad}; use S, D, H or *")
    if len(pattern) != num_layers:
        raise ValueError(f"hybrid_override_pattern has {len(pattern)} letters but num_layers is {num_layers}")
    return list(pattern)
