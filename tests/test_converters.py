"""Checkpoint converters: Savanna -> MBridge -> Vortex -> MBridge round trips, strictness, all 12 sizes' key sets."""

import pytest
import torch

from evo2_recipe.checkpoint.mbridge import expected_shapes_many, read_model_tensors
from evo2_recipe.checkpoint.savanna import mbridge_to_savanna, savanna_to_mbridge
from evo2_recipe.checkpoint.vortex import export_to_vortex, import_from_vortex
from evo2_recipe.models.providers import REFERENCE_SIZES, get_provider
from evo2_recipe.utils.spawn import run_on_ranks
from cli_helpers import run_cli
from hyena_helpers import tiny_provider


def _tiny_weights(rank, world, name):
    from megatron.core import parallel_state, tensor_parallel

    parallel_state.initialize_model_parallel()
    tensor_parallel.model_parallel_cuda_manual_seed(21)
    model = tiny_provider(name).provide()
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


def _cli(tool, *args, fresh=False):
    return run_cli(tool, *args, timeout=300, fresh=fresh)


def test_round_trip_tables_arc_model():
    """The key-map tables alone (what the CLIs below call), for the ARC tiny model: Savanna -> MBridge is exact,
    MBridge -> Vortex -> MBridge -> Vortex is bit-identical, and everything Vortex keeps comes back exactly."""
    name = "striped_hyena_tiny"
    (orig,) = run_on_ranks(_tiny_weights, 1, name)
    p = get_provider(name)
    pattern, kw = p.hybrid_override_pattern, dict(rotary_base=p.rotary_base, num_heads=p.num_attention_heads,
                                                  ffn_hidden_size=p.ffn_hidden_size)
    mb1 = savanna_to_mbridge(mbridge_to_savanna(orig, pattern, p.ffn_hidden_size), pattern)
    assert mb1.keys() == orig.keys() and all(torch.equal(mb1[k].float(), orig[k].float()) for k in orig)
    v1 = export_to_vortex(mb1, pattern, **kw)
    mb2 = import_from_vortex(v1, pattern, **kw)
    v2 = export_to_vortex(mb2, pattern, **kw)
    assert v1.keys() == v2.keys() and all(torch.equal(v1[k], v2[k]) for k in v1)
    assert mb2.keys() == mb1.keys()
    for k in mb1:
        if not k.endswith(("filter.p", "filter.gamma", "filter.h", "filter.decay")):
            assert torch.equal(mb2[k], mb1[k]), k


