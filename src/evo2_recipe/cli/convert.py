"""Checkpoint converters (thin wrappers): Savanna/NeMo2/Vortex -> Megatron-Bridge and Megatron-Bridge -> Vortex.

    evo2_convert_savanna_to_mbridge --savanna-ckpt-path savanna_evo2_1b_base.pt --model-size evo2_1b_base \
        --mbridge-ckpt-dir mb [--tokenizer-path T] [--seq-length 8192] [--mixed-precision-recipe bf16_mixed]
    evo2_convert_nemo2_to_mbridge --nemo2-ckpt-dir nemo2_1b --model-size evo2_1b_base --mbridge-ckpt-dir mb \
        [--vortex-style-fp8]
    evo2_export_mbridge_to_vortex --mbridge-ckpt-dir mb --model-size evo2_1b_base --output-path evo2_1b.pt
        (also writes evo2_1b.yml, the Vortex config that runs it, and evo2_1b.json)
    evo2_convert_vortex_to_mbridge --vortex-ckpt-path evo2_1b.pt --model-size evo2_1b_base --mbridge-ckpt-dir mb2

The flags are the reference's (``--output-dir`` is an alias of ``--mbridge-ckpt-dir``). The written checkpoints are
what ``train_evo2`` writes (megatron dist-checkpoint, ``run_config.yaml``, tokenizer), so ``predict_evo2``,
``infer_evo2`` and ``train_evo2 --finetune-ckpt-dir`` load them.

Every converter checks that the result covers the model exactly (names and shapes) and writes to a temporary path
that is renamed only when complete.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from evo2_recipe.cli.common import setup_logging

log = logging.getLogger(__name__)
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _parser(prog: str, src_flag: str, src_help: str, *, writes_mbridge: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument(src_flag, required=True, help=src_help)
    p.add_argument("--model-size", required=True, help="provider key, e.g. evo2_1b_base")
    p.add_argument("-v", "--verbose", action="store_true", help="DEBUG logging")
    if writes_mbridge:
        p.add_argument("--mbridge-ckpt-dir", "--output-dir", dest="output_dir", required=True,
                       help="output checkpoint root (must not exist)")
        p.add_argument("--tokenizer-path", help="HF tokenizer directory (default: the bundled nucleotide tokenizer "
                                                "whose vocabulary matches the embedding rows)")
        p.add_argument("--seq-length", type=int, help="sequence length stored in run_config.yaml (default: the "
                                                      "model size's, e.g. 1048576 for evo2_7b)")
        p.add_argument("--mixed-precision-recipe", default="bf16_mixed",
                       help="Megatron-Bridge precision recipe stored for later runs (default bf16_mixed)")
        p.add_argument("--params-dtype", choices=sorted(_DTYPES),
                       help="cast the written weights to this dtype (default: keep each tensor's source dtype); the "
                            "Hyena filters are always written in fp32")
    p.add_argument("--cpu", action="store_true",
                   help="accepted for compatibility: the converters always run on the CPU (no GPU is touched)")
    p.add_argument("--no-te", action="store_true",
                   help="accepted for compatibility: this recipe uses the same parameter names with and without "
                        "Transformer Engine, so nothing changes")
    return p


def _run(p, fn) -> int:
    try:
        fn()
    except (FileNotFoundError, FileExistsError, ValueError, KeyError) as e:
        p.exit(2, f"{p.prog}: error: {e}\n")
    return 0


def _write(tensors, a, *, vortex_style_fp8: bool = False) -> None:
    from evo2_recipe.checkpoint.mbridge import checkpoint_tokenizer_dir, write_model_checkpoint
    from evo2_recipe.training.recipe import converted_checkpoint_config

    if a.params_dtype:
        log.info("casting weights to %s as asked by --params-dtype (Hyena filters stay fp32)", a.params_dtype)
    tokenizer_dir = checkpoint_tokenizer_dir(tensors, a.tokenizer_path)
    run_config = converted_checkpoint_config(
        a.model_size, vocab_size=tensors["embedding.word_embeddings.weight"].shape[0], tokenizer_dir=tokenizer_dir,
        seq_length=a.seq_length, mixed_precision_recipe=a.mixed_precision_recipe, vortex_style_fp8=vortex_style_fp8)
    write_model_checkpoint(tensors, a.output_dir, model_size=a.model_size, run_config=run_config,
                           tokenizer_dir=tokenizer_dir, params_dtype=_DTYPES[a.params_dtype] if a.params_dtype else None)


def _provider(model_size: str):
    from evo2_recipe.models.providers import get_provider

    return get_provider(model_size)


def _parse(p, argv):
    a = p.parse_args(argv)
    setup_logging(a.verbose)
    from evo2_recipe.compat import cpu

    cpu.enable()  # the converters never touch a GPU; megatron builds layout-only models on the CPU
    return a


def savanna_main(argv=None) -> int:
    p = _parser("evo2_convert_savanna_to_mbridge", "--savanna-ckpt-path",
                "local .pt (or .pt.partN shards), or a Hugging Face repo id already in the local cache")
    p.add_argument("--revision", help="Hugging Face commit of a repo id (looked up in the local cache)")
    a = _parse(p, argv)

    def go():
        from evo2_recipe.checkpoint.savanna import load_savanna_state, savanna_to_mbridge

        prov = _provider(a.model_size)
        state = load_savanna_state(a.savanna_ckpt_path, revision=a.revision)
        _write(savanna_to_mbridge(state, prov.hybrid_override_pattern), a)
    return _run(p, go)


def nemo2_main(argv=None) -> int:
    p = _parser("evo2_convert_nemo2_to_mbridge", "--nemo2-ckpt-dir", "NeMo2 checkpoint (context/, weights/)")
    p.add_argument("--vortex-style-fp8", action="store_true",
                   help="store vortex_style_fp8 in the provider (FP8-sensitive original 1b/40b checkpoints)")
    a = _parse(p, argv)

    def go():
        from evo2_recipe.checkpoint.nemo2 import read_nemo2_model_tensors

        _write(read_nemo2_model_tensors(a.nemo2_ckpt_dir), a, vortex_style_fp8=a.vortex_style_fp8)
    return _run(p, go)


def export_vortex_main(argv=None) -> int:
    p = _parser("evo2_export_mbridge_to_vortex", "--mbridge-ckpt-dir",
                "Megatron-Bridge checkpoint root or iter_NNNNNNN folder", writes_mbridge=False)
    p.add_argument("--output-path", required=True, help="output .pt (a .yml Vortex config and .json go beside it)")
    a = _parse(p, argv)

    def go():
        import yaml

        from evo2_recipe.checkpoint.mbridge import check_coverage, expected_shapes, read_model_tensors
        from evo2_recipe.checkpoint.vortex import export_to_vortex, unfaithful_export_reasons, vortex_config

        prov = _provider(a.model_size)
        out = Path(a.output_path)
        sidecars = {out.with_suffix(".json"): None, out.with_suffix(".yml"): None}
        for path in (out, *sidecars):
            if path.exists():
                raise FileExistsError(f"{path} already exists; choose another --output-path or remove it")
        tensors, _ = read_model_tensors(a.mbridge_ckpt_dir)
        vocab = tensors["embedding.word_embeddings.weight"].shape[0]
        check_coverage(tensors, expected_shapes(a.model_size, vocab), f"{a.mbridge_ckpt_dir} as {a.model_size}")
        for reason in unfaithful_export_reasons(prov):
            log.warning("Vortex export of %s: %s", a.model_size, reason)
        vortex = export_to_vortex(tensors, prov.hybrid_override_pattern, rotary_base=prov.rotary_base,
                                  num_heads=prov.num_attention_heads, ffn_hidden_size=prov.ffn_hidden_size)
        meta = {k: getattr(prov, k) for k in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size",
                                              "seq_length", "hybrid_override_pattern", "num_groups_hyena")}
        sidecars[out.with_suffix(".json")] = json.dumps({**meta, "vocab_size": vocab}, indent=2)
        sidecars[out.with_suffix(".yml")] = yaml.safe_dump(vortex_config(prov, vocab, model_name=out.stem),
                                                           sort_keys=False)
        tmp = out.with_suffix(out.suffix + ".tmp")
        out.parent.mkdir(parents=True, exist_ok=True)
        try:  # the .pt is renamed last: if it exists, its config files are complete
            torch.save(vortex, tmp)
            for path, text in sidecars.items():
                path.with_suffix(path.suffix + ".tmp").write_text(text)
                path.with_suffix(path.suffix + ".tmp").replace(path)
            tmp.replace(out)
        except BaseException:
            for path in (tmp, *sidecars, *(q.with_suffix(q.suffix + ".tmp") for q in sidecars)):
                path.unlink(missing_ok=True)
            raise
        log.info("wrote %s (+ %s: Vortex YAML, %s)", out, out.with_suffix(".yml").name,
                 out.with_suffix(".json").name)
    return _run(p, go)


def import_vortex_main(argv=None) -> int:
    p = _parser("evo2_convert_vortex_to_mbridge", "--vortex-ckpt-path", "Vortex .pt")
    a = _parse(p, argv)

    def go():
        from evo2_recipe.checkpoint.vortex import import_from_vortex

        prov = _provider(a.model_size)
        path = Path(a.vortex_ckpt_path)
        if not path.is_file():
            raise FileNotFoundError(f"Vortex checkpoint not found: {path}")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"cannot read {path}: {e}") from e
        if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
            raise ValueError(f"{path} is not a Vortex state dict (a flat dict of tensors)")
        _write(import_from_vortex(state, prov.hybrid_override_pattern, ffn_hidden_size=prov.ffn_hidden_size,
                                  rotary_base=prov.rotary_base, num_heads=prov.num_attention_heads,
                                  tied=prov.share_embeddings_and_output_weights,
                                  short_conv_bias=prov.use_short_conv_bias), a)
    return _run(p, go)


if __name__ == "__main__":
    sys.exit(savanna_main())
