#!/usr/bin/env bash
# Create .venv (if needed) and install the toolkit with its test tools.
#   bash scripts/setup.sh            # then: .venv/bin/mil --help
# TORCH_SPEC overrides the torch pin, e.g. TORCH_SPEC="torch==2.5.1 torchvision==0.20.1".
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}

if [ ! -x "$VENV/bin/python" ]; then
  echo "creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC2086
"$VENV/bin/python" -m pip install --quiet $TORCH_SPEC
"$VENV/bin/python" -m pip install --quiet -e ".[dev]"
echo "installed: $("$VENV/bin/mil" --version)"
