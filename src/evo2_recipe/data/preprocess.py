"""``preprocess_evo2``: FASTA files -> tokenized train/val/test Megatron indexed datasets (``.bin``/``.idx``).

Reproducible by construction (the reference is not): every random choice for a record (split, random reverse
complement, lineage dropout) comes from a generator seeded by ``(seed, file index, record index)``, records are read
in file order, and worker results are consumed in order. Same config and inputs -> identical bytes. Outputs are
written under temporary names and renamed only when all three splits are complete.
"""

from __future__ import annotations

import logging
import multiprocessing
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from evo2_recipe.data.fasta import iter_fasta
from evo2_recipe.data.preprocess_config import PreprocessConfig, TaxonomyLineage
from evo2_recipe.data.tokenizer import EOD_ID, PAD_ID, NucleotideTokenizer, default_tokenizer_path

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
# Complement including IUPAC codes, keeping case (the reference leaves lowercase bases uncomplemented).
_COMPLEMENT = str.maketrans("ACGTURYSWKMBDHVNacgturyswkmbdhvn", "TGCAAYRSWMKVHDBNtgcaayrswmkvhdbn")


def reverse_complement(seq: str) -> str:
    return seq.translate(_COMPLEMENT)[::-1]


def lineage_tag(lineage: TaxonomyLineage, rng: np.random.Generator | None = None, dropout: float = 0.0) -> str:
    """``|d__...;p__...;c__...;o__...;f__...;g__...;s__...|`` with each field dropped to None w.p. ``dropout``."""
    parts = []
    for prefix, field in zip("dpcofgs", ("domain", "phylum", "clazz", "order", "family", "genus", "species")):
        value = getattr(lineage, field)
        if dropout > 0 and rng is not None and rng.random() < dropout:
            value = None
        parts.append(f"{prefix}__{value}")
    return "|" + ";".join(parts) + "|"


def tokenizer_description(config: PreprocessConfig) -> str:
    if config.hf_tokenizer_model_path is not None:
        return config.hf_tokenizer_model_path.name.lower().replace(" ", "")
    if config.hf_tokenizer_model_name is not None:
        return config.hf_tokenizer_model_name.replace("/", "--").replace(":", "--").lower()
    return "nucleotide_fast_tokenizer_256"


def output_paths(config: PreprocessConfig) -> dict[str, Path]:
    """``{split: prefix path}``; each prefix gets ``.bin`` and ``.idx``."""
    out_dir = config.output_dir or Path(".")
    stem = f"{config.output_prefix}_{tokenizer_description(config)}"
    return {split: out_dir / f"{stem}_{split}" for split in SPLITS}


def _load_tokenizer(config: PreprocessConfig) -> NucleotideTokenizer:
    if config.hf_tokenizer_model_name is not None:
        raise ValueError(
            "hf_tokenizer_model_name needs network access to a model hub; download the tokenizer and pass its folder "
            "as hf_tokenizer_model_path instead"
        )
    path = config.hf_tokenizer_model_path or default_tokenizer_path(256)
    if not Path(path).exists():
        raise FileNotFoundError(f"hf_tokenizer_model_path does not exist: {path}")
    return NucleotideTokenizer(path)


@dataclass
class _Record:
    file_idx: int
    rec_idx: int
    seq_id: str
    seq: str


def _record_rng(config: PreprocessConfig, rec: _Record) -> np.random.Generator:
    seed = 0 if config.seed is None else config.seed
    return np.random.default_rng([seed, rec.file_idx, rec.rec_idx, zlib.crc32(rec.seq_id.encode())])


def _process_record(config: PreprocessConfig, tokenizer: NucleotideTokenizer, rec: _Record) -> list[np.ndarray]:
    """All documents (token arrays) produced by one FASTA record."""
    rng = _record_rng(config, rec)
    lineage = next((lin for key, lin in config.taxonomy_data.items() if key in rec.seq_id), None)
    seq = rec.seq
    if config.random_reverse_complement > 0 and rng.random() < config.random_reverse_complement:
        seq = reverse_complement(seq)
    variants = [seq, reverse_complement(seq)] if config.embed_reverse_complement else [seq]
    docs = []
    for text in variants:
        if config.force_uppercase:
            text = text.upper()
        if config.transcribe == "transcribe":
            text = text.replace("T", "U").replace("t", "u")
        elif config.transcribe == "back_transcribe":
            text = text.replace("U", "T").replace("u", "t")
        if not text and config.drop_empty_sequences:
            continue
        if config.nnn_filter and "NNN" in text.upper():
            continue
        if lineage is not None:
            tag = lineage_tag(lineage, rng, config.random_lineage_dropout)
            step = config.prompt_spacer_length - len(tag)
            if step <= 0:
                raise ValueError(f"prompt_spacer_length {config.prompt_spacer_length} is shorter than the tag {tag}")
            text = "".join(tag + text[i:i + step] for i in range(0, max(len(text), 1), step))
        if config.ftfy:
            import ftfy  # optional dependency

            text = ftfy.fix_text(text)
        ids = tokenizer.tokenize_array(text)
        if config.append_eod:
            ids = np.append(ids, EOD_ID)
        if config.enforce_sample_length is not None:
            n = config.enforce_sample_length
            if ids.size > n:
                raise ValueError(f"record '{rec.seq_id}' has {ids.size} tokens, more than enforce_sample_length={n}")
            ids = np.pad(ids, (0, n - ids.size), constant_values=PAD_ID)
        docs.append(ids)
    return docs


