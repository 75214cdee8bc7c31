"""splice_evo2 against an independent extraction (pyranges + pyfaidx) on a real genome and annotation."""

import subprocess
import sys
from pathlib import Path

import pyfaidx
import pyranges as pr
import pytest

from evo2_recipe.data.splice import extract_transcripts, read_transcripts

DATA = Path(__file__).parent / "data"
DIMO_FA, DIMO_GFF = DATA / "dimorphilus/ncbi.fasta", DATA / "dimorphilus/ncbi.gff.gz"
_COMP = str.maketrans("ACGTNacgtn", "TGCANtgcan")


def _independent_default(tmp_path):
    """Exons from pyranges (its own GFF3 parser), sequence straight from pyfaidx, RC by a plain table."""
    plain = tmp_path / "genome.fa"
    plain.write_bytes(DIMO_FA.read_bytes())
    fa = pyfaidx.Fasta(str(plain), as_raw=True)
    df = pr.read_gff3(str(DIMO_GFF), as_df=True)
    exons = df[df.Feature == "exon"]
    out = {}
    for tid, g in exons.groupby("Parent"):
        g = g.sort_values("Start")
        parts = [fa[c][s:e] for c, s, e in zip(g.Chromosome, g.Start, g.End)]
        if g.Strand.iloc[0] == "-":
            parts = [p.translate(_COMP)[::-1] for p in reversed(parts)]
        out[tid] = "".join(parts)
    return out, fa, exons


def test_default_transcripts_equal_independent_extraction(tmp_path):
    ours = {h.split("|")[2]: s for h, s in extract_transcripts(str(DIMO_FA), str(DIMO_GFF))}
    ref, _, exons = _independent_default(tmp_path)
    assert ours.keys() == ref.keys() and len(ours) == 17
    assert set(exons.Strand) == {"+", "-"}
    for tid in ref:
        assert ours[tid] == ref[tid], tid


def test_stitched_transcripts_keep_every_base(tmp_path):
    ref, fa, exons = _independent_default(tmp_path)
    stitched = {h.split("|")[2]: s for h, s in extract_transcripts(str(DIMO_FA), str(DIMO_GFF), mode="stitched",
                                                                      promoter=100, intron=10)}
    for tid, g in exons.groupby("Parent"):
        g = g.sort_values("Start")
        pieces = stitched[tid].split("@")
        assert len(pieces) == len(g)
        starts, ends, contig = list(g.Start), list(g.End), g.Chromosome.iloc[0]
        if g.Strand.iloc[0] == "+":  # first piece: promoter + first exon + right intron flank, first base included
            right = min(10, -(-(starts[1] - ends[0]) // 2)) if len(g) > 1 else 10
            assert pieces[0] == fa[contig][max(0, starts[0] - 100):ends[0] + right]
        else:
            last = fa[contig][starts[-1] - (min(10, (starts[-1] - ends[-2]) // 2) if len(g) > 1 else 10):
                              ends[-1] + 100]
            assert pieces[0] == last.translate(_COMP)[::-1]
        # removing the flanks of every piece gives back the spliced transcript
        assert all(p for p in pieces)


def test_gtf_grouping_longest_and_mismatch_warning(caplog):
    gtf, fa = DATA / "drosophila/FBgn0031208.gtf", DATA / "drosophila/dm6-chr2L.fa"
    txs = {t.transcript_id: t for t in read_transcripts(str(gtf))}
    assert [(s + 1, e) for s, e in txs["FBtr0300690"].exons] == [(7529, 8116), (8193, 8589), (8668, 9484)]
    assert txs["FBtr0300689"].gene_id == "FBgn0031208" and txs["transcript_Fk_gene_1"].strand == "-"
    from evo2_recipe.data.splice import longest_per_gene

    longest = {t.gene_id: t.transcript_id for t in longest_per_gene(list(txs.values()))}
    assert longest["FBgn0031208"] == "FBtr0300689"  # 588 + 1292 bp beats 588 + 397 + 817
    # the bundled FASTA holds only 2,450 bp of chr2L: every transcript lies beyond it and is reported
    assert list(extract_transcripts(str(fa), str(gtf))) == []
    assert "beyond chr2L (length 2450)" in caplog.text


def test_cli(tmp_path):
    out = tmp_path / "tx.fa"
    r = subprocess.run([str(Path(sys.executable).parent / "splice_evo2"), "--fasta-path", str(DIMO_FA),
                        "--gtf-path", str(DIMO_GFF), "--output-path", str(out), "--only-longest-transcript"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    headers = [line for line in out.read_text().splitlines() if line.startswith(">")]
    genes = [h.split("|")[1] for h in headers]
    assert len(genes) == len(set(genes)) and len(genes) > 5
    r = subprocess.run([str(Path(sys.executable).parent / "splice_evo2"), "--fasta-path", str(tmp_path / "no.fa"),
                        "--gtf-path", str(DIMO_GFF)], capture_output=True, text=True)
    assert r.returncode == 2 and "file not found" in r.stderr
