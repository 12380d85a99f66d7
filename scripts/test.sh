#!/usr/bin/env bash
# Set up (if needed) and run the lint and the test suite, as CI does:  bash scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${VENV:-.venv}
"$VENV/bin/ruff" check .
"$VENV/bin/python" -m pytest -q --durations=10 "$@"
