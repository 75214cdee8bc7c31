"""FASTA reading with indexed random access (pyfaidx) and clear errors for malformed input.

The ``.fai`` index is built in a private temporary folder, so read-only inputs work and nothing is left next to the
user's file. Gzip input is decompressed to that folder first (plain gzip cannot be indexed; BGZF could, but a copy is
simpler and still indexed). CRLF line endings are normalised the same way.
"""

from __future__ import annotations

import contextlib
import gzip
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pyfaidx

DNA_ALPHABET = frozenset("ACGTNacgtn")
IUPAC_ALPHABET = frozenset("ACGTURYSWKMBDHVNacgturyswkmbdhvn-.")


class FastaFormatError(ValueError):
    """A FASTA file is malformed; the message says where and how to fix it."""


def _check_head(path: Path, opener) -> bool:
    """Validate the first non-blank line; return True if the file has CR line endings."""
    with opener(path, "rb") as f:
        head = f.read(1 << 20)
    if not head.strip():
        raise FastaFormatError(f"{path}: the file is empty; expected FASTA records ('>name' lines followed by sequence)")
    first = head.lstrip().split(b"\n", 1)[0]
    if not first.startswith(b">"):
        raise FastaFormatError(
            f"{path}: the first line {first[:60]!r} is not a FASTA header; every record must start with '>name'"
        )
    return b"\r" in head


@contextlib.contextmanager
def open_fasta(path: str | Path) -> Iterator[pyfaidx.Fasta]:
    """Open ``path`` (plain or ``.gz``) as an indexed :class:`pyfaidx.Fasta` with raw string access."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"FASTA file not found: {path}")
    gz = path.suffix == ".gz"
    opener = gzip.open if gz else open
    try:
        has_cr = _check_head(path, opener)
    except gzip.BadGzipFile as e:
        raise FastaFormatError(f"{path}: ends in .gz but is not gzip data ({e})") from e
    with tempfile.TemporaryDirectory(prefix="evo2_fasta_") as tmp:
        source = path
        if gz or has_cr:
            source = Path(tmp) / "input.fa"
            with opener(path, "rb") as src, open(source, "wb") as dst:
                if has_cr:
                    for line in src:
                        dst.write(line.replace(b"\r", b""))
                else:
                    shutil.copyfileobj(src, dst)
        try:
            fasta = pyfaidx.Fasta(str(source), indexname=str(Path(tmp) / "input.fai"), as_raw=True,
                                  duplicate_action="stop", rebuild=True)
        except ValueError as e:
            if "Duplicate key" in str(e):
                raise FastaFormatError(f"{path}: duplicate record id ({e}); record ids must be unique") from e
            raise FastaFormatError(f"{path}: cannot index FASTA: {e}") from e
        except pyfaidx.FastaIndexingError as e:
            raise FastaFormatError(
                f"{path}: malformed FASTA ({e}); every line of a record except the last must have the same length"
            ) from e
        try:
            yield fasta
        finally:
            fasta.close()


def iter_fasta(path: str | Path, *, allow_empty: bool = False) -> Iterator[tuple[str, str]]:
    """Yield ``(record_id, sequence)`` in file order. Empty records are an error unless ``allow_empty``."""
    with open_fasta(path) as fasta:
        for name in fasta.keys():
            seq = str(fasta[name][:]) if len(fasta[name]) else ""
            if not seq and not allow_empty:
                raise FastaFormatError(f"{path}: record '{name}' has no sequence; remove it or fix the file")
            yield name, seq


def check_alphabet(name: str, seq: str, allowed: frozenset[str] = IUPAC_ALPHABET) -> None:
    """Raise :class:`FastaFormatError` naming the first character of ``seq`` outside ``allowed``."""
    bad = re.search(f"[^{re.escape(''.join(sorted(allowed)))}]", seq)
    if bad:
        raise FastaFormatError(
            f"record '{name}': character {bad.group()!r} at position {bad.start() + 1} is not a nucleotide code "
            f"(allowed: {''.join(sorted(allowed))})"
        )