@pytest.mark.parametrize("name", ["striped_hyena_tiny_nv"])  # the CLIs end to end; NV has the extra hcs transform
def test_savanna_mbridge_vortex_mbridge_round_trip(tmp_path, name):
    (orig,) = run_on_ranks(_tiny_weights, 1, name)
    p = get_provider(name)
    sav = mbridge_to_savanna(orig, p.hybrid_override_pattern, p.ffn_hidden_size)
    for k in [k for k in sav if k.endswith(("filter.h", "filter.decay"))]:  # Savanna keeps seq_length taps
        sav[k] = torch.cat([sav[k], torch.zeros(sav[k].shape[0], 64)], dim=1)
    sav["sequential.4.mixer.mixer.filter.t"] = torch.arange(8.0)[None, None]  # ignored buffers
    sav["sequential.5.mixer.rotary_emb.inv_freq"] = torch.ones(8)
    torch.save({"module": sav, "dp_world_size": 1}, tmp_path / "sav.pt")
    common = ["--model-size", name, "--params-dtype", "fp32"]
    r = _cli("evo2_convert_savanna_to_mbridge", "--savanna-ckpt-path", str(tmp_path / "sav.pt"),
             "--output-dir", str(tmp_path / "mb1"), *common)
    assert r.returncode == 0, r.stderr[-2000:]
    mb1, _ = read_model_tensors(tmp_path / "mb1")
    assert mb1.keys() == orig.keys()
    for k in orig:
        assert torch.equal(mb1[k], orig[k].float()), k  # bit-identical (fp32)
    for src, out in (("mb1", "v1.pt"), ("mb2", "v2.pt")):
        if src == "mb2":
            r = _cli("evo2_convert_vortex_to_mbridge", "--vortex-ckpt-path", str(tmp_path / "v1.pt"),
                     "--output-dir", str(tmp_path / "mb2"), *common)
            assert r.returncode == 0, r.stderr[-2000:]
        r = _cli("evo2_export_mbridge_to_vortex", "--mbridge-ckpt-dir", str(tmp_path / src),
                 "--output-path", str(tmp_path / out), "--model-size", name)
        assert r.returncode == 0, r.stderr[-2000:]
        assert {f"{out[:-3]}.{ext}" for ext in ("pt", "yml", "json")} <= {f.name for f in tmp_path.iterdir()}
    other = "striped_hyena_tiny" if name.endswith("_nv") else "striped_hyena_tiny_nv"
    before = sorted(f.name for f in tmp_path.iterdir())
    for size, dst in ((other, "bad.pt"), (name, "v1.pt")):  # wrong model (hcs bias) / existing output
        r = _cli("evo2_export_mbridge_to_vortex", "--mbridge-ckpt-dir", str(tmp_path / "mb1"),
                 "--output-path", str(tmp_path / dst), "--model-size", size)
        assert r.returncode == 2 and ("conv_bias" in r.stderr or "already exists" in r.stderr), r.stderr[-2000:]
    assert sorted(f.name for f in tmp_path.iterdir()) == before  # nothing written, nothing half-written
    v1, v2 = (torch.load(tmp_path / f, weights_only=True) for f in ("v1.pt", "v2.pt"))
    assert v1.keys() == v2.keys()
    for k in v1:
        assert torch.equal(v1[k], v2[k]), k  # MBridge -> Vortex -> MBridge -> Vortex is bit-identical
    mb2, _ = read_model_tensors(tmp_path / "mb2")
    hcs = "decoder.layers.0.mixer.mixer."  # NV: the hcs bias comes back folded into the filter's last tap
    for k in mb1:  # everything else Vortex keeps comes back exactly
        if name.endswith("_nv") and k.startswith(hcs):
            continue
        if not k.endswith(("filter.p", "filter.gamma", "filter.h", "filter.decay")):
            assert torch.equal(mb2[k], mb1[k]), k
    if name.endswith("_nv"):
        assert not mb2[hcs + "conv_bias"].any()
        folded = mb1[hcs + "short_conv.short_conv_weight"].clone()
        folded[:, 0, -1] += mb1[hcs + "conv_bias"]
        assert torch.equal(mb2[hcs + "short_conv.short_conv_weight"], folded)


def test_corrupt_and_mismatched_inputs_leave_nothing(tmp_path):
    (orig,) = run_on_ranks(_tiny_weights, 1, "striped_hyena_tiny")
    p = get_provider("striped_hyena_tiny")
    sav = mbridge_to_savanna(orig, p.hybrid_override_pattern, p.ffn_hidden_size)
    torch.save(sav, tmp_path / "ok.pt")
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    r = _cli("evo2_convert_savanna_to_mbridge", "--savanna-ckpt-path", str(tmp_path / "trunc.pt"),
             "--model-size", "striped_hyena_tiny", "--output-dir", str(tmp_path / "o1"))
    assert r.returncode == 2 and "cannot read Savanna checkpoint" in r.stderr and not (tmp_path / "o1").exists()
    del sav["sequential.3.mixer.mixer.filter.h"]
    sav["sequential.9.unknown.weight"] = torch.zeros(2)
    torch.save(sav, tmp_path / "bad.pt")
    r = _cli("evo2_convert_savanna_to_mbridge", "--savanna-ckpt-path", str(tmp_path / "bad.pt"),
             "--model-size", "striped_hyena_tiny", "--output-dir", str(tmp_path / "o2"))
    assert r.returncode == 2 and "sequential.3.mixer.mixer.filter.h" in r.stderr and not (tmp_path / "o2").exists()
    r = _cli("evo2_convert_savanna_to_mbridge", "--savanna-ckpt-path", str(tmp_path / "ok.pt"),
             "--model-size", "striped_hyena_tiny_nv", "--output-dir", str(tmp_path / "o3"))
    assert r.returncode == 2 and "missing" in r.stderr and not (tmp_path / "o3").exists()  # NV needs hcs bias
    r = _cli("evo2_convert_savanna_to_mbridge", "--savanna-ckpt-path", "arcinstitute/savanna_evo2_1b_base",
             "--model-size", "evo2_1b_base", "--output-dir", str(tmp_path / "o4"))
    assert r.returncode == 2 and "Hugging Face repo id" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pt", "ok.pt", "trunc.pt"]


