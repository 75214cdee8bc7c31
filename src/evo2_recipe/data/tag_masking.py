"""Loss mask for phylogenetic tags such as ``|d__Bacteria;p__...;s__...|`` inside training sequences (spec 3.6).

Tags are injected by ``preprocess_evo2`` so the model can be prompted with a lineage, but the model should not be
trained to predict tag characters. :func:`mask_phylogenetic_tags` decides, per EOD-delimited segment, which regions
between ``|`` pipes are tags (mask 0) and which are sequence (mask 1), following the reference's rules, including
its handling of tags cut in half at a sample boundary.
"""

from __future__ import annotations

import numpy as np
import torch

PIPE = ord("|")
TAG_CHARS = frozenset({ord("_"), ord(";"), ord(" ")})
CONTROL_TAGS = (ord("@"), ord("#"))
DNA_TOKENS = tuple(ord(c) for c in "ACGTacgt")
VALID_DNA_AND_DEGENERATE = frozenset(ord(c) for c in "-ABCDGHKMNRSTUVWYabcdghkmnrstuvwy")
MAX_TAG_LEN = 2048
_VALID_OR_CONTROL = np.array(sorted(VALID_DNA_AND_DEGENERATE | set(CONTROL_TAGS)))


def _valid(tokens: np.ndarray) -> np.ndarray:
    return np.isin(tokens, _VALID_OR_CONTROL)


def _mask_segment(seg: np.ndarray, other_tag_chars: frozenset[int], max_tag_len: int) -> np.ndarray:
    """Mask (1 keep, 0 drop) for one EOD-free segment."""
    n = seg.size
    mask = np.ones(n, dtype=np.int64)
    pipes = np.flatnonzero(seg == PIPE)
    if pipes.size == 0:
        if n < max_tag_len and not _valid(seg).all():
            mask[:] = 0  # a tag fragment without its pipes
        return mask
    mask[pipes] = 0
    p0 = int(pipes[0])
    if p0 == n - 1:  # the only content is before a trailing pipe
        if not (p0 >= max_tag_len or _valid(seg[:p0]).all()):
            mask[:p0] = 0
        return mask
    after = n - p0 - 1
    if after >= 2:
        t1, t2 = int(seg[p0 + 1]), int(seg[p0 + 2])
        is_tag = not (t2 == ord("_") or t1 == ord(";"))
    else:
        is_tag = int(seg[p0 + 1]) not in {ord("D"), ord("d"), ord("R"), ord("r"), ord(";")}
    start = 0
    for end in pipes.tolist():
        if is_tag and end - start < max_tag_len:
            mask[start:end] = 0
        elif is_tag:
            is_tag = False  # too long to be a tag: a mis-parse, keep it
        is_tag = not is_tag
        start = end + 1
    if is_tag and n - start < max_tag_len:
        mask[start:] = 0
    return mask


def mask_phylogenetic_tags(tokens, terminal_tag_char: int = PIPE, other_tag_chars=TAG_CHARS, eod_token_id: int = 0,
                           max_tag_len: int = MAX_TAG_LEN):
    """Int mask (1 = keep) of the same shape as ``tokens`` (1-D or 2-D; tensor or array)."""
    is_tensor = isinstance(tokens, torch.Tensor)
    arr = tokens.detach().cpu().numpy() if is_tensor else np.asarray(tokens)
    if arr.ndim == 0 or arr.size == 0:
        out = np.ones_like(arr, dtype=np.int64)
    elif arr.ndim == 2:
        out = np.stack([_mask_row(r, other_tag_chars, eod_token_id, max_tag_len) for r in arr])
    else:
        out = _mask_row(arr, other_tag_chars, eod_token_id, max_tag_len)
    if is_tensor:
        return torch.from_numpy(out).to(tokens.device)
    return out


def _mask_row(row: np.ndarray, other_tag_chars, eod: int, max_tag_len: int) -> np.ndarray:
    if row.size == 1:
        t = int(row[0])
        return np.array([0 if (t == PIPE or t in other_tag_chars) else 1], dtype=np.int64)
    mask = np.ones(row.size, dtype=np.int64)
    eods = np.flatnonzero(row == eod)
    bounds = [-1, *eods.tolist(), row.size]
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b - a > 1:
            mask[a + 1:b] = _mask_segment(row[a + 1:b], other_tag_chars, max_tag_len)
    mask[~_valid(row)] = 0
    mask[row == eod] = 1
    return mask
