#!/usr/bin/env bash
# Set up a virtual environment (or reuse an existing one), install lnshift with its test extras, lint, and run the tests.
# This is the README's test command and exactly what CI runs (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${LNSHIFT_VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
# torch first, at the versions this workplace serves from local disk; elsewhere the same pins come from PyPI
python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
python -m pip install -q -e ".[test]"
ruff check .
ruff format --check .
python -m pytest -q "$@"
