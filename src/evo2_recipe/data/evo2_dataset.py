"""Training datasets: Evo 2 GPT-style samples with the DNA/tag loss mask, mock data, and blended YAML configs.

* :class:`Evo2Dataset` (megatron-core ``GPTDataset``): labels count in the loss only if they are nucleotides
  ``ACGTacgt`` outside phylogenetic tags (spec 3.6); input tokens are upper-cased (the loss reads the label case for
  the 0.1 lowercase weight). As in the reference, EOD and PAD labels are never predicted by default (its
  ``--eod-pad-in-loss-mask`` selects another class with the same effective mask). ``predict_eod`` (ours, opt-in)
  also trains on the EOD label that ends each document, so generation learns where to stop.
* :class:`MockEvo2Dataset`: the reference's deterministic mock sample (a rotated ``arange`` modulo the vocabulary).
* :func:`parse_dataset_config`: the blended-dataset YAML (spec 2.15) -> megatron ``blend_per_split``.
* :class:`Evo2DatasetProvider`: a Megatron-Bridge dataset provider building all of the above.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from megatron.bridge.data.base import DatasetBuildContext, DatasetProvider
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

from evo2_recipe.data.tag_masking import CONTROL_TAGS, DNA_TOKENS, mask_phylogenetic_tags
from evo2_recipe.data.tokenizer import EOD_ID

logger = logging.getLogger(__name__)
SPLITS = ("train", "validation", "test")
_DNA = torch.tensor(DNA_TOKENS)
_CONTROL = torch.tensor(CONTROL_TAGS)


def evo2_loss_mask(labels: torch.Tensor, base_mask: torch.Tensor, *, predict_eod: bool = False) -> torch.Tensor:
    """Loss mask of spec 3.6: nucleotide labels outside tags; with ``predict_eod`` the EOD label too (PAD never)."""
    keep = torch.isin(labels, _DNA.to(labels.device)) & ~torch.isin(labels, _CONTROL.to(labels.device))
    if predict_eod:
        keep |= labels == EOD_ID
    tags = mask_phylogenetic_tags(labels, eod_token_id=EOD_ID).to(base_mask.dtype)
    return base_mask * keep.to(base_mask.dtype) * tags


def upper_case_tokens(tokens: torch.Tensor) -> torch.Tensor:
    lower = (tokens >= ord("a")) & (tokens <= ord("z"))
    return torch.where(lower, tokens - 32, tokens)


class Evo2Dataset(GPTDataset):
    """GPT dataset over preprocessed Evo 2 data; set the class attribute via :func:`evo2_dataset_class`."""

    eod_pad_in_loss_mask = False  # the reference's variant: GPTDataset's EOD/PAD mask as the base (same result)
    predict_eod = False

    def __getitem__(self, idx):
        item = super().__getitem__(idx)
        base = item["loss_mask"] if self.eod_pad_in_loss_mask else torch.ones_like(item["loss_mask"])
        item["loss_mask"] = evo2_loss_mask(item["labels"], base, predict_eod=self.predict_eod)
        item["tokens"] = upper_case_tokens(item["tokens"])
        return item


class Evo2DatasetPadEodLossMask(Evo2Dataset):
    eod_pad_in_loss_mask = True


class Evo2DatasetPredictEod(Evo2Dataset):
    predict_eod = True


class MockEvo2Dataset(torch.utils.data.Dataset):
    """Deterministic mock data: sample ``idx`` is ``roll(arange(S+1) % V, idx)``; mask all ones."""

    def __init__(self, num_samples: int, seq_length: int, vocab_size: int):
        self.num_samples, self.seq_length, self.vocab_size = num_samples, seq_length, vocab_size

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        seq = torch.roll(torch.arange(self.seq_length + 1) % self.vocab_size, int(idx))
        return {"tokens": seq[:-1].clone(), "labels": seq[1:].clone(),
                "loss_mask": torch.ones(self.seq_length, dtype=torch.float32),
                "position_ids": torch.arange(self.seq_length)}


def _resolve_prefix(prefix: str, dataset_dir: str | None) -> str:
    path = Path(prefix)
    if not path.is_absolute():
        path = Path(dataset_dir or ".") / path
    path = path.resolve()
    missing = [f"{path}{ext}" for ext in (".bin", ".idx") if not Path(f"{path}{ext}").is_file()]
    if missing:
        raise FileNotFoundError(f"dataset_prefix {prefix!r} -> {path}: missing {', '.join(missing)} "
                                f"(give the prefix without .bin/.idx; relative prefixes resolve against "
                                f"--dataset-dir or the current directory)")
    return str(path)


def parse_dataset_config(config_path: str | Path, dataset_dir: str | None = None) -> list[tuple[list[str], list[float]]]:
    """Read the blended-dataset YAML into megatron's ``blend_per_split`` (train, validation, test)."""
    config_path = Path(config_path)
    if not config_path.is_file():
        raise FileNotFoundError(f"dataset config not found: {config_path}")
    entries = yaml.safe_load(config_path.read_text())
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{config_path}: expected a YAML list of {{dataset_prefix, dataset_weight, dataset_split}}")
    per_split: dict[str, tuple[list[str], list[float]]] = {s: ([], []) for s in SPLITS}
    for i, entry in enumerate(entries):
        unknown = set(entry) - {"dataset_prefix", "dataset_weight", "dataset_split"}
        if unknown or not {"dataset_prefix", "dataset_weight", "dataset_split"} <= set(entry):
            raise ValueError(f"{config_path}: entry #{i} must have exactly dataset_prefix, dataset_weight and "
                             f"dataset_split (got {sorted(entry)})")
        split = entry["dataset_split"]
        if split not in SPLITS:
            raise ValueError(f"{config_path}: entry #{i}: dataset_split {split!r} is not one of {SPLITS}")
        weight = float(entry["dataset_weight"])
        if weight <= 0:
            raise ValueError(f"{config_path}: entry #{i}: dataset_weight must be > 0")
        per_split[split][0].append(_resolve_prefix(str(entry["dataset_prefix"]), dataset_dir))
        per_split[split][1].append(weight)
    empty = [s for s in SPLITS if not per_split[s][0]]
    if empty:
        raise ValueError(f"{config_path}: no datasets for split(s) {empty}; every split needs at least one entry")
    return [(prefixes, [w / sum(weights) for w in weights]) for prefixes, weights in per_split.values()]


