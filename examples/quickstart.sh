#!/usr/bin/env bash
# Quick start: preprocess the bundled real phage genomes, train striped_hyena_tiny on them (CPU, or GPU when
# present) to a validation loss well below ln 4 = 1.386 nats/base, and save a checkpoint. ~4 minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
RESULTS="${RESULTS:-outputs/quickstart}"
preprocess_evo2 --config examples/configs/phage_preprocess.yaml --no-progress
rm -rf "$RESULTS"
train_evo2 -d examples/configs/phage_dataset.yaml --model-size striped_hyena_tiny --seq-length 1024 \
  --micro-batch-size 4 --global-batch-size 8 --max-steps 200 --warmup-steps 10 --constant-steps 0 \
  --lr 3e-3 --min-lr 3e-4 --eval-interval 100 --eval-iters 4 --workers 0 --log-interval 20 \
  --result-dir "$RESULTS" --experiment-name phage_tiny 2>&1 | tee "$RESULTS.log" \
  | grep -E "iteration +[0-9]+/|validation loss|successfully saved|Error|error" || true
CKPT="$RESULTS/phage_tiny/checkpoints"
[ -f "$CKPT/latest_checkpointed_iteration.txt" ] || { echo "training failed; see $RESULTS.log" >&2; exit 1; }
VAL=$(grep -E "validation loss at iteration .* on validation set" "$RESULTS.log" | tail -1 | sed -E 's/.*lm loss value: ([0-9.E+-]+).*/\1/')
echo
echo "Checkpoint: $CKPT (iteration $(cat "$CKPT/latest_checkpointed_iteration.txt")); final validation loss $VAL nats/base (ln 4 = 1.386)"
echo "Score sequences:  predict_evo2 --fasta examples/data/wichman2005_phix174_like.fasta --ckpt-dir $CKPT --output-dir outputs/predictions --output-log-prob-seqs"
echo "Generate DNA:     infer_evo2 --ckpt-dir $CKPT --prompt ATGGTTCGTTTGTTTA --max-new-tokens 100 --output-file outputs/generated.jsonl"
python - "$VAL" <<'PY'
import math, sys
val = float(sys.argv[1])
sys.exit(0 if val < math.log(4) - 0.1 else f"validation loss {val} is not clearly below ln 4")
PY
