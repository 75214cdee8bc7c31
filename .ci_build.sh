#!/usr/bin/env bash
# Create ./.venv (Python 3.12) and install evo2-recipe with everything it needs. Idempotent: a second run with
# unchanged requirement files returns in a second.
#
# Works on a fresh CPU-only machine (torch from PyPI, Megatron-Bridge without its GPU-only builds) and on a GPU
# machine or NGC PyTorch container (if the system Python 3.12 already has torch, the venv reuses it through
# --system-site-packages, so the container's CUDA torch and Transformer Engine stay in use).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

MEGATRON_BRIDGE_VERSION=0.6.2
NVRX_VERSION=0.6.0
TORCH_SPEC="${EVO2_TORCH_SPEC:-torch>=2.6}"

find_python() {
  for cand in "${EVO2_PYTHON:-}" python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12 /usr/bin/python3 python3; do
    [ -n "$cand" ] || continue
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
      command -v "$cand"; return 0
    fi
  done
  echo "error: Python 3.12 not found. Install it (e.g. 'pyenv install 3.12') or set EVO2_PYTHON=/path/to/python3.12" >&2
  return 1
}

stamp_inputs() { cat .ci_build.sh pyproject.toml requirements/*.txt | sha256sum | cut -d' ' -f1; }
STAMP=.venv/.evo2_build_stamp
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(stamp_inputs)" ] && .venv/bin/python -c 'import evo2_recipe' 2>/dev/null; then
  echo "[.ci_build.sh] .venv is up to date"
  exit 0
fi

PY="$(find_python)"
echo "[.ci_build.sh] using $PY ($("$PY" --version))"
if [ ! -x .venv/bin/python ]; then
  if "$PY" -c 'import torch' 2>/dev/null; then
    echo "[.ci_build.sh] system torch found: venv with --system-site-packages (NGC container mode)"
    "$PY" -m venv --system-site-packages .venv
  else
    "$PY" -m venv .venv
  fi
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip setuptools wheel

# torch: the container's if present, else PyPI (a CUDA build; on CPU it runs on the CPU).
if ! .venv/bin/python -c 'import torch' 2>/dev/null; then
  "${PIP[@]}" install -q "$TORCH_SPEC"
fi

"${PIP[@]}" install -q -r requirements/base.txt -r requirements/test.txt
"${PIP[@]}" install -q --no-deps "megatron-bridge==${MEGATRON_BRIDGE_VERSION}"

# nvidia-resiliency-ext: megatron-core 0.19.2 asserts >= 0.6.0 at import time whenever it is importable, and
# Megatron-Bridge's pretrain imports it. 0.6.0 ships manylinux_2_39 wheels only; on an older glibc (Debian 12 has
# 2.36) its pure-Python part works, so the wheel is re-tagged (its optional CUPTI extension is never loaded).
if ! .venv/bin/python -c "import importlib.metadata as m, sys; sys.exit(m.version('nvidia-resiliency-ext') != '${NVRX_VERSION}')" 2>/dev/null; then
  GLIBC_MINOR="$(.venv/bin/python -c 'import platform; print(platform.libc_ver()[1].split(".")[1])')"
  if [ "$GLIBC_MINOR" -ge 39 ]; then
    "${PIP[@]}" install -q --no-deps "nvidia-resiliency-ext==${NVRX_VERSION}"
  else
    WHL_DIR="$(mktemp -d)"
    "${PIP[@]}" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_39_x86_64 -d "$WHL_DIR" "nvidia-resiliency-ext==${NVRX_VERSION}"
    for whl in "$WHL_DIR"/*.whl; do mv "$whl" "${whl/manylinux_2_39/manylinux_2_31}"; done
    "${PIP[@]}" install -q --no-deps "$WHL_DIR"/*.whl
    rm -rf "$WHL_DIR"
  fi
fi

"${PIP[@]}" install -q --no-deps --no-build-isolation -e .
# The check imports as our CLIs do (their log setup and runtime mode), so a real failure is the only traceback shown.
.venv/bin/python -c 'from evo2_recipe.cli.common import apply_runtime_mode, setup_logging; setup_logging(); apply_runtime_mode(); import megatron.core, megatron.bridge' \
  || { echo "[.ci_build.sh] import check failed" >&2; exit 1; }
stamp_inputs > "$STAMP"
echo "[.ci_build.sh] done: source .ci_test_env.sh to activate"
