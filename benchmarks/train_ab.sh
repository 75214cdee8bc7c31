#!/usr/bin/env bash
# train_evo2 A/B of source trees on one GPU: the working tree against earlier revisions, runs interleaved in one call
# (the same machine, clocks and data for every tree), tokens/s/GPU from step 40 by train_log_summary.py.
#   here, in the repository root:  bash benchmarks/train_ab.sh prepare REV [REV ...]  -> .ab_trees/REV/src
#   on the GPU (carry .whl and .ab_trees):  bash benchmarks/train_ab.sh run           -> one line per tree
# The runs are scripts/gpu_acceptance.sh's `trainab` (train16's real-data flags): AB_REPEATS (2) rounds, AB_STEPS (100),
# AB_SIZE (evo2_1b_base), AB_RECIPE (bf16_mixed), AB_DATA (dimorphilus), TRAIN_GRAPH ("" for eager), AB_FLAGS (more
# flags and key=value overrides). Logs under ${OUT:-./gpu_out}. Used for benchmarks/RESULTS.md's A/B rows.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
case "${1:-}" in
  prepare)
    shift
    [ $# -gt 0 ] || { echo "usage: $0 prepare REV [REV ...]" >&2; exit 2; }
    rm -rf .ab_trees
    for rev in "$@"; do
      sha=$(git rev-parse --short "$rev") || exit 2
      mkdir -p ".ab_trees/$sha" && git archive "$sha" src | tar -x -C ".ab_trees/$sha" || exit 1
      echo ".ab_trees/$sha <- $rev"
    done
    exclude="$(git rev-parse --git-dir)/info/exclude"  # never committed
    grep -qx "/.ab_trees/" "$exclude" 2>/dev/null || echo "/.ab_trees/" >> "$exclude"
    ;;
  run) exec bash scripts/gpu_acceptance.sh trainab ;;
  *) echo "usage: $0 prepare REV [REV ...] | run" >&2; exit 2 ;;
esac
