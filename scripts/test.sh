#!/usr/bin/env bash
# Set up a fresh virtual environment and run the linters and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
# The web UI's browser test drives Debian's chromium (playwright's own browser download cannot work here).
if ! command -v chromium >/dev/null 2>&1; then
  sudo_cmd=""; [ "$(id -u)" = 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq chromium >/dev/null
fi
python3 -m venv .venv
. .venv/bin/activate
bash scripts/setup.sh
ruff check src tests
python -m pytest -q --durations=25 "$@"
