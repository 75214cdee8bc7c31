"""``splice_evo2``: extract spliced (or promoter/intron-stitched) transcripts from a FASTA and a GTF/GFF3."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from evo2_recipe.cli.common import setup_logging


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="splice_evo2", description="Extract spliced transcripts from a FASTA and GTF.")
    p.add_argument("--fasta-path", required=True)
    p.add_argument("--gtf-path", required=True, help="GTF or GFF3 annotation (plain or .gz)")
    p.add_argument("--output-path", help="output FASTA (default: stdout)")
    p.add_argument("--transcript-type", choices=["default", "stitched"], default="default")
    p.add_argument("--stitched-promoter", type=int, default=1024)
    p.add_argument("--stitched-intron", type=int, default=32)
    p.add_argument("--stitched-overlap", action="store_true")
    p.add_argument("--only-longest-transcript", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    setup_logging(args.verbose)
    from evo2_recipe.data.fasta import FastaFormatError
    from evo2_recipe.data.splice import extract_transcripts

    for path in (args.fasta_path, args.gtf_path):
        if not Path(path).is_file():
            p.exit(2, f"splice_evo2: error: file not found: {path}\n")
    records = extract_transcripts(args.fasta_path, args.gtf_path, mode=args.transcript_type,
                                  promoter=args.stitched_promoter, intron=args.stitched_intron,
                                  overlap=args.stitched_overlap, only_longest=args.only_longest_transcript)
    try:
        lines = [f">{h}\n{s}\n" for h, s in records]
    except (ValueError, FastaFormatError) as e:
        p.exit(2, f"splice_evo2: error: {e}\n")
    if args.output_path:
        out = Path(args.output_path)
        tmp = out.with_suffix(out.suffix + ".tmp")
        tmp.write_text("".join(lines))
        tmp.replace(out)
    else:
        sys.stdout.write("".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