def _assign_split(config: PreprocessConfig, order: int, needed: list[str]) -> str:
    """Deterministic split of the ``order``-th record: the first records fill every split with weight > 0 (so none
    is empty), then a weighted draw from a generator seeded by ``(seed, order)``."""
    if order < len(needed):
        return needed[order]
    weights = np.array([config.train_split, config.valid_split, config.test_split], dtype=np.float64)
    rng = np.random.default_rng([0 if config.seed is None else config.seed, 7, order])
    return SPLITS[int(rng.choice(3, p=weights / weights.sum()))]


_WORKER_STATE: tuple | None = None


def _worker_init(config: PreprocessConfig) -> None:
    global _WORKER_STATE
    _WORKER_STATE = (config, _load_tokenizer(config))


def _worker_process(rec: _Record) -> list[np.ndarray]:
    config, tokenizer = _WORKER_STATE
    return _process_record(config, tokenizer, rec)


def _iter_records(config: PreprocessConfig):
    for file_idx, path in enumerate(config.datapaths):
        for rec_idx, (seq_id, seq) in enumerate(iter_fasta(path, allow_empty=True)):
            yield _Record(file_idx, rec_idx, seq_id, seq)


def preprocess(config: PreprocessConfig, *, show_progress: bool = True) -> dict[str, Path] | None:
    """Run one preprocessing job. Returns the split prefixes, or None if outputs exist and ``overwrite`` is False."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    paths = output_paths(config)
    finals = [Path(f"{p}.{ext}") for p in paths.values() for ext in ("bin", "idx")]
    if not config.overwrite and any(f.exists() for f in finals):
        logger.warning("outputs for '%s' exist (%s); skipping (set overwrite: true to rebuild)",
                       config.output_prefix, ", ".join(str(f) for f in finals if f.exists()))
        return None
    for p in config.datapaths:
        if not Path(p).is_file():
            raise FileNotFoundError(f"datapaths entry not found: {p}")
    tokenizer = _load_tokenizer(config)
    dtype = np.dtype(config.indexed_dataset_dtype)
    if np.iinfo(dtype).max < tokenizer.vocab_size - 1:
        raise ValueError(f"indexed_dataset_dtype {dtype} cannot hold token ids up to {tokenizer.vocab_size - 1}; "
                         f"use uint16")
    (config.output_dir or Path(".")).mkdir(parents=True, exist_ok=True)
    tmp = {s: Path(f"{p}.tmp") for s, p in paths.items()}
    builders = {s: IndexedDatasetBuilder(f"{tmp[s]}.bin", dtype=dtype.type) for s in SPLITS}
    weights = {"train": config.train_split, "val": config.valid_split, "test": config.test_split}
    needed = [s for s in SPLITS if weights[s] > 0]
    counts = dict.fromkeys(SPLITS, 0)
    start = time.perf_counter()
    records = _iter_records(config)
    pool = None
    try:
        if config.workers > 1:
            pool = multiprocessing.get_context("spawn").Pool(config.workers, _worker_init, (config,))
            results = pool.imap(_worker_process, records, chunksize=config.chunksize)
        else:
            results = ((lambda r: _process_record(config, tokenizer, r))(r) for r in records)
        n_rec = 0
        for n_rec, docs in enumerate(tqdm(results, desc=f"preprocess {config.output_prefix}", unit="seq",
                                          disable=not show_progress), start=1):
            split = _assign_split(config, n_rec - 1, needed)
            for ids in docs:
                builders[split].add_item(torch.from_numpy(ids.astype(dtype, copy=False)))
                builders[split].end_document()
                counts[split] += 1
        for s in SPLITS:
            builders[s].finalize(f"{tmp[s]}.idx")
        for s in SPLITS:  # all complete: move into place
            for ext in ("bin", "idx"):
                Path(f"{tmp[s]}.{ext}").replace(f"{paths[s]}.{ext}")
    except BaseException:
        for s in SPLITS:
            for ext in ("bin", "idx"):
                Path(f"{tmp[s]}.{ext}").unlink(missing_ok=True)
        raise
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    logger.info("preprocessed %d records in %.1fs -> documents %s", n_rec, time.perf_counter() - start, counts)
    return paths
