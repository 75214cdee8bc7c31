#!/usr/bin/env bash
# Make the bundled self-test checkpoint (evo2_recipe/selftest_data/) and record its outputs. CPU, ~5 minutes.
# Trains striped_hyena_tiny on the bundled phiX174-like genomes exactly as examples/quickstart.sh does (seed 1234),
# strips the optimizer state, and writes expected.json with evo2_selftest --write-expected (fp32).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export EVO2_CPU=1
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
RESULTS="$WORK/qs" bash examples/quickstart.sh
DST=src/evo2_recipe/selftest_data/checkpoint
rm -rf "$DST"
evo2_remove_optimizer --src-ckpt-dir "$WORK/qs/phage_tiny/checkpoints" --dst-ckpt-dir "$DST"
evo2_selftest --write-expected --record "EVO2_CPU=1 RESULTS=... bash examples/quickstart.sh (seed 1234, 200 steps)" \
  "&& evo2_remove_optimizer" "(scripts/make_selftest_checkpoint.sh)"
du -sh "$DST"
