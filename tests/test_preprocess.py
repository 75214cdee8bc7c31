"""preprocess_evo2 on the bundled real phage genomes: reproducible bytes, readable datasets, correct transforms."""

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from megatron.core.datasets.indexed_dataset import IndexedDataset

from evo2_recipe.data.fasta import FastaFormatError, iter_fasta
from evo2_recipe.data.preprocess import preprocess, reverse_complement
from evo2_recipe.data.preprocess_config import PreprocessConfig, load_preprocess_configs

ROOT = Path(__file__).resolve().parents[1]
PHAGE = ROOT / "examples" / "data" / "wichman2005_phix174_like.fasta"


def _digest(paths):
    return {s: hashlib.sha256(Path(f"{p}.bin").read_bytes() + Path(f"{p}.idx").read_bytes()).hexdigest()
            for s, p in paths.items()}


def test_reverse_complement_handles_case_and_iupac():
    assert reverse_complement("ACGTacgtN") == "NacgtACGT"
    assert reverse_complement("aaCC") == "GGtt"  # lowercase is complemented too (the reference leaves it)
    assert reverse_complement("RYKM") == "KMRY"


def test_phage_preprocess_is_reproducible_and_readable(tmp_path):
    kw = dict(datapaths=[PHAGE], output_prefix="phage", embed_reverse_complement=True, random_reverse_complement=0.3,
              seed=5, taxonomy_data={"phiX": {"domain": "Viruses", "species": "phiX"}, "C": {"domain": "Viruses", "species": "phiX"}}, prompt_spacer_length=2048)
    a = preprocess(PreprocessConfig(output_dir=tmp_path / "a", **kw), show_progress=False)
    b = preprocess(PreprocessConfig(output_dir=tmp_path / "b", **kw), show_progress=False)
    assert _digest(a) == _digest(b)
    c = preprocess(PreprocessConfig(output_dir=tmp_path / "c", **{**kw, "seed": 6}), show_progress=False)
    assert _digest(a) != _digest(c)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(
        f"phage_nucleotide_fast_tokenizer_256_{s}.{e}" for s in ("train", "val", "test") for e in ("bin", "idx"))
    records = dict(iter_fasta(PHAGE))
    datasets = {s: IndexedDataset(str(p)) for s, p in a.items()}
    assert sum(len(d) for d in datasets.values()) == 2 * len(records)  # forward + reverse complement
    assert all(len(d) > 0 for d in datasets.values())
    tag = "|d__Viruses;p__None;c__None;o__None;f__None;g__None;s__phiX|"
    doc = datasets["train"][0]
    assert doc[-1] == 0  # EOD appended
    text = "".join(map(chr, doc[:-1]))
    assert text.startswith(tag) and text.count(tag) == -(-len(text.replace(tag, "")) // (2048 - len(tag)))
    body = text.replace(tag, "")
    assert body in records.values() or reverse_complement(body) in records.values()


def test_cli_and_bad_inputs(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump([{"datapaths": [str(PHAGE)], "output_prefix": "x", "kingdom": "Viruses"}]))
    with pytest.raises(ValueError, match="'kingdom' is not a preprocessing option"):
        load_preprocess_configs(cfg)
    cfg.write_text(yaml.safe_dump([{"datapaths": [str(PHAGE)], "output_prefix": "x", "trian_split": 1}]))
    proc = subprocess.run([sys.executable, "-m", "evo2_recipe.cli.preprocess", "-c", str(cfg)],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "trian_split" in proc.stderr and "Extra inputs are not permitted" in proc.stderr
    bad = tmp_path / "bad.fa"
    bad.write_text("ACGT\n>r\nACGT\n")
    with pytest.raises(FastaFormatError, match="is not a FASTA header"):
        list(iter_fasta(bad))
    bad.write_text(">r\nACGT\n>r\nACGT\n")
    with pytest.raises(FastaFormatError, match="duplicate record id"):
        list(iter_fasta(bad))
    bad.write_text(">r\r\nACGT\r\nAC\r\n")
    assert list(iter_fasta(bad)) == [("r", "ACGTAC")]  # CRLF tolerated
    out = preprocess(PreprocessConfig(datapaths=[bad], output_prefix="y", output_dir=tmp_path / "o"),
                     show_progress=False)
    ds = IndexedDataset(str(out["train"]))  # keep a reference: items are views into its mmap
    assert np.array_equal(ds[0], np.array([65, 67, 71, 84, 65, 67, 0]))


def test_dimorphilus_config_holds_out_whole_contigs(tmp_path, monkeypatch):
    """The loss-curve corpus (examples/configs/dimorphilus_*.yaml): every split gets whole contigs, each with its
    reverse complement beside it, so validation never sees a training contig in either strand."""
    monkeypatch.chdir(ROOT)  # the config's paths are relative to the repository root, as a user runs it
    (config,) = load_preprocess_configs(ROOT / "examples" / "configs" / "dimorphilus_preprocess.yaml")
    out = preprocess(config.model_copy(update={"output_dir": tmp_path}), show_progress=False)
    dataset_cfg = yaml.safe_load((ROOT / "examples" / "configs" / "dimorphilus_dataset.yaml").read_text())
    assert sorted(Path(e["dataset_prefix"]).name for e in dataset_cfg) == sorted(p.name for p in out.values())
    contigs = {seq.upper() for _, seq in iter_fasta(ROOT / config.datapaths[0])}
    held = {}
    for split, prefix in out.items():
        ds = IndexedDataset(str(prefix))
        bodies = {"".join(map(chr, ds[i][:-1])).upper() for i in range(len(ds))}
        forward = {b for b in bodies if b in contigs}
        assert forward and {reverse_complement(b) for b in forward} == bodies - forward, split
        held[split] = forward
    assert set().union(*held.values()) == contigs
    assert not (held["train"] & held["val"]) and not (held["train"] & held["test"]) and not (held["val"] & held["test"])
