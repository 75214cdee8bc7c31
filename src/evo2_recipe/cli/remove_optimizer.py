"""``evo2_remove_optimizer --src-ckpt-dir CKPT --dst-ckpt-dir OUT``: strip optimizer/scheduler/RNG state.

``--src``/``--dst`` are accepted as short aliases.
"""

from __future__ import annotations

import argparse
import sys

from evo2_recipe.cli.common import setup_logging


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="evo2_remove_optimizer", description=__doc__)
    p.add_argument("--src-ckpt-dir", "--src", dest="src", required=True,
                   help="checkpoint root, or one iter_XXXXXXX folder")
    p.add_argument("--dst-ckpt-dir", "--dst", dest="dst", required=True, help="output checkpoint root (must not exist)")
    p.add_argument("-v", "--verbose", action="store_true", help="DEBUG logging and dependency notices")
    args = p.parse_args(argv)
    setup_logging(args.verbose)
    from evo2_recipe.checkpoint.remove_optimizer import remove_optimizer

    try:
        remove_optimizer(args.src, args.dst)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        p.exit(2, f"evo2_remove_optimizer: error: {e}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
