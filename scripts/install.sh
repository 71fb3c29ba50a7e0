#!/usr/bin/env bash
# Create .venv with livesr and its dependencies (idempotent; fast when already installed).
# Machines without a working NVIDIA driver get the CPU build of torch (asked from PyTorch's CPU
# wheel index first: the default index serves the multi-GB CUDA build on Linux); machines with
# one get the default (CUDA) build. Override with LIVESR_TORCH="torch==X.Y.Z" and/or
# LIVESR_TORCH_INDEX=URL. The build that ends up installed is printed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${LIVESR_VENV:-.venv}
TORCH=${LIVESR_TORCH:-torch==2.13.0}
CPU_INDEX=${LIVESR_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
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
  if [ -n "${LIVESR_TORCH_INDEX:-}" ]; then
    echo "[install] installing $TORCH from $LIVESR_TORCH_INDEX"
    $PIP install -q --index-url "$LIVESR_TORCH_INDEX" "$TORCH"
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "[install] NVIDIA driver found: installing the default (CUDA) build of torch"
    $PIP install -q "${LIVESR_TORCH:-torch>=2.4}"
  else
    echo "[install] no NVIDIA driver: asking $CPU_INDEX for the CPU build of $TORCH"
    if ! $PIP install -q --timeout 15 --retries 0 --index-url "$CPU_INDEX" "$TORCH"; then
      echo "[install] the CPU wheel index gave no $TORCH; falling back to the default index" \
           "(on Linux that may be the CUDA build, several GB)"
      $PIP install -q "$TORCH"
    fi
  fi
fi
"$VENV/bin/python" -c "import torch; cuda = torch.version.cuda; print('[install] torch', torch.__version__, '(CUDA ' + cuda + ' build)' if cuda else '(CPU build)')"
echo "[install] installing livesr and its dependencies into $VENV"
$PIP install -q -e ".[test]"
touch "$stamp"
