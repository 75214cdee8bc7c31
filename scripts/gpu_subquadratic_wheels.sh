#!/usr/bin/env bash
# NVIDIA's subquadratic-ops-torch (for --use-subquadratic-ops) on the lent GPU machine, which cannot download.
# Its wheel is ~230 MB, over the 64 MiB one GPU command may carry, so it travels in chunks like Transformer Engine's
# (../shared/tools/gpu_te.sh). Here, in the repository root (needs the package registry):
#   bash scripts/gpu_subquadratic_wheels.sh          -> .sq/part0 ... .sq/part4 (git-ignored)
# Then five GPU commands back to back, each carrying ONE folder:
#   .sq/part0:            mkdir -p /tmp/sq && cp .sq/part0/* /tmp/sq/
#   .sq/part1 ... part3:  cp .sq/partN/* /tmp/sq/
#   .sq/part4:            cp .sq/part4/* /tmp/sq/ && bash /tmp/sq/install.sh      (into /tmp/site)
# and later: PYTHONPATH=/tmp/site:$PWD/src python3 -m pytest tests/test_subquadratic.py
# (cuDNN >= 9.24 is needed by its b2b kernel; otherwise our start check logs why and our kernels run.)
set -euo pipefail
dest="${SQ_DIR:-.sq}"
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform any -d "$tmp" "subquadratic-ops-torch-cu13==0.3.1" \
  "apache-tvm-ffi>=0.1.12,<0.2" "nvidia-cudnn-frontend>=1.27.0"
core="$(basename "$(ls "$tmp"/subquadratic_ops_torch_cu13-*.whl)")"
rm -rf "$dest"; mkdir -p "$dest"/part{0,1,2,3,4}
(cd "$tmp" && sha256sum "$core" > core.sha256 && split -b 60M -d -a 1 "$core" core.part && rm "$core")
for i in 0 1 2 3; do [ -f "$tmp/core.part$i" ] && mv "$tmp/core.part$i" "$dest/part$i/"; done
[ ! -f "$tmp/core.part4" ] || { echo "wheel needs more than 4 chunks" >&2; exit 1; }
mv "$tmp"/core.sha256 "$tmp"/*.whl "$dest/part4/"
cat > "$dest/part4/install.sh" <<SH
set -e
cd /tmp/sq
cat core.part0 core.part1 core.part2 core.part3 > $core
sha256sum -c core.sha256 && rm -f core.part*
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site *.whl
PYTHONPATH=/tmp/site python3 -c "import subquadratic_ops_torch.fft_causal_conv1d, subquadratic_ops_torch.b2b_causal_conv1d; print('subquadratic_ops_torch imports')"
SH
du -sh "$dest"/part*
