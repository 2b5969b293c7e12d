#!/usr/bin/env bash
# README command 2 (and CI): set up (idempotent), then run the whole test suite.
#   bash scripts/test.sh           the whole suite (what CI runs)
#   bash scripts/test.sh --fast    the fast tier: no tritonserver, no heavy unit test (-m "not integration and not
#                                  slow and not gpu"); AF3TRT_TESTS_FAST=1 makes any tritonserver start a test failure
# Other arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
fast=0
args=()
for a in "$@"; do
  if [ "$a" = "--fast" ]; then fast=1; else args+=("$a"); fi
done
if [ "$fast" = 1 ]; then
  AF3TRT_SETUP_SKIP_CHECK=1 bash scripts/setup.sh
else
  bash scripts/setup.sh
fi
if [ "$fast" = 1 ]; then
  export AF3TRT_TESTS_FAST=1
  exec .venv/bin/pytest -q -rs -m "not integration and not slow and not gpu" "${args[@]}"
fi
exec .venv/bin/pytest -q -rs "${args[@]}"
