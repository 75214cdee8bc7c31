"""``preprocess_evo2 --config X.yaml``: tokenize FASTA files into Megatron indexed datasets."""

from __future__ import annotations

import argparse
import logging
import sys

from evo2_recipe.cli.common import setup_logging
from evo2_recipe.data.preprocess import preprocess
from evo2_recipe.data.preprocess_config import load_preprocess_configs

logger = logging.getLogger("preprocess_evo2")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Preprocess FASTA files into Evo 2 training data (.bin/.idx).")
    parser.add_argument("-c", "--config", required=True, help="YAML file: a list of preprocessing configs")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    try:
        configs = load_preprocess_configs(args.config)
    except (ValueError, FileNotFoundError) as e:
        parser.exit(2, f"preprocess_evo2: error: {e}\n")
    for config in configs:
        paths = preprocess(config, show_progress=not args.no_progress)
        if paths:
            for split, prefix in paths.items():
                logger.info("%-5s -> %s.{bin,idx}", split, prefix)
    return 0


if __name__ == "__main__":
    sys.exit(main())
