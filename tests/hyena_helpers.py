"""Shared helpers for model tests: a tiny fp32 provider and a deterministic DNA batch with lowercase runs."""

import torch

DNA = torch.tensor([ord(c) for c in "ACGTacgt"])
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # where kernel tests run: GPU compiled, CPU interpreted


def tiny_provider(name="striped_hyena_tiny", *, tp=1, cp=1, pp=1, sp=False, **overrides):
    from evo2_recipe.models.providers import get_provider

    p = get_provider(name, **{**dict(vocab_size=512, params_dtype=torch.float32, bf16=False), **overrides},
                     use_cpu_initialization=True, tensor_model_parallel_size=tp, context_parallel_size=cp,
                     pipeline_model_parallel_size=pp, sequence_parallel=sp)
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


def loss_and_grads_per_option(name, option_sets, device="cpu", length=45, ddp_config=None):
    """``{key: (loss, {param: grad})}`` of the tiny model ``name`` built once per ``option_sets`` entry (``key ->
    provider overrides``), all with the same randomised weights and batch: how a kernel switch is compared with the
    path it replaces. With ``ddp_config`` the model is wrapped in megatron's DDP (as training wraps it) and the
    gradients are its fp32 ``main_grad`` buffers. Runs inside a rank (model parallel state initialised here)."""
    from megatron.core import parallel_state, tensor_parallel

    parallel_state.initialize_model_parallel()
    tensor_parallel.model_parallel_cuda_manual_seed(5)
    out, weights = {}, None
    for key, overrides in option_sets.items():
        provider = tiny_provider(name, **overrides)
        if ddp_config is None:
            model = provider.provide().to(device)  # GPU: compiled kernels; CPU: interpreter
        else:
            (model,) = provider.provide_distributed_model(ddp_config=ddp_config, bf16=provider.bf16,
                                                          use_cpu_initialization=True)
        if weights is None:
            weights = randomise_weights_(model).state_dict()
        model.load_state_dict(weights)
        tokens, labels = (t.to(device) for t in dna_batch(2, length))
        loss = model(tokens, labels=labels).float().mean()  # O(1) gradients: 1e-5 is a few fp32 ulps of them
        loss.backward()
        grads = {k: (v.grad if ddp_config is None else v.main_grad).cpu() for k, v in model.named_parameters()}
        out[key] = (loss.detach().cpu(), grads)
        if ddp_config is not None:  # which weights' GEMMs wrote their own gradient into main_grad
            out[key] += ({k for k, v in model.named_parameters() if getattr(v, "grad_added_to_main_grad", False)},)
    return out
