"""``evo2_selftest``: check this installation against the bundled reference checkpoint and its recorded outputs.

    evo2_selftest                       # PASS/FAIL against the recorded outputs (fp32, CPU or GPU)
    evo2_selftest --ckpt-dir CKPT       # the same metrics for any checkpoint (no expected values)
    evo2_selftest --ckpt-dir CKPT --expected expected.json   # ... compared with outputs recorded elsewhere
    evo2_selftest --ckpt-dir CKPT --published evo2_1b_base   # converted public weights vs Arc's published loss
                                                             # and accuracy on its four test prompts
    evo2_selftest --write-expected      # (maintainers) record the bundled checkpoint's outputs

Exit status 0 on PASS, 1 on FAIL, 2 on a usage or loading error.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from evo2_recipe.cli.common import add_cpu_flag, apply_runtime_mode, setup_logging


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="evo2_selftest", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--ckpt-dir", help="report the metrics of this checkpoint instead of the bundled one")
    p.add_argument("--expected", help="with --ckpt-dir: compare with these recorded outputs (an expected.json)")
    p.add_argument("--published", metavar="SIZE",
                   help="with --ckpt-dir: compare with the published values of this public size (evo2_1b_base, "
                        "evo2_7b, evo2_40b); runs in the checkpoint's precision (bf16 on GPU)")
    p.add_argument("--write-expected", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--record", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)  # how the checkpoint was made
    p.add_argument("-v", "--verbose", action="store_true", help="DEBUG logging and dependency notices")
    add_cpu_flag(p)
    args = p.parse_args(argv)
    setup_logging(args.verbose)
    if not args.verbose:
        logging.getLogger().setLevel(logging.WARNING)  # the report is the output
    apply_runtime_mode(args)
    from evo2_recipe.inference import selftest
    from evo2_recipe.inference.api import Evo2
    from evo2_recipe.inference.loading import CheckpointError

    ckpt = args.ckpt_dir or str(selftest.CHECKPOINT)
    if args.published and not args.ckpt_dir:
        p.error("--published needs --ckpt-dir (converted public weights)")
    try:
        evo = Evo2.from_checkpoint(ckpt, mixed_precision_recipe=None if args.published else "fp32")
        if args.published:
            report = selftest.compare_published(evo, args.published)
            print(f"evo2_selftest: {ckpt} vs published {args.published}\n{report}")
            return 0 if report.passed else 1
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"evo2_selftest: error: {e}", file=sys.stderr)
        return 2
    got = selftest.run_metrics(evo)
    if args.write_expected:
        selftest.EXPECTED.write_text(json.dumps({**got, "made_by": " ".join(args.record or [])}, indent=1) + "\n")
        print(f"wrote {selftest.EXPECTED}")
        return 0
    if args.ckpt_dir and not args.expected:
        print(f"checkpoint {ckpt}\n{selftest.describe(got)}")
        return 0
    try:
        expected = selftest.load_expected(*([Path(args.expected)] if args.expected else []))
    except (OSError, ValueError) as e:
        print(f"evo2_selftest: error: cannot read the expected outputs: {e}", file=sys.stderr)
        return 2
    report = selftest.compare(got, expected)
    print(f"evo2_selftest: {'bundled reference checkpoint' if not args.ckpt_dir else ckpt}, fp32\n{report}")
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
