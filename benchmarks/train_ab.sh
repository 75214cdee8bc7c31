#!/usr/bin/env bash
# train_evo2 A/B of source trees on one GPU: the working tree against earlier revisions, runs interleaved in one call
# (the same machine, clocks and data for every tree), tokens/s/GPU from step 40 by train_log_summary.py.
#   here, in the repository root:  bash benchmarks/train_ab.sh prepare REV [REV ...]  -> .ab_trees/REV/src
#   on the GPU (carry .whl and .ab_trees):  bash benchmarks/train_ab.sh run           -> one line per tree
# AB_REPEATS (2) rounds; AB_STEPS (100); AB_SIZE (evo2_1b_base); AB_RECIPE (bf16_mixed); AB_GRAPH (--cuda-graph; empty
# for eager); AB_DATA (dimorphilus: examples/configs/<AB_DATA>_{preprocess,dataset}.yaml); AB_FLAGS: more flags and
# key=value overrides for every run. Logs under ${OUT:-./gpu_out}. Used for benchmarks/RESULTS.md's A/B rows.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
trees=.ab_trees
case "${1:-}" in
  prepare)
    shift
    [ $# -gt 0 ] || { echo "usage: $0 prepare REV [REV ...]" >&2; exit 2; }
    rm -rf "$trees"
    for rev in "$@"; do
      sha=$(git rev-parse --short "$rev") || exit 2
      mkdir -p "$trees/$sha" && git archive "$sha" src | tar -x -C "$trees/$sha" || exit 1
      echo "$trees/$sha <- $rev"
    done
    grep -qx "/$trees/" "$(git rev-parse --git-dir)/info/exclude" 2>/dev/null \
      || echo "/$trees/" >> "$(git rev-parse --git-dir)/info/exclude"  # never committed
    ;;
  run)
    OUT="${OUT:-$PWD/gpu_out}"; mkdir -p "$OUT"
    bash scripts/gpu_acceptance.sh none > /dev/null 2>&1  # wheels into /tmp/site, console scripts
    export EVO2_TOKENIZERS_DIR=$PWD/tokenizers PYTHONUNBUFFERED=1  # the older trees hold no tokenizers
    data=${AB_DATA:-dimorphilus}
    preprocess_evo2 --config "examples/configs/${data}_preprocess.yaml" --no-progress > "$OUT/ab_preprocess.log" 2>&1
    steps=${AB_STEPS:-100}
    common=(-d "examples/configs/${data}_dataset.yaml" --model-size "${AB_SIZE:-evo2_1b_base}" --seq-length 8192
            --micro-batch-size 1 --global-batch-size 1 --max-steps "$steps" --warmup-steps 10 --constant-steps 0
            --eval-interval "$steps" --eval-iters 2 --log-interval 20 --workers 2 --disable-tensorboard-logger
            --no-activation-checkpointing ${AB_GRAPH---cuda-graph} checkpoint.save=null
            --mixed-precision-recipe "${AB_RECIPE:-bf16_mixed}" ${AB_FLAGS:-})
    names=(work); for t in "$trees"/*/; do [ -d "$t/src" ] && names+=("$(basename "$t")"); done
    for i in $(seq "${AB_REPEATS:-2}"); do
      for name in "${names[@]}"; do
        src=$PWD/src; [ "$name" = work ] || src=$PWD/$trees/$name/src
        log="$OUT/ab_${name}_$i.log"
        PYTHONPATH=/tmp/site:$src:$PWD/tests timeout "${AB_TIMEOUT:-300}" train_evo2 "${common[@]}" \
          --result-dir "/tmp/ab_$name" > "$log" 2>&1
        echo "$name round $i: rc=$? tracebacks=$(grep -c Traceback "$log")" \
             "$(grep -E 'validation loss' "$log" | head -1 | grep -oE 'lm loss value: [0-9.E+-]+')"
        rm -rf "/tmp/ab_$name"
      done
    done
    for name in "${names[@]}"; do
      python3 benchmarks/train_log_summary.py "$OUT"/ab_"$name"_[0-9]*.log --from-step 40 | grep -v "^{"
    done
    ;;
  *) echo "usage: $0 prepare REV [REV ...] | run" >&2; exit 2 ;;
esac
