#!/usr/bin/env bash
# Set up (first run only) and run the test suite headless (slow tests excluded; -m slow runs them).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export QT_QPA_PLATFORM=${QT_QPA_PLATFORM:-offscreen}
exec .venv/bin/python -m pytest "$@"
