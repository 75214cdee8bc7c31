"""``evo2_fasta_to_jsonl IN.fa OUT.jsonl [--upper]``: FASTA -> the JSONL prompt file ``infer_evo2 --prompt-file`` reads.

One line per record: ``{"id": <first word of the header>, "prompt": <sequence>}``. Reads through the same indexed
FASTA reader as the other tools (gzip, CRLF, clear errors); empty records are kept, as in the reference.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="evo2_fasta_to_jsonl", description=__doc__)
    p.add_argument("input", type=Path)
    p.add_argument("output", type=Path)
    p.add_argument("--upper", action="store_true", help="upper-case the sequences")
    args = p.parse_args(argv)
    from evo2_recipe.data.fasta import FastaFormatError, iter_fasta

    tmp = args.output.with_suffix(args.output.suffix + ".tmp")
    try:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        n = 0
        with open(tmp, "w") as f:
            for name, seq in iter_fasta(args.input, allow_empty=True):
                f.write(json.dumps({"id": name, "prompt": seq.upper() if args.upper else seq}) + "\n")
                n += 1
        tmp.replace(args.output)
    except (FileNotFoundError, FastaFormatError) as e:
        tmp.unlink(missing_ok=True)
        print(f"evo2_fasta_to_jsonl: error: {e}", file=sys.stderr)
        return 1
    print(f"Wrote {n} record(s) to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
