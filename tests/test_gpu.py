"""GPU smoke tests (skipped without CUDA): tiny model forward/backward in bf16 and cached decode on the GPU."""

import pytest
import torch

pytestmark = pytest.mark.gpu


def test_tiny_bf16_forward_backward_and_decode_on_gpu():
    from evo2_recipe.models.hyena.inference_state import HyenaInferenceContext
    from evo2_recipe.models.providers import get_provider
    from evo2_recipe.utils.distributed import init_distributed, teardown

    init_distributed(seed=3)
    try:
        p = get_provider("striped_hyena_tiny", vocab_size=512)
        p.finalize()
        model = p.provide().cuda()
        tokens = torch.randint(65, 90, (2, 256), device="cuda")
        loss = model(tokens, labels=tokens.roll(-1, 1)).float().mean()
        loss.backward()
        assert torch.isfinite(loss)
        model.eval()
        with torch.no_grad():
            full = model(tokens).float()
            ctx = HyenaInferenceContext(2, 256)
            out = [model(tokens[:, :200], inference_context=ctx).float()]
            ctx.advance(200)
            for t in range(200, 256):
                out.append(model(tokens[:, t:t + 1], inference_context=ctx).float())
                ctx.advance(1)
        cached = torch.cat(out, 1)
        assert (cached - full).abs().max() < 0.1  # bf16 weights/activations
    finally:
        teardown()
