#!/usr/bin/env bash
# Create .venv with livesr and its dependencies (idempotent; fast when already installed).
# CPU machines get the CPU build of torch; machines with an NVIDIA driver get the default
# (CUDA) build. Override with LIVESR_TORCH="torch==X.Y.Z" or LIVESR_TORCH_INDEX=URL.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${LIVESR_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  echo "[install] creating $VENV"
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
stamp="$VENV/.livesr-installed"
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; then
  exit 0
fi
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if [ -n "${LIVESR_TORCH:-}" ]; then
    $PIP install -q ${LIVESR_TORCH_INDEX:+--index-url "$LIVESR_TORCH_INDEX"} "$LIVESR_TORCH"
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "[install] NVIDIA GPU found: installing the CUDA build of torch"
    $PIP install -q "torch>=2.4"
  else
    echo "[install] no GPU: installing the CPU build of torch 2.13.0"
    $PIP install -q "torch==2.13.0" || \
      $PIP install -q --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0"
  fi
fi
echo "[install] installing livesr and its dependencies into $VENV"
$PIP install -q -e ".[test]"
touch "$stamp"
