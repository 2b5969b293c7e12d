"""What both build targets share: the error a user sees as a clean message, step progress, and the versions
recorded in a manifest. Imported by build_engines.py (the CPU target and the entry point) and gpu_build.py (the
GPU target); it imports nothing of af3trt's, so neither target has to import the other for it."""

from __future__ import annotations

import platform
import time
from importlib import metadata


class BuildError(RuntimeError):
    """A build that cannot go on; `af3trt build` prints it as one line (exit 2), no traceback."""


class Progress:
    """`[2/5] exporting encoder … done in 3.1 s` lines, and the timings for the manifest."""

    def __init__(self, total: int):
        self.total, self.n, self.timings = total, 0, {}

    def step(self, name: str):
        self.n += 1
        prog = self

        class _Step:
            def __enter__(self):
                print(f"[{prog.n}/{prog.total}] {name} …", flush=True)
                self.t0 = time.perf_counter()
                return self

            def __exit__(self, exc_type, *_):
                dt = time.perf_counter() - self.t0
                prog.timings[name] = round(dt, 3)
                print(f"[{prog.n}/{prog.total}] {name}: {'failed' if exc_type else 'done'} in {dt:.1f} s", flush=True)

        return _Step()


VERSIONED_PACKAGES = ("af3trt", "torch", "transformers", "onnx", "onnxruntime", "numpy", "tokenizers", "safetensors",
                      "tritonclient", "nvidia-pytriton", "nvidia-modelopt", "tensorrt", "tensorrt_llm")


def versions() -> dict[str, str]:
    """Python and the installed versions of the packages a build or a benchmark depends on (absent ones left out)."""
    out = {"python": platform.python_version()}
    for pkg in VERSIONED_PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out
