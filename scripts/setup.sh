#!/usr/bin/env bash
# Sets up everything af3trt needs on a fresh Debian 12 machine of this project's kind (2 cores, no GPU):
# Debian packages, a venv in .venv with Python 3.11, torch 2.13 CPU, the tritonserver 2.51 binary (nvidia-pytriton
# wheel), tritonclient[all]==2.51.0 (perf_analyzer), nvidia-modelopt, MkDocs (docs/), and af3trt itself (editable).
# Every pip install is constrained by the lock, constraints.txt (the versions the suite last passed with; moved
# forward by scripts/lock.sh, see docs/install.md), so a fresh machine next month gets the same packages.
# Safe to re-run: each step is skipped when already done; a change of pyproject.toml, this script or the lock
# re-runs the pip step.
#   AF3TRT_VENV (default .venv) and AF3TRT_LOCK (default constraints.txt): scripts/lock.sh sets both
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
for pkg in libb64-0d libsndfile1 sox espeak-ng haproxy; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "== apt-get install ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# deploy/ renders with Kustomize: kubectl's built-in one (this machine image's kubectl 1.32) or a kustomize binary
command -v kustomize >/dev/null || command -v kubectl >/dev/null \
  || echo "== warning: neither kustomize nor kubectl on PATH: tests/test_deploy.py cannot render deploy/" >&2

venv=${AF3TRT_VENV:-.venv}
lock=${AF3TRT_LOCK:-constraints.txt}
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x "$venv/bin/python" ]; then
  echo "== creating $venv with $($PY --version)"
  "$PY" -m venv "$venv"
  "$venv/bin/pip" install -q -c "$lock" --upgrade pip
fi

stamp=$venv/.af3trt-setup
want=$(cat pyproject.toml scripts/setup.sh "$lock" constraints-scan.txt constraints-aiperf.txt | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "== pip install -c $lock (torch 2.13 CPU, transformers, onnxruntime, tritonserver 2.51, tritonclient, af3trt)"
  # torch first and alone: the lock's CPU build, before any package can ask for a (CUDA) torch of its own
  "$venv/bin/pip" install -q -c "$lock" torch
  "$venv/bin/pip" install -q -c "$lock" -e ".[export,server,perf,test,quant,deploy,gpu-kernels,docs]"
  # modelopt's ONNX side (PTQ, fp16/bf16 casts), without their dependency pins; versions: the lock's held lines
  "$venv/bin/pip" install -q -c "$lock" --no-deps onnx-graphsurgeon onnxslim polygraphy onnxconverter-common lief \
      onnxscript onnx-ir colorama
  # checkov (the `scan` extra: tests/test_deploy.py scans deploy/ and docker/Dockerfile) in a venv of its own: its pins
  # (packaging<24, networkx 2.x) would downgrade the project's; its own lock is constraints-scan.txt
  [ -x "$venv/checkov/bin/python" ] || "$PY" -m venv "$venv/checkov"
  "$venv/checkov/bin/pip" install -q -c constraints-scan.txt $("$venv/bin/python" -c \
      "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['scan'])")
  # aiperf (the `aiperf` extra: af3trt bench --serving-path, tests/test_openai_server.py) in a venv of its own: its pins
  # (huggingface-hub<2, datasets, dash) would downgrade the project's; its own lock is constraints-aiperf.txt
  [ -x "$venv/aiperf/bin/python" ] || "$PY" -m venv "$venv/aiperf"
  "$venv/aiperf/bin/pip" install -q -c constraints-aiperf.txt $("$venv/bin/python" -c \
      "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['aiperf'])")
  echo "$want" > "$stamp"
fi
# `scripts/test.sh --fast` skips the import check below (13 s here): the stamp says the packages are installed, and the
# tests import them anyway.
[ "${AF3TRT_SETUP_SKIP_CHECK:-0}" = 1 ] && exit 0
"$venv/bin/python" - <<'PY'
import numpy, torch, transformers, onnxruntime, modelopt.onnx.quantization, modelopt.torch.quantization, triton
from af3trt.runtime.serve.server import find_tritonserver
from af3trt.perf.analyzer import find_perf_analyzer
assert numpy.__version__.startswith("1."), f"numpy {numpy.__version__}: the Triton 2.51 python backend needs numpy<2"
print(f"== ready: torch {torch.__version__}, transformers {transformers.__version__}, onnxruntime "
      f"{onnxruntime.__version__}, numpy {numpy.__version__}, tritonserver {find_tritonserver()}, "
      f"perf_analyzer {find_perf_analyzer()}")
PY
