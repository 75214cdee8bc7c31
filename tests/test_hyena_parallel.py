"""TP=2, CP=2 and PP=2 (2 gloo processes) give the same logits and gradients as 1 process (fp32), with the plain
operators and (TP=2, CP=2, PP=2) with the fused Triton kernels.

Weights move between layouts through megatron dist-checkpointing (save at 1 process, load resharded). Gradients are
written the same way (param.data <- grad, then a sharded save) so they are compared as full global tensors.
"""

import os

import pytest
import torch
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.serialization import load_plain_tensors
from megatron.core.pipeline_parallel import get_forward_backward_func

from evo2_recipe.models.hyena.context_parallel import zigzag_split
from evo2_recipe.utils.spawn import run_on_ranks
from hyena_helpers import dna_batch, tiny_provider

B, L = 2, 64
L_HALO = 512  # CP=2 chunks of 128 >= the 127-sample hcm halo: the medium conv exchanges halos, not all-to-alls
TOL = dict(rtol=1e-5, atol=1e-5)


def _logits_and_grads(rank, world, tp, cp, pp, sp, weights_dir, grads_dir, name, fused=False, L=L):
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                             context_parallel_size=cp)
    tensor_parallel.model_parallel_cuda_manual_seed(11)
    torch.manual_seed(11)
    # fused: the Triton kernels (CPU: Triton's interpreter) against the plain operators of the 1-process reference
    provider = tiny_provider(name, tp=tp, cp=cp, pp=pp, sp=sp, **({"use_fused_hyena_kernels": True} if fused else {}))
    model = provider.provide()
    if world == 1 and not os.listdir(weights_dir):  # a model's first reference saves the weights all layouts load
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


def _layouts(rank, world, cases, root):
    """Every case in one spawned process group (3 spawns for the whole module instead of 3 per layout)."""
    results = []
    for i, (name, tp, cp, pp, sp, fused, length) in enumerate(cases):
        results.append(_logits_and_grads(rank, world, tp, cp, pp, sp, f"{root}/w_{name}", f"{root}/g{world}_{i}",
                                         name, fused, length))
        parallel_state.destroy_model_parallel()
    return results


def _case(model, tp, cp, pp, sp, fused=False, length=L):
    return model, tp, cp, pp, sp, fused, length


CASES = {name: _case(*case) for name, case in {  # (model, tp, cp, pp, sp[, fused kernels[, sequence length]])
    "tp2": ("striped_hyena_tiny", 2, 1, 1, False),
    "tp2_nv": ("striped_hyena_tiny_nv", 2, 1, 1, False),
    "tp2_sp": ("striped_hyena_tiny", 2, 1, 1, True),
    "cp2": ("striped_hyena_tiny", 1, 2, 1, False),
    "pp2": ("striped_hyena_tiny", 1, 1, 2, False),
    "tp2_fused": ("striped_hyena_tiny", 2, 1, 1, False, True),
    "cp2_fused": ("striped_hyena_tiny", 1, 2, 1, False, True),
    "cp2_nv_fused": ("striped_hyena_tiny_nv", 1, 2, 1, False, True),
    "pp2_fused": ("striped_hyena_tiny", 1, 1, 2, False, True),
    "cp2_halo": ("striped_hyena_tiny", 1, 2, 1, False, False, L_HALO),
    "cp2_nv_halo_fused": ("striped_hyena_tiny_nv", 1, 2, 1, False, True, L_HALO),
}.items()}
REFS = sorted({(c[0], c[6]) for c in CASES.values()})  # one 1-process reference per (model, length)


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """Reference (1 process) and parallel (2 gloo processes) logits, and both gradient sets as plain tensors."""
    root = tmp_path_factory.mktemp("layouts")
    for d in [f"w_{n}" for n in {n for n, _ in REFS}] + [f"g1_{i}" for i in range(len(REFS))] + \
             [f"g2_{i}" for i in range(len(CASES))]:
        (root / d).mkdir()
    (ref_logits,) = run_on_ranks(_layouts, 1, [(n, 1, 1, 1, False, False, length) for n, length in REFS], str(root))
    par_logits = run_on_ranks(_layouts, 2, list(CASES.values()), str(root))[-1]  # rank 1: the last PP stage
    ref_index = [REFS.index((c[0], c[6])) for c in CASES.values()]
    ref_dirs = [str(root / f"g1_{i}") for i in ref_index]
    par_dirs = [str(root / f"g2_{i}") for i in range(len(CASES))]
    ((*grads,),) = run_on_ranks(_load_plain, 1, *ref_dirs, *par_dirs)
    return {case: (ref_logits[ref_index[i]], par_logits[i], grads[i], grads[len(CASES) + i])
            for i, case in enumerate(CASES)}


@pytest.mark.parametrize("case", list(CASES))
def test_parallel_layout_equals_one_process(layouts, case):
    """TP=2 (ARC and NV models), TP=2 with sequence parallelism, CP=2 and PP=2 against one process; TP=2, CP=2
    (ARC and NV) and PP=2 also with the fused kernels (whose no-grad logits of TP=2 and PP=2 take the inference-only
    hcm/hcl kernels, on the rank's shards of channels and filters); CP=2 at 512 tokens, where the hcm conv takes its
    left context from the neighbour's halo (at 64 tokens a chunk is shorter than the halo: the all-to-all path)."""
    ref_logits, par_logits, ref, par = layouts[case]
    torch.testing.assert_close(par_logits, ref_logits, **TOL)
    keys = [k for k in ref if not k.endswith("decay") and isinstance(ref[k], torch.Tensor)]
    assert keys and set(keys) <= set(par)
    for k in keys:
        # Gradients are sums over the 128 tokens of the batch; summation order differs between layouts, so compare
        # at fp32 precision relative to each tensor's scale.
        scale = ref[k].abs().max().clamp(min=1.0)
        torch.testing.assert_close(par[k], ref[k], rtol=1e-5, atol=2e-5 * scale, msg=lambda m, k=k: f"{k}: {m}")
        assert (par[k] - ref[k]).norm() <= 1e-5 * ref[k].norm() + 1e-7, k
