#!/usr/bin/env bash
# README command 2 (and CI): set up (idempotent), then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/pytest -q -rs "$@"
