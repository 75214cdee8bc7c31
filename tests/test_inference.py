"""predict_evo2 / infer_evo2 / Python API on a tiny trained checkpoint (CPU, gloo)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cli_helpers import run_cli
from evo2_recipe.utils.spawn import run_on_ranks
from train_helpers import TINY, run_train

BIN = Path(sys.executable).parent
SEQS = {"seqA": "ACGTTGCAACGGTACCGTTAGGCTAACGTTGCATGCAAGT", "seqB": "TTGACCA", "seqC": "gattacaGATTACAgattaca" * 2}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    proc = run_train([*TINY, "--max-steps", "4", "--eval-interval", "4", "--result-dir", str(root),
                      "--disable-tensorboard-logger", "--hybrid-override-pattern", "SDH*"], fresh=True)
    assert_clean_output(proc)
    return root / "evo2" / "checkpoints"


def assert_clean_output(proc):
    """Default verbosity: our log lines and real warnings, no dependency tracebacks or import probes."""
    text = proc.stdout + proc.stderr
    assert "Traceback" not in text and "FP8GlobalStateManager" not in text, text[-3000:]


@pytest.fixture(scope="module")
def fasta(tmp_path_factory):
    path = tmp_path_factory.mktemp("fa") / "seqs.fa"
    path.write_text("".join(f">{k} desc\n{v}\n" for k, v in SEQS.items()))
    return path


CLI_ENV = {"EVO2_CPU": "1", "OMP_NUM_THREADS": "1"}


def _cli(tool, args, nproc=1, fresh=False):
    """One process (forked from the warm server unless ``fresh``: then a new interpreter, whose whole output the
    clean-output checks read) or ``nproc`` ranks under torchrun."""
    if nproc == 1:
        return run_cli(tool, *args, "--cpu", env=CLI_ENV, fresh=fresh)
    cmd = [str(BIN / "torchrun"), "--nproc-per-node", str(nproc), "--no-python", str(BIN / tool), *args, "--cpu"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**__import__("os").environ, **CLI_ENV})


def _direct_log_probs(rank, world, ckpt_dir, seqs):
    """Independent reference: plain model forward + log_softmax, one sequence at a time, no padding."""
    from evo2_recipe.inference.api import Evo2

    evo = Evo2.from_checkpoint(ckpt_dir)
    out = []
    for s in seqs:
        ids = torch.tensor([[ord(c) for c in s.upper()]])
        with torch.no_grad():
            logits = evo.model(ids).float()
        lp = torch.log_softmax(logits[0, :-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
        out.append(lp)
    return out


def test_predict_log_probs_equal_direct_forward(ckpt, fasta, tmp_path):
    r = _cli("predict_evo2", ["--fasta", str(fasta), "--ckpt-dir", str(ckpt), "--output-dir", str(tmp_path),
                              "--output-log-prob-seqs", "--log-prob-collapse-option", "per_token",
                              "--micro-batch-size", "2"], fresh=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_clean_output(r)
    pred = torch.load(tmp_path / "predictions__rank_0__dp_rank_0.pt", weights_only=True)
    idx_map = json.loads((tmp_path / "seq_idx_map.json").read_text())
    assert idx_map == {"seqA": 0, "seqB": 1, "seqC": 2}  # sorted record ids
    (ref,) = run_on_ranks(_direct_log_probs, 1, str(ckpt), list(SEQS.values()))
    for row, i in enumerate(pred["seq_idx"].tolist()):
        n = len(list(SEQS.values())[i]) - 1
        torch.testing.assert_close(pred["log_probs_seqs"][row, :n], ref[i], rtol=1e-5, atol=1e-5)
        assert pred["loss_mask"][row, :n].all() and not pred["loss_mask"][row, n:].any()


def test_predict_model_flags_min_length_and_tag_masking(ckpt, tmp_path):
    """Reference flags that the reference parses and ignores do what they say here (or are refused)."""
    tagged = "|d__Bacteria;p__Pseudomonadota|ACGTTGCAACGG"
    fa = tmp_path / "t.fa"
    fa.write_text(f">t\n{tagged}\n")
    r = _cli("predict_evo2", ["--fasta", str(fa), "--ckpt-dir", str(ckpt), "--output-dir", str(tmp_path / "o"),
                              "--output-log-prob-seqs", "--log-prob-collapse-option", "per_token", "--min-length", "80",
                              "--mask-phylogenetic-tags", "--num-layers", "4", "--hybrid-override-pattern", "SDH*"])
    assert r.returncode == 0, r.stderr[-3000:]
    pred = torch.load(tmp_path / "o" / "predictions__rank_0__dp_rank_0.pt", weights_only=True)
    lp, mask = pred["log_probs_seqs"][0], pred["loss_mask"][0]
    assert lp.shape[0] == 79 and mask[:len(tagged) - 1].all() and not mask[len(tagged) - 1:].any()
    tag_end = tagged.rindex("|")
    assert (lp[:tag_end] == 0).all() and (lp[tag_end + 1:len(tagged) - 1] != 0).all()  # tag targets left out
    r = _cli("predict_evo2", ["--fasta", str(fa), "--ckpt-dir", str(ckpt), "--num-layers", "3"])
    assert r.returncode == 2 and "give both --num-layers and --hybrid-override-pattern" in r.stderr, r.stderr[-2000:]
    r = _cli("predict_evo2", ["--fasta", str(fa), "--ckpt-dir", str(ckpt), "--devices", "2"])
    assert r.returncode == 2 and "torchrun --nnodes 1 --nproc-per-node 2" in r.stderr
    r = _cli("predict_evo2", ["--fasta", str(fa), "--ckpt-dir", str(ckpt), "--eden-tokenizer"])
    assert r.returncode == 2 and "--eden-tokenizer is not supported" in r.stderr


def _api_outputs(rank, world, ckpt_dir, tp, cp):
    from evo2_recipe.inference.api import Evo2

    evo = Evo2.from_checkpoint(ckpt_dir, tp=tp, cp=cp)
    seqs = list(SEQS.values())
    return {"short": [evo.score([s], reduce="sum")[0] for s in ("TTGACCA", "A" * 2, "ACGTAC")],  # each alone
            "tags": evo.score(["|d__Bacteria;p__Pseudomonadota|ACGTTGCA"], reduce="per_token"),
            "per_token": evo.score(seqs, reduce="per_token"), "sum": evo.score(seqs, reduce="sum"),
            "rc": evo.score(seqs, reduce="mean", average_reverse_complement=True),
            "bos": evo.score(seqs, reduce="sum", prepend_bos=True),
            "emb": evo.embed(seqs, layer=-2), "emb0": evo.embed(seqs, layer=0)}


def _logits_with_te_style_extra_state(rank, world, ckpt_dir, extra_state):
    """Load with (or without) a Transformer-Engine-style ``_extra_state`` on the final norm, as TE modules have."""
    from evo2_recipe.inference.api import Evo2
    from evo2_recipe.models.hyena.local_layers import RMSNorm

    restored = []
    if extra_state:  # TE keeps FP8 scaling metadata there; a checkpoint written without TE has none
        RMSNorm.get_extra_state = lambda self: torch.tensor([7.0])
        RMSNorm.set_extra_state = lambda self, state: restored.append(state)
    evo = Evo2.from_checkpoint(ckpt_dir)
    keys = {v.key for v in evo.model.sharded_state_dict().values() if hasattr(v, "key")} if extra_state else set()
    with torch.no_grad():
        logits = evo.model(torch.tensor([[ord(c) for c in SEQS["seqA"]]])).float()
    return logits, restored, keys


def test_checkpoint_without_te_extra_state_loads_into_te_style_model(ckpt):
    """Converted and CPU-trained checkpoints hold no TE ``_extra_state``: a TE model loads them (state left fresh)."""
    (plain,) = run_on_ranks(_logits_with_te_style_extra_state, 1, str(ckpt), False)
    (te_style,) = run_on_ranks(_logits_with_te_style_extra_state, 1, str(ckpt), True)
    assert "decoder.final_norm._extra_state" in te_style[2]  # the model really asks for it
    assert te_style[1] == []  # nothing restored: the checkpoint has none
    torch.testing.assert_close(te_style[0], plain[0], rtol=0, atol=0)


def _embeddings_one_load_vs_truncated_model(rank, world, ckpt_dir):
    from evo2_recipe.inference import scoring
    from evo2_recipe.inference.api import Evo2
    from evo2_recipe.inference.loading import load_for_inference

    evo = Evo2.from_checkpoint(ckpt_dir)
    seqs = list(SEQS.values())
    out = {}
    for layer in (0, -2, -1):
        truncated = load_for_inference(ckpt_dir, embedding_layer=layer).model  # built with only the first layers
        tokens, mask = evo._pad(evo.tokenize(seqs))
        with torch.no_grad():
            ref = scoring.forward_full(truncated, tokens, hidden=True)
        out[layer] = (evo.embed(seqs, layer=layer), [ref[b, :int(mask[b].sum())] for b in range(len(seqs))])
    try:
        evo.embed(seqs, layer=99)
    except ValueError as e:
        out["error"] = str(e)
    return out


def test_embeddings_come_from_the_loaded_model(ckpt):
    """``embed`` runs the first layers of the already-loaded model (one load, one model) and equals a model built
    with only those layers."""
    (out,) = run_on_ranks(_embeddings_one_load_vs_truncated_model, 1, str(ckpt))
    for layer in (0, -2, -1):
        for a, b in zip(*out[layer]):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert not torch.equal(out[0][0][0], out[-1][0][0])
    assert "Valid range: -" in out["error"]


@pytest.mark.parametrize("tp,cp", [(2, 1), (1, 2)])
def test_tp_and_cp_match_single_process(ckpt, tp, cp):
    (one,) = run_on_ranks(_api_outputs, 1, str(ckpt), 1, 1)
    two = run_on_ranks(_api_outputs, 2, str(ckpt), tp, cp)
    for r in two:  # every rank returns the full, gathered, natural-order result
        for key in ("sum", "rc", "bos", "short"):
            torch.testing.assert_close(torch.tensor(r[key]), torch.tensor(one[key]), rtol=1e-5, atol=1e-4)
        for key in ("per_token", "emb", "emb0", "tags"):
            for a, b in zip(r[key], one[key]):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
    assert one["emb"][0].shape == (len(SEQS["seqA"]), 64)
    assert sum(x.numel() for x in one["per_token"]) == sum(len(s) - 1 for s in SEQS.values())


def _generation(rank, world, ckpt_dir, tp=1):
    from evo2_recipe.inference.api import Evo2

    evo = Evo2.from_checkpoint(ckpt_dir, tp=tp, sequence_parallel=False)
    prompts = ["ACGTACGGTTAC", "TTGACCATGCAA", "GGA"]  # the two 12-token prompts are prefilled in one forward
    cached = evo.generate(prompts, 12, top_k=1)
    batch = [r["tokens"] for r in cached]
    continuous = [r["tokens"] for r in evo.generate(prompts, 12, top_k=1, max_batch_size=2)]  # 3 prompts, 2 slots
    streamed = {}
    evo.generate(prompts[:1], 12, top_k=1, on_text=lambda i, t: streamed.setdefault(i, []).append(t))
    sampled = [evo.generate(prompts, 12, temperature=0.8, top_p=0.9, seed=s)[1]["tokens"] for s in (1, 1, 2)]
    if tp > 1:
        return batch, continuous, sampled
    alone = [evo.generate([p], 12, top_k=1)[0]["tokens"] for p in prompts]
    # prompt segmentation: 4 prompt tokens prefilled, the rest fed one per step through the cache
    segmented = evo.generate(prompts, 12, top_k=1, prompt_segmentation_threshold=4)
    seg = ([r["tokens"] for r in segmented], [r["log_probs"] for r in segmented], [r["log_probs"] for r in cached])
    # reference: greedy by repeated full forward passes, no cache
    full = []
    for p in prompts:
        ids = [ord(c) for c in p]
        gen = []
        for _ in range(12):
            with torch.no_grad():
                nxt = int(evo.model(torch.tensor([ids])).float()[0, -1, :evo.tokenizer.vocab_size].argmax())
            ids.append(nxt)
            gen.append(nxt)
            if nxt == 0:
                break
        full.append(gen)
    return batch, alone, full, sampled, continuous, "".join(streamed[0]), cached[0]["text"], seg


def test_generation_cached_equals_full_and_mixed_batch_equals_alone(ckpt):
    ((batch, alone, full, sampled, continuous, streamed, text, seg),) = run_on_ranks(_generation, 1, str(ckpt))
    assert batch == full  # cached decoding == repeated full forwards (greedy)
    assert batch == alone  # prompts of different lengths in one batch == one by one
    assert continuous == alone  # continuous batching: each prompt gets what it gets alone
    assert sampled[0] == sampled[1]  # same seed, same sample
    assert streamed == text  # streaming delivers the whole completion, in order
    assert seg[0] == batch  # prompt segmentation (PST) changes memory, not results
    for a, b in zip(seg[1], seg[2]):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-5, atol=1e-5)
    tp2 = run_on_ranks(_generation, 2, str(ckpt), 2)
    for batch2, continuous2, sampled2 in tp2:  # TP=2 (gloo ranks) generates what TP=1 does
        assert batch2 == batch and continuous2 == batch and sampled2[0] == sampled2[1]


def test_infer_cli_jsonl(ckpt, tmp_path):
    fasta = tmp_path / "p.fa"
    fasta.write_text(">a\nacgtacgg\n>b\nGGATC\n>c\nTTGACCAGG\n")
    out_fa = tmp_path / "gen_fa.jsonl"
    r = _cli("infer_evo2", ["--ckpt-dir", str(ckpt), "--prompt-file", str(fasta), "--max-new-tokens", "5",
                            "--top-k", "1", "--max-batch-size", "2", "--output-file", str(out_fa)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert [json.loads(x)["id"] for x in out_fa.read_text().splitlines()] == ["a", "b", "c"]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": "a", "prompt": "acgtacgg"}\n\n{"prompt": "GGATC"}\n')
    out = tmp_path / "gen.jsonl"
    r = _cli("infer_evo2", ["--ckpt-dir", str(ckpt), "--prompt-file", str(prompts), "--max-new-tokens", "5",
                            "--top-k", "1", "--max-batch-size", "2", "--output-file", str(out), "--return-log-probs"],
             fresh=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_clean_output(r)
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [x["id"] for x in recs] == ["a", "2"]
    for x in recs:
        n = x["usage"]["completion_tokens"]
        assert len(x["completion"]) == n == len(x["logprobs"]["completion_logprobs"]) and 1 <= n <= 5
        assert x["finish_reason"] in ("stop", "length")


def test_infer_default_tag_prompt(ckpt, tmp_path):
    """The default prompt is a phylogenetic tag; tag characters are tokens like any other."""
    out = tmp_path / "gen.jsonl"
    r = _cli("infer_evo2", ["--ckpt-dir", str(ckpt), "--max-new-tokens", "4", "--top-k", "1",
                            "--output-file", str(out)], fresh=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_clean_output(r)
    (rec,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert rec["prompt"].startswith("|d__Bacteria;") and rec["usage"]["completion_tokens"] >= 1


def _load_error(rank, world, ckpt_dir, tokenizer_path):
    """The message of the error ``Evo2.from_checkpoint`` raises (the Python API's bad input)."""
    from evo2_recipe.inference.api import Evo2

    try:
        Evo2.from_checkpoint(ckpt_dir, tokenizer_path=tokenizer_path)
    except Exception as e:  # noqa: BLE001 - the test reads the message
        return f"{type(e).__name__}: {e}"
    return "no error"


def test_bad_inputs_give_clear_errors(ckpt, fasta, tmp_path):
    from evo2_recipe.data.tokenizer import default_tokenizer_path

    empty = tmp_path / "empty.fa"
    empty.write_text("")
    bad = tmp_path / "bad.fa"
    bad.write_text(">x\nACGT\u4e2dZ\n")
    cases = [  # (tool, arguments, message on stderr); each exits with status 2
        ("predict_evo2", ["--fasta", empty, "--ckpt-dir", ckpt], "the file is empty"),
        ("predict_evo2", ["--fasta", bad, "--ckpt-dir", ckpt], "character '\u4e2d' at position 5 cannot be encoded"),
        ("predict_evo2", ["--fasta", fasta, "--ckpt-dir", tmp_path / "nope"], "checkpoint not found"),
        ("infer_evo2", ["--ckpt-dir", tmp_path, "--prompt", "ACGT"], "not a Megatron-Bridge checkpoint"),
    ]
    for tool, args, message in cases:
        r = _cli(tool, [str(a) for a in args])
        assert r.returncode == 2 and message in r.stderr, (tool, args, r.stderr[-2000:])
    (err,) = run_on_ranks(_load_error, 1, str(ckpt), str(default_tokenizer_path(512)))
    assert "use the matching tokenizer" in err, err


@pytest.mark.parametrize("chunk_elements", [1, 100, 1 << 25])
def test_token_log_probs_chunked_from_model_dtype_logits(chunk_elements):
    """Per-token log-probs taken a few positions at a time from bf16 logits equal one fp32 log-softmax over the whole
    (B, L, V) tensor (what scoring did before it stopped materialising full-length fp32 logits)."""
    from evo2_recipe.inference.scoring import token_log_probs

    g = torch.Generator().manual_seed(0)
    logits = (4 * torch.randn(2, 37, 16, generator=g)).bfloat16()
    tokens = torch.randint(0, 16, (2, 37), generator=g)
    mask = torch.ones(2, 37, dtype=torch.long)
    mask[1, 30:] = 0
    per_token, scored = token_log_probs(logits, tokens, mask, chunk_elements=chunk_elements)
    ref = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
    assert per_token.dtype == torch.float32 and scored.tolist() == mask[:, 1:].bool().tolist()
    torch.testing.assert_close(per_token, ref * mask[:, 1:], rtol=0, atol=0)
