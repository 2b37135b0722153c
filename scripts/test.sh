#!/usr/bin/env bash
# Set up a fresh virtual environment and run the linters and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
bash scripts/setup.sh
ruff check src tests
python -m pytest -q "$@"
