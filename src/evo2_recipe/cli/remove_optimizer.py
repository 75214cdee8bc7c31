"""``evo2_remove_optimizer --src CKPT --dst OUT``: strip optimizer/scheduler/RNG state from a checkpoint."""

from __future__ import annotations

import argparse
import sys

from evo2_recipe.cli.common import setup_logging


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="evo2_remove_optimizer", description=__doc__)
    p.add_argument("--src", required=True, help="checkpoint root, or one iter_XXXXXXX folder")
    p.add_argument("--dst", required=True, help="output checkpoint root (must not exist)")
    args = p.parse_args(argv)
    setup_logging()
    from evo2_recipe.checkpoint.remove_optimizer import remove_optimizer

    try:
        remove_optimizer(args.src, args.dst)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        p.exit(2, f"evo2_remove_optimizer: error: {e}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