def test_key_sets_of_all_sizes_in_every_format():
    all_shapes = expected_shapes_many(REFERENCE_SIZES, 512)
    for name in REFERENCE_SIZES:
        p = get_provider(name)
        shapes = all_shapes[name]
        meta = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
        sav = mbridge_to_savanna(meta, p.hybrid_override_pattern, p.ffn_hidden_size)
        back = savanna_to_mbridge(sav, p.hybrid_override_pattern)
        untied = set() if p.share_embeddings_and_output_weights else {"output_layer.weight"}  # no Savanna model
        assert set(back) == set(meta) - untied, name
        vx = export_to_vortex(meta, p.hybrid_override_pattern, rotary_base=p.rotary_base,
                              num_heads=p.num_attention_heads, ffn_hidden_size=p.ffn_hidden_size)
        back = import_from_vortex(vx, p.hybrid_override_pattern, ffn_hidden_size=p.ffn_hidden_size,
                                  rotary_base=p.rotary_base, num_heads=p.num_attention_heads,
                                  tied=p.share_embeddings_and_output_weights, short_conv_bias=p.use_short_conv_bias)
        assert {k: tuple(v.shape) for k, v in back.items()} == shapes, name
        if name == "evo2_1b_base":  # spec table 5.6
            assert tuple(vx["embedding_layer.weight"].shape) == (512, 1920)
            assert tuple(vx["blocks.0.filter.h"].shape) == (128, 1, 7)
            assert tuple(vx["blocks.1.filter.h"].shape) == (128, 1, 128)
            assert tuple(vx["blocks.2.filter.log_poles"].shape) == (1920, 16, 1)
            assert tuple(vx["blocks.3.inner_mha_cls.Wqkv.weight"].shape) == (5760, 1920)
            assert tuple(vx["blocks.3.inner_mha_cls.rotary_emb.inv_freq"].shape) == (64,)
            assert tuple(sav["sequential.2.mixer.hyena_proj_conv.short_conv_weight"].shape) == (5760, 3)
            assert len(vx) == 3 + 25 * 5 + 21 * 4 + 7 * 1 + 7 * 2 + 7 * 3 + 4 * 4  # global, block, hyena, S, D, H, *


