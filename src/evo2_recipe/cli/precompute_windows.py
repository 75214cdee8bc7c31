"""``evo2_precompute_windows``: build Sharded-Eden data for ``train_evo2 --sharded-eden-data`` (spec 2.16).

    evo2_precompute_windows sequences genomes.fa eden_db/ [--sample-id S]
        -> eden_db/S/glm_dataset_S.sqlite (table sequences(contig_id, nt_sequence)) and eden_db/S.parquet
           (contig_id, length), the input of the next step (split it into train/validation/test as you like)
    evo2_precompute_windows precompute train.parquet train_windows.sqlite [--window-size 8192] [--stride 7992]
        [--window-min-length-threshold 0]
        -> a window database (the reference's ``bionemo_precompute_windows precompute``)

``--window-size`` must equal ``train_evo2 --seq-length`` and ``--stride`` its ``--stride``; training checks both.
Outputs are written to a temporary name and renamed when complete.
"""

from __future__ import annotations

import argparse
import contextlib
import sqlite3
import sys
from pathlib import Path


def _sequences(args) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from evo2_recipe.data.fasta import iter_fasta

    sample = args.sample_id or args.fasta.name.split(".")[0]
    db = args.out_dir / sample / f"glm_dataset_{sample}.sqlite"
    if db.exists():
        raise FileExistsError(f"{db} already exists; choose a new --sample-id or output directory")
    db.parent.mkdir(parents=True, exist_ok=True)
    tmp = db.with_name(db.name + ".partial")
    tmp.unlink(missing_ok=True)
    lengths = {}
    with contextlib.closing(sqlite3.connect(tmp)) as conn:
        conn.execute("CREATE TABLE sequences (contig_id TEXT PRIMARY KEY, nt_sequence TEXT)")
        for name, seq in iter_fasta(args.fasta):
            conn.execute("INSERT INTO sequences VALUES (?, ?)", (name, seq))
            lengths[name] = len(seq)
        conn.commit()
    tmp.rename(db)
    table = pa.table({"contig_id": list(lengths), "length": list(lengths.values())})
    pq.write_table(table, args.out_dir / f"{sample}.parquet")
    return f"Wrote {len(lengths)} contig(s) to {db} and {args.out_dir / f'{sample}.parquet'}"


def _precompute(args) -> str:
    import pyarrow.parquet as pq

    from evo2_recipe.data.window_dataset import write_window_db

    table = pq.read_table(args.parquet).to_pydict()
    missing = {"contig_id", "length"} - set(table)
    if missing:
        raise ValueError(f"{args.parquet}: needs columns contig_id and length (missing {sorted(missing)})")
    lengths = dict(zip(table["contig_id"], map(int, table["length"])))
    n = write_window_db(args.out, lengths, args.window_size, args.stride, args.window_min_length_threshold)
    return f"Wrote {n} window(s) of {len(lengths)} contig(s) to {args.out}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="evo2_precompute_windows", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sequences", help="FASTA -> a per-sample sequence database and its contig-length table")
    s.add_argument("fasta", type=Path)
    s.add_argument("out_dir", type=Path)
    s.add_argument("--sample-id", help="sample name (default: the FASTA file name up to its first dot)")
    w = sub.add_parser("precompute", help="contig-length parquet -> window database")
    w.add_argument("parquet", type=Path)
    w.add_argument("out", type=Path)
    w.add_argument("--window-size", type=int, default=8192)
    w.add_argument("--stride", type=int, default=7992)
    w.add_argument("--window-min-length-threshold", type=int, default=0)
    args = p.parse_args(argv)
    try:
        print(_sequences(args) if args.command == "sequences" else _precompute(args))
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"evo2_precompute_windows: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
