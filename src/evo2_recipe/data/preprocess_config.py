"""Schema of the ``preprocess_evo2`` YAML: a list of :class:`PreprocessConfig` (the reference's fields, same defaults).

Unlike the reference, unknown keys are an error (a misspelt key is otherwise silently ignored), and legacy keys from
old documentation get a hint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

_LEGACY_HINTS = {
    "kingdom": "use 'domain' inside a taxonomy_data lineage",
    "tokenizer_type": "the tokenizer is always the nucleotide tokenizer; use hf_tokenizer_model_path to pick another",
    "vocab_file": "use hf_tokenizer_model_path",
    "pretrained_tokenizer_model": "use hf_tokenizer_model_path",
}


class TaxonomyLineage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    domain: str | None = None
    phylum: str | None = None
    clazz: str | None = None
    order: str | None = None
    family: str | None = None
    genus: str | None = None
    species: str | None = None


class PreprocessConfig(BaseModel):
    """One preprocessing job: FASTA files -> train/val/test Megatron indexed datasets."""

    model_config = ConfigDict(extra="forbid")

    datapaths: list[Path] = []
    output_dir: Path | None = None
    output_prefix: str | None = None
    train_split: float = 0.7
    valid_split: float = 0.2
    test_split: float = 0.1
    overwrite: bool = False
    embed_reverse_complement: bool = False
    random_reverse_complement: float = 0.0
    random_lineage_dropout: float = 0.0
    transcribe: Literal["transcribe", "back_transcribe"] | None = None
    force_uppercase: bool = False
    indexed_dataset_dtype: str = "uint8"
    append_eod: bool = True
    enforce_sample_length: int | None = None
    ftfy: bool = False
    hf_tokenizer_model_path: Path | None = None
    hf_tokenizer_model_name: str | None = None
    hf_tokenizer_trust_remote_code: bool = False
    workers: int = 1
    preproc_concurrency: int = 100000
    chunksize: int = 1
    drop_empty_sequences: bool = False
    nnn_filter: bool = False
    seed: int | None = None
    taxonomy_data: dict[str, TaxonomyLineage] = {}
    prompt_spacer_length: int = 131072

    @model_validator(mode="before")
    @classmethod
    def _explain_unknown_keys(cls, data):
        if isinstance(data, dict):
            for key, hint in _LEGACY_HINTS.items():
                if key in data:
                    raise ValueError(f"'{key}' is not a preprocessing option: {hint}")
        return data

    @field_validator("train_split", "valid_split", "test_split", "random_reverse_complement", "random_lineage_dropout")
    @classmethod
    def _non_negative(cls, v: float) -> float:
        if v < 0:
            raise ValueError("must be >= 0")
        return v

    @field_validator("workers", "chunksize", "preproc_concurrency", "prompt_spacer_length")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError("must be >= 1")
        return v

    @model_validator(mode="after")
    def _check(self):
        if self.train_split + self.valid_split + self.test_split <= 0:
            raise ValueError("train_split + valid_split + test_split must be > 0")
        if not self.datapaths:
            raise ValueError("datapaths is empty: list at least one FASTA file")
        if self.output_prefix is None:
            raise ValueError("output_prefix is required (the reference writes files named 'None_...')")
        return self


def load_preprocess_configs(path: str | Path) -> list[PreprocessConfig]:
    """Parse a preprocessing YAML (a list of configs, or a single mapping). Relative paths resolve from the CWD."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"preprocessing config not found: {path}")
    raw = yaml.safe_load(path.read_text())
    if isinstance(raw, dict):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"{path}: expected a YAML list of preprocessing configs")
    configs = []
    for i, item in enumerate(raw):
        try:
            configs.append(PreprocessConfig(**item))
        except ValidationError as e:
            raise ValueError(f"{path}: config #{i}: {e}") from None
    return configs