def test_vortex_yaml_matches_arc_configs():
    """The exported Vortex YAML carries Arc's evo2 YAML values (spec 1.2 layer indices, 1.5 name table)."""
    from evo2_recipe.checkpoint.vortex import vortex_config

    one_b = vortex_config(get_provider("evo2_1b_base"), 512)
    assert one_b["hcs_layer_idxs"] == [0, 4, 7, 11, 14, 18, 21]
    assert one_b["hcm_layer_idxs"] == [1, 5, 8, 12, 15, 19, 22]
    assert one_b["hcl_layer_idxs"] == [2, 6, 9, 13, 16, 20, 23]
    assert one_b["attn_layer_idxs"] == [3, 10, 17, 24]
    assert {k: one_b[k] for k in ("hidden_size", "num_layers", "num_attention_heads", "inner_mlp_size",
                                  "hcs_filter_groups", "hcm_filter_groups", "hcl_filter_groups",
                                  "short_filter_length", "hcs_filter_length", "hcm_filter_length", "state_size",
                                  "eps", "rotary_emb_base", "vocab_size")} == {
        "hidden_size": 1920, "num_layers": 25, "num_attention_heads": 15, "inner_mlp_size": 5120,
        "hcs_filter_groups": 128, "hcm_filter_groups": 128, "hcl_filter_groups": 1920, "short_filter_length": 3,
        "hcs_filter_length": 7, "hcm_filter_length": 128, "state_size": 16, "eps": 1e-6, "rotary_emb_base": 10000,
        "vocab_size": 512}
    assert one_b["evo2_style_activations"] and one_b["mha_out_proj_bias"] and one_b["tie_embeddings"]
    assert one_b["column_split"] and one_b["interleave"] and not one_b["column_split_hyena"]
    assert "use_interpolated_rotary_pos_emb" not in one_b
    forty = vortex_config(get_provider("evo2_40b"), 512)
    assert forty["attn_layer_idxs"] == [3, 10, 17, 24, 31, 35, 42, 49] and forty["rotary_emb_base"] == 1_000_000
    assert forty["use_interpolated_rotary_pos_emb"] and forty["rotary_emb_scaling_factor"] == 128
    nv = vortex_config(get_provider("striped_hyena_1b_nv_parallel"), 512)
    assert not nv["evo2_style_activations"] and not nv["mha_out_proj_bias"] and not nv["tie_embeddings"]


def _source_logits(rank, world, weights, tokens):
    from megatron.core import parallel_state, tensor_parallel

    parallel_state.initialize_model_parallel()
    tensor_parallel.model_parallel_cuda_manual_seed(1)
    model = tiny_provider("striped_hyena_tiny").provide().eval()
    model.load_state_dict(weights, strict=False)  # no _extra_state entries
    with torch.no_grad():
        return model(tokens)


def _converted_logits(rank, world, ckpt, tokens):
    from evo2_recipe.inference import scoring
    from evo2_recipe.inference.api import Evo2

    evo = Evo2.from_checkpoint(str(ckpt), tp=world)
    with torch.no_grad():
        return scoring.forward_full(evo.model, tokens)


