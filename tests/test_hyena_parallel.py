"""TP=2, CP=2 and PP=2 (2 gloo processes) give the same logits and gradients as 1 process (fp32).

Weights move between layouts through megatron dist-checkpointing (save at 1 process, load resharded). Gradients are
written the same way (param.data <- grad, then a sharded save) so they are compared as full global tensors.
"""

import pytest
import torch
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.serialization import load_plain_tensors
from megatron.core.pipeline_parallel import get_forward_backward_func

from evo2_recipe.models.hyena.context_parallel import zigzag_split
from evo2_recipe.utils.spawn import run_on_ranks
from hyena_helpers import dna_batch, tiny_provider

B, L = 2, 64
TOL = dict(rtol=1e-5, atol=1e-5)


def _logits_and_grads(rank, world, tp, cp, pp, sp, weights_dir, grads_dir, name):
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                             context_parallel_size=cp)
    tensor_parallel.model_parallel_cuda_manual_seed(11)
    torch.manual_seed(11)
    provider = tiny_provider(name, tp=tp, cp=cp, pp=pp, sp=sp)
    model = provider.provide()
    if world == 1:
        dist_checkpointing.save(model.sharded_state_dict(), weights_dir)
    else:
        model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), weights_dir))
    tokens, labels = dna_batch(B, L)
    cp_rank = parallel_state.get_context_parallel_rank()
    if cp > 1:
        tokens, labels = (zigzag_split(t, 1, cp_rank, cp) for t in (tokens, labels))
    positions = zigzag_split(torch.arange(L), 0, cp_rank, cp).expand(B, -1) if cp > 1 else None
    fwd_bwd = get_forward_backward_func()

    def run(forward_only):
        def step(_data, m):
            out = m(tokens, positions, labels=None if forward_only else labels)
            return out, lambda o: (o.sum() * 0, {"logits": o.detach()}) if forward_only else (o.sum(), {})
        return fwd_bwd(forward_step_func=step, data_iterator=iter([None]), model=[model], num_microbatches=1,
                       seq_length=L, micro_batch_size=B, forward_only=forward_only)

    logits = None
    with torch.no_grad():
        out = run(True)
    if parallel_state.is_pipeline_last_stage():
        logits = tensor_parallel.gather_from_tensor_model_parallel_region(out[0]["logits"])
        if cp > 1:
            pieces = [torch.empty_like(logits) for _ in range(cp)]
            torch.distributed.all_gather(pieces, logits, group=parallel_state.get_context_parallel_group())
            full = torch.empty(B, L, logits.shape[-1])
            for r, piece in enumerate(pieces):
                full[:, zigzag_split(torch.arange(L), 0, r, cp)] = piece
            logits = full
    run(False)
    for p in model.parameters():  # what DDP + finalize_model_grads would do
        if cp > 1:  # the schedule scales the loss by CP; DDP then averages gradients over the DP x CP group
            torch.distributed.all_reduce(p.grad, group=parallel_state.get_context_parallel_group())
            p.grad /= cp
        if sp and getattr(p, "sequence_parallel", False):
            torch.distributed.all_reduce(p.grad, group=parallel_state.get_tensor_model_parallel_group())
    if pp > 1 and (parallel_state.is_pipeline_first_stage() or parallel_state.is_pipeline_last_stage()):
        torch.distributed.all_reduce(model.shared_embedding_or_output_weight().grad,
                                     group=parallel_state.get_embedding_group())
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.grad)
    dist_checkpointing.save(model.sharded_state_dict(), grads_dir)
    return logits


def _load_plain(rank, world, *dirs):
    return [load_plain_tensors(d) for d in dirs]


def _compare(tmp_path, name, tp=1, cp=1, pp=1, sp=False):
    for d in ("w", "g1", "g2"):
        (tmp_path / d).mkdir()
    (ref_logits,) = run_on_ranks(_logits_and_grads, 1, 1, 1, 1, False, str(tmp_path / "w"), str(tmp_path / "g1"),
                                 name)
    outs = run_on_ranks(_logits_and_grads, 2, tp, cp, pp, sp, str(tmp_path / "w"), str(tmp_path / "g2"), name)
    torch.testing.assert_close(outs[-1], ref_logits, **TOL)
    ((ref, par),) = run_on_ranks(_load_plain, 1, str(tmp_path / "g1"), str(tmp_path / "g2"))
    keys = [k for k in ref if not k.endswith("decay") and isinstance(ref[k], torch.Tensor)]
    assert keys and set(keys) <= set(par)
    for k in keys:
        # Gradients are sums over the 128 tokens of the batch; summation order differs between layouts, so compare
        # at fp32 precision relative to each tensor's scale.
        scale = ref[k].abs().max().clamp(min=1.0)
        torch.testing.assert_close(par[k], ref[k], rtol=1e-5, atol=2e-5 * scale, msg=lambda m, k=k: f"{k}: {m}")
        assert (par[k] - ref[k]).norm() <= 1e-5 * ref[k].norm() + 1e-7, k


@pytest.mark.parametrize("name", ["striped_hyena_tiny", "striped_hyena_tiny_nv"])
def test_tensor_parallel_2(tmp_path, name):
    _compare(tmp_path, name, tp=2)


def test_tensor_parallel_2_sequence_parallel(tmp_path):
    _compare(tmp_path, "striped_hyena_tiny", tp=2, sp=True)


def test_context_parallel_2(tmp_path):
    _compare(tmp_path, "striped_hyena_tiny", cp=2)


def test_pipeline_parallel_2(tmp_path):
    _compare(tmp_path, "striped_hyena_tiny", pp=2)
