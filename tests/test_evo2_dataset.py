"""Blended training data from two real corpora (phage genomes + Dimorphilus contigs) with correct loss masks."""

import gzip
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from megatron.bridge.data.base import DatasetBuildContext

from evo2_recipe.data.evo2_dataset import Evo2DatasetProvider, MockEvo2Dataset, parse_dataset_config
from evo2_recipe.data.fasta import FastaFormatError, iter_fasta
from evo2_recipe.data.preprocess import preprocess
from evo2_recipe.data.preprocess_config import PreprocessConfig

ROOT = Path(__file__).resolve().parents[1]
PHAGE = ROOT / "examples/data/wichman2005_phix174_like.fasta"
DIMO = ROOT / "tests/data/dimorphilus/ncbi.fasta"
TAG_RE = re.compile(r"\|d__[^|]*\|")


@pytest.fixture(scope="module")
def blend(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    tags = {"phage": {"phiX": {"domain": "Viruses", "species": "phiX"}, "C": {"domain": "Viruses", "species": "phiX"}},
            "dimo": {"CAJFCJ": {"domain": "Eukaryota", "phylum": "Annelida", "species": "Dimorphilus"}}}
    prefixes = {}
    for name, path in (("phage", PHAGE), ("dimo", DIMO)):
        prefixes[name] = preprocess(PreprocessConfig(
            datapaths=[path], output_dir=out, output_prefix=name, embed_reverse_complement=True, seed=3,
            taxonomy_data=tags[name], prompt_spacer_length=4096, train_split=0.6, valid_split=0.2, test_split=0.2),
            show_progress=False)
    entries = [{"dataset_prefix": f"{name}_nucleotide_fast_tokenizer_256_{s}", "dataset_split": split,
                "dataset_weight": w}
               for name, w in (("phage", 0.3), ("dimo", 0.7))
               for s, split in (("train", "train"), ("val", "validation"), ("test", "test"))]
    cfg = out / "blend.yaml"
    cfg.write_text(yaml.safe_dump(entries))
    return cfg, out


def test_blend_config_parsing(blend):
    cfg, out = blend
    per_split = parse_dataset_config(cfg, str(out))
    assert [len(p) for p, _ in per_split] == [2, 2, 2]
    assert per_split[0][1] == pytest.approx([0.3, 0.7])
    with pytest.raises(FileNotFoundError, match="missing .*phage_nucleotide_fast_tokenizer_256_train.bin"):
        parse_dataset_config(cfg, str(out / "elsewhere"))


@pytest.mark.parametrize("eod_pad_in_loss_mask,predict_eod", [(False, False), (True, False), (False, True)])
def test_blended_batches_have_correct_loss_masks(blend, eod_pad_in_loss_mask, predict_eod):
    cfg, out = blend
    from megatron.bridge.training.tokenizers.config import TokenizerConfig
    from megatron.bridge.training.tokenizers.tokenizer import build_tokenizer

    from evo2_recipe.data.tokenizer import default_tokenizer_path

    tok = build_tokenizer(TokenizerConfig(tokenizer_type="HuggingFaceTokenizer",
                                          tokenizer_model=str(default_tokenizer_path(256))))  # what train_evo2 uses
    assert tok.eod == 0 and tok.vocab_size == 256
    provider = Evo2DatasetProvider(seq_length=2048, dataset_config=str(cfg), dataset_dir=str(out), random_seed=5,
                                   eod_pad_in_loss_mask=eod_pad_in_loss_mask, predict_eod=predict_eod,
                                   path_to_cache=str(out / "cache"))
    train, val, test = provider.build_datasets(DatasetBuildContext(40, 8, 8, tokenizer=tok))
    assert len(train) >= 40 and len(val) >= 8  # the blend rounds per-source sample counts up
    loader = torch.utils.data.DataLoader(train, batch_size=4)
    saw_tag = saw_eod = saw_lower = False
    for batch in loader:
        assert batch["tokens"].shape == (4, 2048) and batch["loss_mask"].dtype == torch.float32
        assert not ((batch["tokens"] >= 97) & (batch["tokens"] <= 122)).any()  # inputs upper-cased
        for labels, mask in zip(batch["labels"], batch["loss_mask"]):
            text = "".join(chr(c) if c > 4 else "\0" for c in labels.tolist())
            expected = np.array([c in "ACGTacgt" for c in text], dtype=np.float32)
            for m in TAG_RE.finditer(text):  # complete tags inside the window
                expected[m.start():m.end()] = 0
                saw_tag = True
            eod = labels.numpy() == 0
            expected[eod] = 1.0 if predict_eod else 0.0  # the reference never predicts EOD; ours on request
            saw_eod |= bool(eod.any())
            saw_lower |= bool(re.search("[acgt]", text))
            # windows can cut a tag in half at their edges; compare away from the first/last tag-sized stretch
            inner = slice(120, len(text) - 120)
            assert np.array_equal(mask.numpy()[inner], expected[inner])
    assert saw_tag and saw_eod and saw_lower  # Dimorphilus has soft-masked (lowercase) repeats


def test_mock_dataset_is_the_rotated_arange():
    ds = MockEvo2Dataset(3, 8, 5)
    item = ds[2]
    full = torch.roll(torch.arange(9) % 5, 2)
    assert item["tokens"].tolist() == full[:-1].tolist() and item["labels"].tolist() == full[1:].tolist()
    assert item["loss_mask"].sum() == 8


def test_fasta_bad_inputs(tmp_path):
    f = tmp_path / "x.fa"
    f.write_text(">a\n\n>b\nACGT\n")
    with pytest.raises(FastaFormatError, match="record 'a' has no sequence"):
        list(iter_fasta(f))
    assert list(iter_fasta(f, allow_empty=True)) == [("a", ""), ("b", "ACGT")]
    gz = tmp_path / "y.fa.gz"
    with gzip.open(gz, "wt") as h:
        h.write(">r1 desc\nACGT\nAC\n>r2\nTT\n")
    assert list(iter_fasta(gz)) == [("r1", "ACGTAC"), ("r2", "TT")]
    (tmp_path / "z.fa.gz").write_text("not gzip")
    with pytest.raises(FastaFormatError, match="not gzip data"):
        list(iter_fasta(tmp_path / "z.fa.gz"))
    with pytest.raises(FileNotFoundError, match="FASTA file not found"):
        list(iter_fasta(tmp_path / "missing.fa"))


def test_reference_getitem_case():
    """The reference's dataset test: labels ``a@t|d__t<EOD>#at`` with EOD/PAD masking on."""
    from evo2_recipe.data.evo2_dataset import evo2_loss_mask

    labels = torch.tensor([0 if c == "0" else ord(c) for c in "a@t|d__t0#at"])
    base = torch.tensor([1, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1], dtype=torch.float32)
    mask = evo2_loss_mask(labels, base)
    assert mask.tolist() == [1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 1]
    # default = the reference's mask whatever the base mask says about EOD (its flag changes nothing either)
    assert evo2_loss_mask(labels, torch.ones(12)).tolist() == mask.tolist()
    pad_labels = torch.tensor([ord("A"), ord("c"), 0, 1, 1])  # a document, its EOD, then padding
    assert evo2_loss_mask(pad_labels, torch.ones(5)).tolist() == [1, 1, 0, 0, 0]
    assert evo2_loss_mask(pad_labels, torch.ones(5), predict_eod=True).tolist() == [1, 1, 1, 0, 0]  # EOD only


def test_preprocess_workers_give_identical_bytes(tmp_path):
    kw = dict(datapaths=[PHAGE], output_prefix="w", embed_reverse_complement=True, seed=1)
    one = preprocess(PreprocessConfig(output_dir=tmp_path / "a", workers=1, **kw), show_progress=False)
    two = preprocess(PreprocessConfig(output_dir=tmp_path / "b", workers=2, chunksize=4, **kw), show_progress=False)
    for split in one:
        for ext in ("bin", "idx"):
            assert Path(f"{one[split]}.{ext}").read_bytes() == Path(f"{two[split]}.{ext}").read_bytes()
