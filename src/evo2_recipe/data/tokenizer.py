"""The one nucleotide tokenizer every evo2-recipe tool uses.

Wraps the HF ``tokenizers`` JSON in ``tokenizers/nucleotide_fast_tokenizer_{256,512}``. Ids are Unicode code points
(``A`` = 65) with ``<EOS>``=0, ``<PAD>``=1, ``<BOS>``=2, ``<SEP>``=3, ``<UNK>``=4. Plain sequences take a numpy fast
path that gives the same ids as the HF tokenizer (checked in tests); anything unusual goes through HF.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

EOD_ID = EOS_ID = 0
PAD_ID = 1
BOS_ID = 2
SEP_ID = 3
UNK_ID = 4
_NUM_SPECIAL = 5

# tokenizers/ sits at the repository root (editable install); EVO2_TOKENIZERS_DIR overrides it.
_REPO_TOKENIZERS = Path(__file__).resolve().parents[3] / "tokenizers"


def default_tokenizer_path(vocab_size: int = 256) -> Path:
    """Directory of the bundled tokenizer with ``vocab_size`` 256 or 512."""
    if vocab_size not in (256, 512):
        raise ValueError(f"vocab_size must be 256 or 512, got {vocab_size}")
    root = Path(os.environ.get("EVO2_TOKENIZERS_DIR", _REPO_TOKENIZERS))
    path = root / f"nucleotide_fast_tokenizer_{vocab_size}"
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"bundled tokenizer not found at {path}; install evo2-recipe editable from its repository "
            f"(pip install -e .) or set EVO2_TOKENIZERS_DIR to a folder holding nucleotide_fast_tokenizer_{vocab_size}/"
        )
    return path


class NucleotideTokenizer:
    """Character-level tokenizer loaded from a folder holding ``tokenizer.json``."""

    eod = eos = EOD_ID
    pad = PAD_ID
    bos = BOS_ID
    sep = SEP_ID
    unk = UNK_ID

    def __init__(self, path: str | Path | None = None, *, vocab_size: int = 256):
        self.path = Path(path) if path is not None else default_tokenizer_path(vocab_size)
        json_path = self.path / "tokenizer.json" if self.path.is_dir() else self.path
        if not json_path.is_file():
            raise FileNotFoundError(f"no tokenizer.json at {json_path}: pass a tokenizer folder or tokenizer.json file")
        self._hf = Tokenizer.from_file(str(json_path))
        self.vocab_size = self._hf.get_vocab_size(with_added_tokens=True)
        if self._hf.token_to_id("<EOS>") != EOD_ID or self._hf.token_to_id("<UNK>") != UNK_ID:
            raise ValueError(f"{json_path} is not a nucleotide tokenizer (expected <EOS>=0 ... <UNK>=4)")

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added)."""
        return self.tokenize_array(text).tolist()

    def tokenize_array(self, text: str) -> np.ndarray:
        """Token ids as an int64 array; fast for genome-sized plain ASCII sequences."""
        if "<" not in text:  # '<' could start an added special token such as "<EOS>"
            try:
                ids = np.frombuffer(text.encode("ascii"), dtype=np.uint8)
            except UnicodeEncodeError:
                ids = None
            if ids is not None and (ids.size == 0 or ids.min() >= _NUM_SPECIAL):
                return ids.astype(np.int64)
        return np.asarray(self._hf.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def tokenize_checked(self, text: str, what: str = "sequence") -> np.ndarray:
        """:meth:`tokenize_array`, refusing characters the tokenizer cannot encode (they would become ``<UNK>``).

        Everything the vocabulary holds is accepted: nucleotides in either case, IUPAC codes, and the characters of
        phylogenetic tags such as ``|d__Bacteria;p__Pseudomonadota|``.
        """
        ids = self.tokenize_array(text)
        bad = np.flatnonzero(ids == UNK_ID)
        if bad.size:
            enc = self._hf.encode(text, add_special_tokens=False)
            start = enc.offsets[int(bad[0])][0]
            raise ValueError(f"{what}: character {text[start]!r} at position {start + 1} cannot be encoded by the "
                             f"tokenizer ({self.vocab_size} tokens); remove or replace it")
        return ids

    def detokenize(self, ids) -> str:
        """Inverse of :meth:`tokenize` for ids of real characters; special tokens are dropped."""
        return self._hf.decode([int(i) for i in ids], skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"NucleotideTokenizer(path={str(self.path)!r}, vocab_size={self.vocab_size})"
