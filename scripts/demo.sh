#!/usr/bin/env bash
# Set up (first run only) and start the live demo on the simulated camera with shipped weights.
# Extra arguments go to `livesr demo`, e.g. scripts/demo.sh --engine convgru --size 128
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/livesr demo "$@"
