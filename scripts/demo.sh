#!/usr/bin/env bash
# README command 1: set everything up, then run the main job end to end on the embedded tiny model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/af3trt demo "$@"