@dataclass(kw_only=True)
class Evo2DatasetProvider(DatasetProvider):
    """Megatron-Bridge dataset provider for ``train_evo2``: blended preprocessed data, mock data, a FASTA file, or
    Sharded-Eden SQLite windows (:mod:`evo2_recipe.data.window_dataset`)."""

    seq_length: int
    dataset_config: str | None = None
    dataset_dir: str | None = None
    mock: bool = False
    fasta_file: str | None = None
    sequence_db_dir: str | None = None
    window_dbs: dict[str, str] | None = None  # split -> Sharded-Eden window database
    stride: int = 7992
    window_min_length_threshold: int = 0
    rc_aug: bool = False
    random_seed: int = 1234
    eod_pad_in_loss_mask: bool = False
    predict_eod: bool = False
    path_to_cache: str | None = None
    dataloader_type: str | None = "single"
    skip_getting_attention_mask_from_dataset: bool = True
    tokenizer: object = None  # set by Megatron-Bridge setup; also used to save tokenizer/ into checkpoints

    def build_datasets(self, context: DatasetBuildContext):
        sizes = [context.train_samples, context.valid_samples, context.test_samples]
        if self.mock:
            vocab = context.tokenizer.vocab_size if context.tokenizer is not None else 256
            return tuple(MockEvo2Dataset(n, self.seq_length, vocab) for n in sizes)
        if self.fasta_file is not None or self.sequence_db_dir is not None:
            return self._window_datasets(sizes)
        if self.dataset_config is None:
            raise ValueError("Evo2DatasetProvider needs dataset_config (a blended-dataset YAML) or mock=True")
        config = GPTDatasetConfig(
            random_seed=self.random_seed, sequence_length=self.seq_length,
            blend_per_split=parse_dataset_config(self.dataset_config, self.dataset_dir),
            tokenizer=context.tokenizer, path_to_cache=self.path_to_cache, reset_position_ids=False,
            reset_attention_mask=False, create_attention_mask=False, eod_mask_loss=self.eod_pad_in_loss_mask,
            mmap_bin_files=True,
        )
        if self.predict_eod and self.eod_pad_in_loss_mask:
            raise ValueError("predict_eod and eod_pad_in_loss_mask contradict each other; choose one")
        cls = (Evo2DatasetPredictEod if self.predict_eod else
               Evo2DatasetPadEodLossMask if self.eod_pad_in_loss_mask else Evo2Dataset)
        return BlendedMegatronDatasetBuilder(cls, sizes, lambda: True, config).build()


    def _window_datasets(self, sizes):
        from evo2_recipe.data import window_dataset as wd

        common = dict(min_length=self.window_min_length_threshold, rc_aug=self.rc_aug, seed=self.random_seed)
        if self.fasta_file is not None:
            per_split = wd.fasta_window_datasets(self.fasta_file, self.seq_length, self.stride, **common)
        else:
            per_split = wd.eden_window_datasets(self.sequence_db_dir, self.window_dbs or {}, self.seq_length,
                                                self.stride, **common)
        for split, ds in per_split.items():
            logger.info("%s split: %d windows of %d tokens", split, len(ds), self.seq_length)
        return tuple(None if not n else wd.ResampledDataset(per_split[split], n, shuffle=split == "train",
                                                             seed=self.random_seed)
                     for split, n in zip(wd.SPLITS, sizes))


def dataset_token_counts(prefix: str) -> int:
    """Number of tokens in an indexed dataset (for logging / sanity checks)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    return int(np.sum(IndexedDataset(prefix).sequence_lengths))
