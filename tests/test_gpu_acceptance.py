"""GPU acceptance, run on a GPU host inside the serving container (docker/Dockerfile). The only test of the suite
that skips itself, and only when there is no GPU or no trtllm-build:

    pytest tests/test_gpu_acceptance.py -m gpu -s
    AF3TRT_REAL_CHECKPOINT=/data/audio-flamingo-3-hf pytest tests/test_gpu_acceptance.py -m gpu -s

It does what a user does, in the two Pythons of the container:
  1. export side (AF3TRT_EXPORT_PYTHON, default /opt/af3trt/export-venv/bin/python): `af3trt synth --preset tiny-gpu`
     (decoder head size 64: TensorRT-LLM has generation kernels for 32…256 only, build/gpu_check.py) and
     `af3trt build --target gpu --prepare-only`, which also writes the golden answers with transformers;
  2. container side (this Python): `af3trt build --from-prepared OUT`, then `af3trt gpu-check OUT`, which serves the
     repository and compares with the goldens (pass rules in build/gpu_check.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from af3trt.build import gpu_check
from af3trt.build.build_engines import main as build_main
from af3trt.registry import supports_fp8
from af3trt.runtime.engines.gpus import detect_gpu

GPU = detect_gpu()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(GPU is None, reason="needs an NVIDIA GPU (nvidia-smi found none)"),
    pytest.mark.skipif(shutil.which("trtllm-build") is None, reason="needs a GPU host with trtllm-build "
                       "(TensorRT-LLM 1.2; see docker/Dockerfile)"),
]

EXPORT_VENV_PYTHON = Path("/opt/af3trt/export-venv/bin/python")
EXPORT_PYTHON = os.environ.get("AF3TRT_EXPORT_PYTHON") or (
    str(EXPORT_VENV_PYTHON) if EXPORT_VENV_PYTHON.exists() else sys.executable)


def export_side(*args: str) -> None:
    subprocess.run([EXPORT_PYTHON, "-m", "af3trt.cli", *args], check=True)


def checkpoints(root: Path):
    ckpt = root / "af3-tiny-gpu"
    export_side("synth", "--preset", "tiny-gpu", "--dtype", "bfloat16", "--out", str(ckpt))
    yield "tiny-gpu", ckpt
    real = os.environ.get("AF3TRT_REAL_CHECKPOINT")
    if real:
        yield "real", Path(real)


@pytest.mark.parametrize("precision", ["bf16", "fp8" if GPU and supports_fp8(GPU.sm) else "int8_wo"])
def test_gpu_check_passes(tmp_path_factory, precision):
    root = tmp_path_factory.mktemp(f"gpu-{precision}")
    for name, ckpt in checkpoints(root):
        out = root / f"{name}-{precision}"
        export_side("build", "--hf-model", str(ckpt), "--out", str(out), "--target", "gpu", "--precision", precision,
                    "--max-batch-size", "4", "--max-audio-seconds", "60", "--prepare-only")
        build_main(["--from-prepared", str(out)])
        assert gpu_check.main([str(out)]) == 0, f"gpu-check failed for {name} {precision} (see its report above)"
