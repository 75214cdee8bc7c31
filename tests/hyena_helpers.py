"""Shared helpers for model tests: a tiny fp32 provider and a deterministic DNA batch with lowercase runs."""

import torch

DNA = torch.tensor([ord(c) for c in "ACGTacgt"])


def tiny_provider(name="striped_hyena_tiny", *, tp=1, cp=1, pp=1, sp=False, **overrides):
    from evo2_recipe.models.providers import get_provider

    p = get_provider(name, vocab_size=512, params_dtype=torch.float32, bf16=False, use_cpu_initialization=True,
                     tensor_model_parallel_size=tp, context_parallel_size=cp, pipeline_model_parallel_size=pp,
                     sequence_parallel=sp, **overrides)
    p.finalize()
    return p


def dna_batch(batch=2, length=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = DNA[torch.randint(0, 8, (batch, length + 1), generator=g)]
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


@torch.no_grad()
def randomise_weights_(model, seed=11):
    """Move every weight away from its init (unit-scale embeddings as in trained models, non-zero biases, norm
    scales != 1, multiplicative noise elsewhere) so that each tensor of a checkpoint visibly affects the logits."""
    g = torch.Generator().manual_seed(seed)
    for key, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g).to(p.device, p.dtype)
        if key.endswith("word_embeddings.weight"):
            p.copy_(noise)
        elif p.count_nonzero() == 0:  # zero-initialised biases
            p.copy_(0.1 * noise)
        else:
            p.mul_(1 + 0.2 * noise)
    return model
