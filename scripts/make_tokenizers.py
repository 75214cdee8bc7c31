"""Regenerate tokenizers/nucleotide_fast_tokenizer_{256,512} (deterministic; output is committed)."""

from pathlib import Path

from evo2_recipe.data.tokenizer_assets import write_tokenizer_dir

ROOT = Path(__file__).resolve().parents[1] / "tokenizers"

if __name__ == "__main__":
    for size in (256, 512):
        write_tokenizer_dir(ROOT / f"nucleotide_fast_tokenizer_{size}", size)
        print(f"wrote {ROOT / f'nucleotide_fast_tokenizer_{size}'}")
