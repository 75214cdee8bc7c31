"""evo2-recipe: Megatron-based training and inference for Evo 2 (StripedHyena 2) DNA language models."""

__version__ = "0.1.0"
