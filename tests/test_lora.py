"""LoRA (issue 12): tying rules, recompute gradients, adapters equal to their merge, and the end-to-end flow on the
bundled real phage genomes (train a base, LoRA fine-tune it, resume, predict/generate, merge, TP=2)."""

from pathlib import Path

import pytest
import torch

from cli_helpers import run_cli
from evo2_recipe.utils.spawn import run_on_ranks
from train_helpers import losses, run_train

ROOT = Path(__file__).resolve().parents[1]
SEQS = ["GAGTTTTATCGCTTCCATGACGCAGAAGTTAACACTTTCGGATATTTCTGATGAGTCGAAAAATTATCTTGATAAAGCAGGAATTACTACTGCTTGTTTACG",
        "ACGTTGCAACGGTACCGTTAGGCTAACG", "TTGACCA"]


# ---- rules and math, in one process --------------------------------------------------------------------------------
def _rule_errors(rank, world):
    from megatron.core import parallel_state, tensor_parallel

    from evo2_recipe.models.lora import Evo2LoRA
    from hyena_helpers import tiny_provider

    parallel_state.initialize_model_parallel()
    tensor_parallel.model_parallel_cuda_manual_seed(3)
    out = {}
    cases = {
        "emb_target": (True, ["linear_qkv", "word_embeddings"], []),
        "out_target_tied": (True, ["output_layer"], []),
        "out_target_untied": (False, ["output_layer", "dense"], []),
        "skip_one_side": (True, ["dense"], ["output_layer"]),
        "skip_both_sides": (True, ["dense"], ["word_embeddings", "output_layer"]),
        "overlap": (True, ["dense", "linear_fc1"], ["*.layers.0.mlp.linear_fc1"]),
        "wildcard_target": (True, ["*.layers.1.mixer.dense_projection"], []),
    }
    for name, (tied, targets, skip) in cases.items():
        model = tiny_provider(share_embeddings_and_output_weights=tied).provide()
        try:
            Evo2LoRA(target_modules=targets, skip_freeze_modules=skip, dim=4, alpha=8)(model, training=True)
            out[name] = sorted(n for n, p in model.named_parameters() if p.requires_grad)
        except ValueError as e:
            out[name] = f"ValueError: {e}"
    return out


def test_weight_tying_and_overlap_rules_with_their_messages():
    (out,) = run_on_ranks(_rule_errors, 1)
    assert "word_embeddings cannot be a LoRA target" in out["emb_target"]
    assert "--lora-skip-freeze-modules" in out["emb_target"]
    assert "output_layer cannot be a LoRA target while share_embeddings_and_output_weights=True" in \
        out["out_target_tied"]
    assert "word_embeddings,output_layer" in out["out_target_tied"]
    assert "list both in --lora-skip-freeze-modules or neither" in out["skip_one_side"]
    assert "match both --lora-target-modules and --lora-skip-freeze-modules" in out["overlap"]
    assert "decoder.layers.0.mlp.linear_fc1" in out["overlap"]
    # valid ones: exactly the adapters (and the skip-frozen weights) train
    assert "output_layer.adapter.linear_in.weight" in out["out_target_untied"]
    assert all(".adapter." in n for n in out["out_target_untied"])
    assert "embedding.word_embeddings.weight" in out["skip_both_sides"]
    assert {n for n in out["skip_both_sides"] if ".adapter." not in n} == {"embedding.word_embeddings.weight"}
    assert out["wildcard_target"] == ["decoder.layers.1.mixer.dense_projection.adapter.linear_in.weight",
                                      "decoder.layers.1.mixer.dense_projection.adapter.linear_out.weight"]


