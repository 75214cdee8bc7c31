"""Spliced transcripts from a genome FASTA and a GTF or GFF3 annotation (``splice_evo2``).

Annotations are parsed by gffutils (GTF: exons grouped by ``transcript_id``; GFF3: exons grouped by ``Parent``, the
gene being the transcript's own ``Parent``). Coordinates become 0-based half-open. Transcripts are written 5'->3':
on the minus strand every exon is reverse-complemented and exons are taken from the highest coordinate down.

Modes:
* ``default``  - the exons concatenated.
* ``stitched`` - each exon with up to ``intron`` bases of flanking intron on both sides (halved where two exons
  are closer than ``2*intron`` unless ``overlap``), the first exon with ``promoter`` bases of upstream sequence
  instead, pieces joined by ``@``. The reference drops the first base of plus-strand transcripts here; we do not.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass

import gffutils

from evo2_recipe.data.preprocess import reverse_complement

logger = logging.getLogger(__name__)
STITCH_TOKEN = "@"


@dataclass
class Transcript:
    seqid: str
    gene_id: str
    transcript_id: str
    strand: str
    exons: list[tuple[int, int]]  # 0-based half-open, genomic order

    @property
    def length(self) -> int:
        return sum(e - s for s, e in self.exons)


def _first(attrs, key):
    v = attrs.get(key)
    return v[0] if v else None


def read_transcripts(annotation_path: str) -> list[Transcript]:
    """All transcripts with at least one exon, sorted by (seqid, start, transcript id)."""
    try:
        db = gffutils.create_db(str(annotation_path), ":memory:", merge_strategy="create_unique",
                                disable_infer_genes=True, disable_infer_transcripts=True, keep_order=True)
    except Exception as e:  # gffutils raises assorted errors on malformed files
        raise ValueError(f"cannot parse annotation {annotation_path}: {e}") from e
    is_gtf = db.dialect.get("fmt") == "gtf"
    groups: dict[str, list] = {}
    for exon in db.features_of_type("exon"):
        tid = _first(exon.attributes, "transcript_id") if is_gtf else _first(exon.attributes, "Parent")
        if tid is None:
            raise ValueError(f"{annotation_path}: exon at {exon.seqid}:{exon.start}-{exon.end} has no "
                             f"{'transcript_id' if is_gtf else 'Parent'} attribute")
        groups.setdefault(tid, []).append(exon)
    out = []
    for tid, exons in groups.items():
        if is_gtf:
            gene = _first(exons[0].attributes, "gene_id") or tid
        else:
            try:
                gene = _first(db[tid].attributes, "Parent") or tid
            except gffutils.exceptions.FeatureNotFoundError:
                gene = tid
        strands, seqids = {e.strand for e in exons}, {e.seqid for e in exons}
        if len(strands) != 1 or len(seqids) != 1:
            logger.warning("skipping transcript %s: exons on several strands or sequences", tid)
            continue
        spans = sorted({(e.start - 1, e.end) for e in exons})
        if any(b[0] < a[1] for a, b in zip(spans, spans[1:])):
            logger.warning("skipping transcript %s: overlapping exons", tid)
            continue
        out.append(Transcript(seqids.pop(), gene, tid, strands.pop(), spans))
    return sorted(out, key=lambda t: (t.seqid, t.exons[0][0], t.transcript_id))


def longest_per_gene(transcripts: list[Transcript]) -> list[Transcript]:
    best: dict[str, Transcript] = {}
    for t in transcripts:
        if t.gene_id not in best or t.length > best[t.gene_id].length:
            best[t.gene_id] = t
    keep = {id(t) for t in best.values()}
    return [t for t in transcripts if id(t) in keep]


def _pieces(t: Transcript, contig_len: int, mode: str, promoter: int, intron: int, overlap: bool):
    """Genomic (start, end) slices in genomic order."""
    if mode == "default":
        return list(t.exons)
    ex = t.exons
    slices = []
    for i, (s, e) in enumerate(ex):
        left_gap = s - ex[i - 1][1] if i > 0 else None
        right_gap = ex[i + 1][0] - e if i + 1 < len(ex) else None
        left = intron if overlap or left_gap is None else min(intron, math.floor(left_gap / 2))
        right = intron if overlap or right_gap is None else min(intron, math.ceil(right_gap / 2))
        if t.strand == "+" and i == 0:
            left = promoter
        if t.strand == "-" and i == len(ex) - 1:
            right = promoter
        slices.append((max(0, s - left), min(contig_len, e + right)))
    return slices


def transcript_sequence(fasta, t: Transcript, mode: str = "default", promoter: int = 1024, intron: int = 32,
                        overlap: bool = False) -> str:
    """5'->3' sequence of one transcript (``fasta``: an open pyfaidx.Fasta with raw access)."""
    if t.seqid not in fasta:
        raise ValueError(f"transcript {t.transcript_id} is on {t.seqid!r}, which is not in the FASTA")
    contig = fasta[t.seqid]
    n = len(contig)
    if t.exons[-1][1] > n:
        raise ValueError(f"transcript {t.transcript_id}: exon ends at {t.exons[-1][1]} beyond {t.seqid} "
                         f"(length {n}); annotation and FASTA do not match")
    parts = [str(contig[s:e]) for s, e in _pieces(t, n, mode, promoter, intron, overlap)]
    if t.strand == "-":
        parts = [reverse_complement(p) for p in reversed(parts)]
    return (STITCH_TOKEN if mode == "stitched" else "").join(parts)


def extract_transcripts(fasta_path: str, annotation_path: str, *, mode: str = "default", promoter: int = 1024,
                        intron: int = 32, overlap: bool = False,
                        only_longest: bool = False) -> Iterator[tuple[str, str]]:
    """Yield ``(header, sequence)`` with header ``{seqid}|{gene_id}|{transcript_id}``; bad transcripts are skipped
    with a warning naming them."""
    from evo2_recipe.data.fasta import open_fasta

    if mode not in ("default", "stitched"):
        raise ValueError(f"transcript type must be 'default' or 'stitched', got {mode!r}")
    transcripts = read_transcripts(annotation_path)
    if only_longest:
        transcripts = longest_per_gene(transcripts)
    with open_fasta(fasta_path) as fasta:
        for t in transcripts:
            try:
                seq = transcript_sequence(fasta, t, mode, promoter, intron, overlap)
            except ValueError as e:
                logger.warning("skipping: %s", e)
                continue
            yield f"{t.seqid}|{t.gene_id}|{t.transcript_id}", seq