def test_converted_checkpoint_loads_for_inference_and_finetuning(tmp_path):
    """A Savanna conversion (from .pt.partN shards) is a real megatron dist-checkpoint: predict-style loading at TP=1 and TP=2 reproduces
    the source model's logits, and train_evo2 --finetune-ckpt-dir starts from it."""
    from hyena_helpers import dna_batch
    from train_helpers import TINY, run_train

    (orig,) = run_on_ranks(_tiny_weights, 1, "striped_hyena_tiny")
    p = get_provider("striped_hyena_tiny")
    torch.save({"module": mbridge_to_savanna(orig, p.hybrid_override_pattern, p.ffn_hidden_size)},
               tmp_path / "sav.pt")
    data = (tmp_path / "sav.pt").read_bytes()  # as published on the Hub: byte-wise .pt.partN shards
    for i, start in enumerate(range(0, len(data), len(data) // 3 + 1)):
        (tmp_path / f"sav.pt.part{i}").write_bytes(data[start:start + len(data) // 3 + 1])
    (tmp_path / "sav.pt").unlink()
    r = _cli("evo2_convert_savanna_to_mbridge", "--savanna-ckpt-path", str(tmp_path / "sav.pt"), "--model-size",
             "striped_hyena_tiny", "--mbridge-ckpt-dir", str(tmp_path / "mb"), "--params-dtype", "fp32",
             "--seq-length", "64", "--no-te")
    assert r.returncode == 0, r.stderr[-2000:]
    tokens, _ = dna_batch(2, 48, seed=2)
    (expected,) = run_on_ranks(_source_logits, 1, orig, tokens)
    for tp in (1, 2):
        got = run_on_ranks(_converted_logits, tp, tmp_path / "mb", tokens)
        for g in got:
            torch.testing.assert_close(g, expected, rtol=1e-5, atol=1e-5)
    proc = run_train([*TINY, "--max-steps", "2", "--result-dir", str(tmp_path / "ft"), "--experiment-name", "ft",
                      "--finetune-ckpt-dir", str(tmp_path / "mb")])
    assert f"successfully loaded checkpoint from {tmp_path / 'mb'}" in proc.stdout + proc.stderr


def _write_nemo2(rank, world, name, ckpt):
    """A NeMo2 checkpoint as NeMo's MegatronStrategy writes it: megatron dist-checkpoint under ``weights/`` whose
    model keys carry NeMo's ``module.`` prefix (spec 5.4), plus ``context/``."""
    from megatron.core import dist_checkpointing, parallel_state, tensor_parallel

    parallel_state.initialize_model_parallel()
    tensor_parallel.model_parallel_cuda_manual_seed(21)  # the same weights as _tiny_weights
    model = tiny_provider(name).provide()
    (ckpt / "weights").mkdir(parents=True)
    (ckpt / "context").mkdir()
    (ckpt / "context" / "model.yaml").write_text("_target_: nemo.collections.llm.gpt.model.hyena.HyenaModel\n")
    dist_checkpointing.save({"state_dict": model.sharded_state_dict(prefix="module.")}, str(ckpt / "weights"))


def test_nemo2_to_mbridge(tmp_path):
    (orig,) = run_on_ranks(_tiny_weights, 1, "striped_hyena_tiny")
    run_on_ranks(_write_nemo2, 1, "striped_hyena_tiny", tmp_path / "nemo2")
    r = _cli("evo2_convert_nemo2_to_mbridge", "--nemo2-ckpt-dir", str(tmp_path / "nemo2"), "--model-size",
             "striped_hyena_tiny", "--mbridge-ckpt-dir", str(tmp_path / "mb"), "--params-dtype", "fp32",
             "--seq-length", "128", "--vortex-style-fp8")
    assert r.returncode == 0, r.stderr[-2000:]
    mb, iter_dir = read_model_tensors(tmp_path / "mb")
    assert mb.keys() == orig.keys()
    for k in orig:
        assert torch.equal(mb[k], orig[k]), k
    run_config = (iter_dir / "run_config.yaml").read_text()
    assert "seq_length: 128" in run_config and "vortex_style_fp8: true" in run_config  # inherited by predict/infer
    r = _cli("evo2_convert_nemo2_to_mbridge", "--nemo2-ckpt-dir", str(tmp_path / "nemo2" / "context"),
             "--model-size", "striped_hyena_tiny", "--mbridge-ckpt-dir", str(tmp_path / "mb2"))
    assert r.returncode == 2 and "not a NeMo2 checkpoint" in r.stderr and not (tmp_path / "mb2").exists()


def test_converters_keep_source_dtypes_and_refuse_unknown_vortex_tensors(tmp_path):
    """fp32 Vortex -> MBridge -> Vortex is bit-identical without flags; bf16 sources stay bf16 except the filters,
    which are always fp32; --params-dtype casts on request; every importer refuses tensors it cannot place."""
    import yaml

    (orig,) = run_on_ranks(_tiny_weights, 1, "striped_hyena_tiny")
    p = get_provider("striped_hyena_tiny")
    vx = export_to_vortex({k: v.float() for k, v in orig.items()}, p.hybrid_override_pattern,
                          rotary_base=p.rotary_base, num_heads=p.num_attention_heads, ffn_hidden_size=p.ffn_hidden_size)
    torch.save(vx, tmp_path / "fp32.pt")
    common = ["--model-size", "striped_hyena_tiny"]
    r = _cli("evo2_convert_vortex_to_mbridge", "--vortex-ckpt-path", str(tmp_path / "fp32.pt"),
             "--mbridge-ckpt-dir", str(tmp_path / "mb32"), *common)
    assert r.returncode == 0, r.stderr[-2000:]
    mb32, iter_dir = read_model_tensors(tmp_path / "mb32")
    assert {t.dtype for t in mb32.values()} == {torch.float32}
    assert yaml.safe_load((iter_dir / "run_config.yaml").read_text())["model"]["seq_length"] == p.seq_length
    r = _cli("evo2_export_mbridge_to_vortex", "--mbridge-ckpt-dir", str(tmp_path / "mb32"),
             "--output-path", str(tmp_path / "back.pt"), *common, fresh=True)  # a new interpreter's whole output
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Traceback" not in r.stderr + r.stdout and "FP8GlobalStateManager" not in r.stderr  # clean default output
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    assert back.keys() == vx.keys() and all(torch.equal(back[k], vx[k]) and back[k].dtype == vx[k].dtype for k in vx)

    bf = {k: (v if k.endswith(("log_poles", "residues")) or v.dim() == 3 and v.shape[-1] == 128 else v.bfloat16())
          for k, v in vx.items()}  # what Vortex's to_bfloat16_except_pr_lc keeps in fp32
    torch.save(bf, tmp_path / "bf16.pt")
    for flag, out in (([], "mb16"), (["--params-dtype", "fp32"], "mbcast")):
        r = _cli("evo2_convert_vortex_to_mbridge", "--vortex-ckpt-path", str(tmp_path / "bf16.pt"),
                 "--mbridge-ckpt-dir", str(tmp_path / out), *common, *flag)
        assert r.returncode == 0, r.stderr[-2000:]
    mb16, _ = read_model_tensors(tmp_path / "mb16")
    filters = {k for k in mb16 if k.endswith(("filter.h", "filter.decay", "filter.p", "filter.gamma", "filter.R"))}
    assert len(filters) == 5 and all(mb16[k].dtype == torch.float32 for k in filters)
    assert all(mb16[k].dtype == torch.bfloat16 for k in set(mb16) - filters)
    mbcast, _ = read_model_tensors(tmp_path / "mbcast")
    assert {t.dtype for t in mbcast.values()} == {torch.float32}

    stray = dict(vx, **{"blocks.99.bogus.weight": torch.zeros(2)})
    wrong_rope = dict(vx)
    wrong_rope["blocks.3.inner_mha_cls.rotary_emb.inv_freq"] = vx["blocks.3.inner_mha_cls.rotary_emb.inv_freq"] * 2
    for bad, needle in ((stray, "blocks.99.bogus.weight"), (wrong_rope, "rotary_emb.inv_freq")):
        torch.save(bad, tmp_path / "bad.pt")
        r = _cli("evo2_convert_vortex_to_mbridge", "--vortex-ckpt-path", str(tmp_path / "bad.pt"),
                 "--mbridge-ckpt-dir", str(tmp_path / "never"), *common)
        assert r.returncode == 2 and needle in r.stderr and not (tmp_path / "never").exists(), r.stderr[-2000:]
        assert "Traceback" not in r.stderr


def test_one_sequence_length_for_model_and_data():
    from evo2_recipe.training.recipe import apply_overrides, evo2_pretrain_config

    def tiny():
        cfg = evo2_pretrain_config("striped_hyena_tiny", mixed_precision_recipe=None, seq_length=64)
        cfg.dataset.mock = True
        return cfg

    cfg = apply_overrides(tiny(), ["model.seq_length=32"])
    assert cfg.model.seq_length == cfg.dataset.seq_length == 32  # the dataset follows the model
    cfg = apply_overrides(tiny(), ["dataset.seq_length=48"])
    assert cfg.model.seq_length == cfg.dataset.seq_length == 48
    with pytest.raises(ValueError, match="differ"):
        apply_overrides(tiny(), ["model.seq_length=32", "dataset.seq_length=48"])