def _recompute_grads_and_merge(rank, world):
    from megatron.core import parallel_state, tensor_parallel

    from evo2_recipe.models.lora import Evo2LoRA, merge_lora_
    from hyena_helpers import dna_batch, randomise_weights_, tiny_provider

    parallel_state.initialize_model_parallel()
    tensor_parallel.model_parallel_cuda_manual_seed(4)
    provider = tiny_provider(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    model = randomise_weights_(provider.provide())
    base = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    Evo2LoRA(dim=4, alpha=8, dropout=0.0)(model, training=True)
    tokens, labels = dna_batch(2, 33)
    model(tokens, labels=labels).float().mean().backward()
    grads = {n: (p.grad.abs().sum().item() if p.grad is not None else None)
             for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():  # move B away from zero so that the adapters change the output
        for n, p in model.named_parameters():
            if n.endswith("linear_out.weight"):
                p.normal_(0, 0.05)
    model.eval()
    with torch.no_grad():
        with_adapters = model(tokens)
        merge_lora_(model)
        merged = model(tokens)
    after = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    unchanged = [k for k in base if k in after and torch.equal(base[k], after[k])]
    return grads, with_adapters, merged, set(base) == set(after), unchanged


def test_full_recompute_gives_adapter_gradients_and_merge_equals_adapters():
    (out,) = run_on_ranks(_recompute_grads_and_merge, 1)
    grads, with_adapters, merged, same_keys, unchanged = out
    b_grads = {n: g for n, g in grads.items() if n.endswith("linear_out.weight")}
    assert len(b_grads) == 4 * 4 and all(g is not None and g > 0 for g in b_grads.values()), b_grads
    scale = with_adapters.abs().max().item()  # fp32 summation order differs: 1e-5 of the logit scale
    assert (merged - with_adapters).abs().max().item() <= 1e-5 * max(scale, 1.0), scale
    assert same_keys  # the merged model is the plain base architecture again
    assert not any(k.endswith(("dense_projection.weight", "linear_fc1.weight")) for k in unchanged)


# ---- end to end on real data ---------------------------------------------------------------------------------------
COMMON = ["--model-size", "striped_hyena_tiny", "--seq-length", "128", "--micro-batch-size", "2",
          "--global-batch-size", "2", "--warmup-steps", "1", "--constant-steps", "0", "--eval-iters", "1",
          "--workers", "0", "--log-interval", "1", "--disable-tensorboard-logger", "--cpu"]
RECOMPUTE = ["model.recompute_granularity=full", "model.recompute_method=uniform", "model.recompute_num_layers=1"]


@pytest.fixture(scope="module")
def phage(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    cfg = root / "pre.yaml"
    cfg.write_text(f"- datapaths: [{ROOT / 'examples/data/wichman2005_phix174_like.fasta'}]\n"
                   f"  output_dir: {root / 'data'}\n  output_prefix: phage\n  train_split: 0.8\n"
                   f"  valid_split: 0.1\n  test_split: 0.1\n  append_eod: true\n  seed: 1234\n  overwrite: true\n")
    assert run_cli("preprocess_evo2", "--config", cfg, "--no-progress").returncode == 0
    data = root / "data.yaml"
    data.write_text("".join(f"- dataset_prefix: {root}/data/phage_nucleotide_fast_tokenizer_256_{s}\n"
                            f"  dataset_split: {split}\n  dataset_weight: 1.0\n"
                            for s, split in (("train", "train"), ("val", "validation"), ("test", "test"))))
    run_train(["-d", str(data), *COMMON, "--max-steps", "10", "--eval-interval", "10", "--lr", "3e-3",
               "--result-dir", str(root / "base")])
    return root, data, root / "base" / "evo2" / "checkpoints"


@pytest.fixture(scope="module")
def lora_run(phage):
    root, data, base = phage
    args = ["-d", str(data), *COMMON, "--finetune-ckpt-dir", str(base), "--lora-finetune", "--lora-dim", "4",
            "--lora-alpha", "8", "--lora-dropout", "0.0", "--lora-skip-freeze-modules", "final_norm",
            "--max-steps", "8", "--eval-interval", "4", "--lr", "5e-3", "--result-dir", str(root / "lora"),
            *RECOMPUTE]
    first = run_train([*args, "--early-stop-on-step", "4"])  # interrupted at step 4 ...
    second = run_train(args)  # ... and resumed to step 8
    return first.stdout + first.stderr, second.stdout + second.stderr, root / "lora" / "evo2" / "checkpoints"


def test_lora_finetune_trains_only_adapters_and_resumes(phage, lora_run):
    from evo2_recipe.checkpoint.dcp_utils import load_tensors, resolve_iteration_dir, tensor_keys

    _, _, base = phage
    first, second, ckpt = lora_run
    assert "LoRA: " in first and "trainable parameters of" in first
    trainable = int(first.split("LoRA: ")[1].split(" trainable")[0].replace(",", ""))
    total = int(first.split("trainable parameters of ")[1].split(" ")[0].replace(",", ""))
    assert 0 < trainable < 0.2 * total
    l1, l2 = losses(first), losses(second)
    assert max(l1) == 4 and min(l2) == 5 and max(l2) == 8  # resumed where it stopped
    assert min(l2.values()) < l1[1]
    lora_dir = resolve_iteration_dir(ckpt)
    assert lora_dir.name == "iter_0000008"
    model_keys = {k for k in tensor_keys(lora_dir) if not k.startswith(("optimizer.", "rng_state"))}
    adapters = {k for k in model_keys if ".adapter." in k}
    assert model_keys - adapters == {"decoder.final_norm.weight"}  # plus the skip-frozen norm, nothing else
    assert trainable == sum(t.numel() for t in load_tensors(lora_dir, lambda k: k in model_keys).values())
    outs = load_tensors(lora_dir, lambda k: k.endswith("adapter.linear_out.weight"))
    assert outs and all(t.abs().sum() > 0 for t in outs.values())  # B left zero-init = no gradient reached it
    base_dir = resolve_iteration_dir(base)
    base_bytes = sum(m.size.numel() for k, m in tensor_keys(base_dir).items() if not k.startswith("optimizer."))
    lora_bytes = sum(tensor_keys(lora_dir)[k].size.numel() for k in model_keys)
    assert lora_bytes < 0.2 * base_bytes
    norm = load_tensors(lora_dir, lambda k: k == "decoder.final_norm.weight")["decoder.final_norm.weight"]
    assert not torch.equal(norm, load_tensors(base_dir, lambda k: k == "decoder.final_norm.weight")[
        "decoder.final_norm.weight"])


def _scores_and_generation(rank, world, ckpt_dir, tp=1):
    from evo2_recipe.inference.api import Evo2

    evo = Evo2.from_checkpoint(ckpt_dir, tp=tp, sequence_parallel=False)
    state = {k: v.clone() for k, v in evo.model.state_dict().items() if isinstance(v, torch.Tensor)} if tp == 1 else None
    gen = evo.generate(["ACGTTGCA"], n_tokens=12, top_k=1)
    return evo.score(SEQS, reduce="per_token"), [g["text"] for g in gen], state


def _both(rank, world, a, b):
    return _scores_and_generation(rank, world, a), _scores_and_generation(rank, world, b)


def test_lora_checkpoint_predicts_and_equals_its_merge(phage, lora_run, tmp_path):
    from evo2_recipe.checkpoint.dcp_utils import load_tensors, resolve_iteration_dir

    _, _, base = phage
    _, _, ckpt = lora_run
    merged = tmp_path / "merged"
    r = run_cli("evo2_merge_lora", "--lora-ckpt-dir", ckpt, "--dst-ckpt-dir", merged, env={"EVO2_CPU": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    ((lora, dense),) = run_on_ranks(_both, 1, str(ckpt), str(merged))
    for a, b in zip(lora[0], dense[0]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert lora[1] == dense[1]
    # base weights grafted bit for bit: everything but adapters, the skip-frozen norm and merged linears
    base_t = load_tensors(resolve_iteration_dir(base), lambda k: not k.startswith(("optimizer.", "rng_state")))
    for k in ("embedding.word_embeddings.weight", "decoder.layers.0.mixer.mixer.short_conv.short_conv_weight"):
        if k in base_t:
            assert torch.equal(lora[2][k], base_t[k]), k
    # the CLI tools take the LoRA checkpoint directly
    fa = tmp_path / "s.fa"
    fa.write_text("".join(f">s{i}\n{s}\n" for i, s in enumerate(SEQS)))
    env = {"EVO2_CPU": "1", "OMP_NUM_THREADS": "1"}
    p = run_cli("predict_evo2", "--fasta", fa, "--ckpt-dir", ckpt, "--output-dir", tmp_path / "pred",
                "--output-log-prob-seqs", "--cpu", env=env)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr[-3000:]
    i = run_cli("infer_evo2", "--ckpt-dir", ckpt, "--prompt", "ACGT", "--max-new-tokens", "5", "--top-k", "1", "--cpu",
                env=env)
    assert i.returncode == 0 and "Traceback" not in i.stderr, i.stderr[-3000:]


def test_lora_at_tp2_trains_and_loads_at_tp1(phage, tmp_path):
    root, data, base = phage
    run_train(["-d", str(data), *COMMON, "--finetune-ckpt-dir", str(base), "--lora-finetune", "--lora-dim", "4",
               "--tensor-model-parallel-size", "2", "--max-steps", "2", "--eval-interval", "2",
               "--result-dir", str(tmp_path / "tp2")], nproc=2)
    ckpt = tmp_path / "tp2" / "evo2" / "checkpoints"
    (one,) = run_on_ranks(_scores_and_generation, 1, str(ckpt))
    two = run_on_ranks(_scores_and_generation, 2, str(ckpt), 2)
    for a, b in zip(one[0], two[0][0]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
