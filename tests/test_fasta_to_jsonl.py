"""evo2_fasta_to_jsonl writes exactly the prompt-file format infer_evo2 reads."""

import json

from evo2_recipe.cli.fasta_to_jsonl import main


def test_fasta_to_jsonl(tmp_path, capsys):
    fa = tmp_path / "x.fa"
    fa.write_text(">r1 some description\nacgt\nAC\n>r2\nGGTT\n")
    out = tmp_path / "sub" / "x.jsonl"
    assert main([str(fa), str(out), "--upper"]) == 0
    assert [json.loads(line) for line in out.read_text().splitlines()] == [
        {"id": "r1", "prompt": "ACGTAC"}, {"id": "r2", "prompt": "GGTT"}]
    assert "Wrote 2 record(s)" in capsys.readouterr().out
    assert main([str(tmp_path / "missing.fa"), str(tmp_path / "y.jsonl")]) == 1
    assert "FASTA file not found" in capsys.readouterr().err
    assert not (tmp_path / "y.jsonl").exists() and not (tmp_path / "y.jsonl.tmp").exists()


def test_reference_tool_names_and_flags_exist():
    import subprocess
    import sys
    from pathlib import Path

    bin_dir = Path(sys.executable).parent
    r = subprocess.run([str(bin_dir / "bionemo_fasta_to_jsonl"), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "fasta" in r.stdout.lower()  # the reference's name for evo2_fasta_to_jsonl
    r = subprocess.run([str(bin_dir / "evo2_remove_optimizer"), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--src-ckpt-dir" in r.stdout and "--dst-ckpt-dir" in r.stdout and "-v" in r.stdout
