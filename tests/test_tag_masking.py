"""Phylogenetic-tag loss mask: every worked example of the reference's tests (spec section 3.6)."""

import pytest
import torch

from evo2_recipe.data.tag_masking import mask_phylogenetic_tags


def _ids(s):
    return [0 if c == "0" else ord(c) for c in s]


def _m(s):
    return mask_phylogenetic_tags(torch.tensor(_ids(s))).tolist()


def _dna_only(s):
    return [1 if c in "ACGTacgt" else 0 for c in s]


@pytest.mark.parametrize("seq,expected", [
    ("A|d0|A", [1, 0, 0, 1, 0, 1]),
    ("tag;_|ATG", [0] * 6 + [1, 1, 1]),
    ("ATG|r_", [1, 1, 1, 0, 0, 0]),
    ("ATG|D", [1, 1, 1, 0, 0]),
    ("ATG|;", [1, 1, 1, 0, 0]),
    ("|d__tag|", [0] * 8),
    ("|D__|ATG", [0] * 5 + [1, 1, 1]),
    ("ATG|D__|", [1, 1, 1] + [0] * 5),
    ("|ATG", [0, 1, 1, 1]),
    ("t|AAAT", [0, 0, 1, 1, 1, 1]),
    ("AAAT|d", [1, 1, 1, 1, 0, 0]),
    ("ACGT0tacg0", [1] * 10),
    ("0ACGT0tacg0aa", [1] * 13),
])
def test_worked_examples(seq, expected):
    assert _m(seq) == expected


@pytest.mark.parametrize("seq", ["ATG|R__tag|TCGA", "ATG|X__tag|TCGA", "ATG|;;;;;|TCGA"])
def test_tag_between_dna_is_masked_whole(seq):
    assert _m(seq) == [1, 1, 1] + [0] * (len(seq) - 7) + [1, 1, 1, 1]


def test_two_tags_only_dna_kept():
    seq = "ATG|d__|CG|r__|AT"
    assert _m(seq) == _dna_only(seq)


def test_cut_tags_at_boundaries():
    s = "cacata|acagataaaataTACAGGGAATA|d__"
    assert _m(s) == [0] * 7 + [1] * 23 + [0] * 4
    s2 = "GAATA0" + s
    assert _m(s2) == [1] * 6 + [0] * 7 + [1] * 23 + [0] * 4
    s3 = "cacata|0acagataaaataTACAGGGAATA"
    assert _m(s3) == [1] * 6 + [0] + [1] * 24


def test_non_dna_kept_by_tag_rule_and_batched_rows():
    s = "GAWTA0cacata|acagaraaaa@taTACAGGGAATA|d__"
    m = _m(s)
    assert m[2] == 1 and m[s.index("@")] == 1 and m[s.index("r")] == 1
    rows = ["ACGT|d__x|ACGTAC", "tag;_|ATGACGTACG", "cacata|acagataa"]
    rows = [r.ljust(16, "A") for r in rows]
    batched = mask_phylogenetic_tags(torch.tensor([_ids(r) for r in rows])).tolist()
    assert batched == [_m(r) for r in rows]
    assert mask_phylogenetic_tags(torch.tensor([ord("|")])).tolist() == [0]
    assert mask_phylogenetic_tags(torch.tensor([])).tolist() == []
