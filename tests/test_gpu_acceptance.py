"""GPU acceptance, run on a GPU host inside the serving container (docker/Dockerfile):

    AF3TRT_REQUIRE_GPU=1 pytest tests/test_gpu_acceptance.py -m gpu -s
    AF3TRT_REQUIRE_GPU=1 AF3TRT_REAL_CHECKPOINT=/data/audio-flamingo-3-hf pytest tests/test_gpu_acceptance.py -m gpu -s

Without a GPU or without trtllm-build it skips, and says so, unless AF3TRT_REQUIRE_GPU=1: then it FAILS, so that an
acceptance run on a machine without the container cannot report green having checked nothing (it is the only test
of the suite that may skip itself).

It does what a user does, in the two Pythons of the container, one build per step, in this order (the case most
likely to fail first):
  1. bf16 with think/   `af3trt synth --preset tiny-gpu --think` (decoder head size 64: TensorRT-LLM has generation
                        kernels for 32…256 only, build/gpu_check.py), the LoRA sent in bf16 by the decoder front
  2. bf16               the same checkpoint without think/ (--no-think)
  3. fp8                (int8_wo on a GPU without FP8, e.g. an A100)
each: export side (AF3TRT_EXPORT_PYTHON, default /opt/af3trt/export-venv/bin/python) `af3trt build --target gpu
--prepare-only` (which writes the golden answers with transformers), then this Python's `af3trt build
--from-prepared OUT` and `af3trt gpu-check OUT`: the goldens (thinking ones for step 1), then the serving exercises
(build/gpu_check.py exercise): thinking, a stream, a stop, a 10-minute clip and an encoder cache fill.

Expected duration per step on an H100 with the tiny-gpu checkpoint (projections, not measured: no GPU has run this
yet): prepare 3-5 min (CPU: ONNX export and validation, modelopt checkpoint, goldens; fp8 adds calibration), engines
1-3 min, gpu-check 2-4 min (tritonserver start, goldens, the exercises' three-plus 10-minute clips): about 6-12 min a
step, 20-35 min for the three. With AF3TRT_REAL_CHECKPOINT each step adds the real AF3 (export 20-40 min on CPU,
trtllm-build 10-20 min, gpu-check 5-10 min).
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
REQUIRED = os.environ.get("AF3TRT_REQUIRE_GPU") == "1"
MISSING = ("no NVIDIA GPU (nvidia-smi found none)" if GPU is None else
           "no trtllm-build (TensorRT-LLM 1.2; see docker/Dockerfile)" if shutil.which("trtllm-build") is None else None)
pytestmark = [pytest.mark.gpu]

EXPORT_VENV_PYTHON = Path("/opt/af3trt/export-venv/bin/python")
EXPORT_PYTHON = os.environ.get("AF3TRT_EXPORT_PYTHON") or (
    str(EXPORT_VENV_PYTHON) if EXPORT_VENV_PYTHON.exists() else sys.executable)
# (step name, precision, think/) in the order they run: bf16 with think/ first, the case most likely to fail
STEPS = [("bf16-think", "bf16", True), ("bf16", "bf16", False),
         ("fp8", "fp8", False) if GPU is not None and supports_fp8(GPU.sm) else ("int8_wo", "int8_wo", False)]


def require_gpu_host() -> None:
    """Skip without a GPU host, or fail when AF3TRT_REQUIRE_GPU=1 asks for an acceptance run."""
    if MISSING is None:
        return
    if REQUIRED:
        pytest.fail(f"AF3TRT_REQUIRE_GPU=1 but this machine has {MISSING}: the GPU acceptance run checked nothing; "
                    f"run it inside the serving container on a GPU host")
    pytest.skip(f"needs a GPU host: {MISSING} (AF3TRT_REQUIRE_GPU=1 makes this a failure)")


def export_side(*args: str) -> None:
    subprocess.run([EXPORT_PYTHON, "-m", "af3trt.cli", *args], check=True)


def checkpoints(root: Path, think: bool):
    ckpt = root / ("af3-tiny-gpu-think" if think else "af3-tiny-gpu")
    export_side("synth", "--preset", "tiny-gpu", "--dtype", "bfloat16", "--out", str(ckpt), *(["--think"] if think else []))
    yield "tiny-gpu", ckpt
    real = os.environ.get("AF3TRT_REAL_CHECKPOINT")
    if real:
        yield "real", Path(real)


@pytest.mark.parametrize("step,precision,think", STEPS, ids=[s[0] for s in STEPS])
def test_gpu_check_passes(tmp_path_factory, step, precision, think):
    require_gpu_host()
    root = tmp_path_factory.mktemp(f"gpu-{step}")
    for name, ckpt in checkpoints(root, think):
        out = root / f"{name}-{step}"
        export_side("build", "--hf-model", str(ckpt), "--out", str(out), "--target", "gpu", "--precision", precision,
                    "--max-batch-size", "4", "--max-audio-seconds", "600", "--prepare-only",
                    *([] if think else ["--no-think"]))
        build_main(["--from-prepared", str(out)])
        assert gpu_check.main([str(out)]) == 0, f"gpu-check failed for {name} {step} (see its report above)"
