"""Which GPUs this machine has, and which GPU a build is for (what each can run: af3trt.registry).

A TensorRT engine is specific to the GPU architecture it was built on, so the build normally runs on the serving
GPU and detects it with nvidia-smi. To prepare a build (quantize, validate, derive trtllm-build flags, size) on a
machine without one, declare the target: `--gpu h100`.

Used by the GPU build (build/gpu_build.py: target_gpu) and by `af3trt doctor` (runtime/serve/doctor.py: detect_gpus).
"""

from __future__ import annotations

import logging
import shutil
import subprocess

from af3trt.registry import KNOWN_GPUS, GpuInfo

log = logging.getLogger(__name__)


def parse_nvidia_smi(text: str) -> list[GpuInfo]:
    """GPUs from `nvidia-smi --query-gpu=name,compute_cap,memory.total --format=csv,noheader,nounits` output."""
    gpus = []
    for line in text.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 3 or not parts[0]:
            continue
        name, cap, mem = parts
        try:
            major, minor = (int(x) for x in cap.split("."))
            gpus.append(GpuInfo(name, (major, minor), int(float(mem))))
        except ValueError:
            log.warning("cannot parse nvidia-smi line %r", line)
    return gpus


def nvidia_smi_gpus(nvidia_smi: str = "nvidia-smi", timeout: float = 20.0) -> list[GpuInfo]:
    """The GPUs nvidia-smi sees; [] when there is no nvidia-smi or no GPU."""
    exe = shutil.which(nvidia_smi)
    if exe is None:
        return []
    try:
        out = subprocess.run([exe, "--query-gpu=name,compute_cap,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warning("nvidia-smi failed: %s", e)
        return []
    if out.returncode != 0:
        log.warning("nvidia-smi exited %d: %s", out.returncode, out.stderr.strip()[:200])
        return []
    return parse_nvidia_smi(out.stdout)


def detect_gpus(nvidia_smi: str = "nvidia-smi", *, torch_fallback: bool = False) -> list[GpuInfo]:
    """The GPUs nvidia-smi sees; with torch_fallback, else those torch.cuda sees (a container without nvidia-smi);
    [] when there is none."""
    found = nvidia_smi_gpus(nvidia_smi)
    if found or not torch_fallback:
        return found
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        out.append(GpuInfo(p.name, (p.major, p.minor), int(p.total_memory) // (1024 * 1024)))
    return out


def detect_gpu(nvidia_smi: str = "nvidia-smi") -> GpuInfo | None:
    """The first GPU (engines are built for one architecture), or None. Warns when GPUs differ."""
    gpus = detect_gpus(nvidia_smi)
    if not gpus:
        return None
    if len({(g.name, g.compute_capability) for g in gpus}) > 1:
        log.warning("GPUs of different kinds (%s): building for the first", ", ".join(g.name for g in gpus))
    return gpus[0]


def target_gpu(declared: str | None = None, nvidia_smi: str = "nvidia-smi") -> GpuInfo | None:
    """The declared target (`h100`, `a100`, `l40s`, ...) or else the detected GPU, or None.

    A declared target that differs from the detected GPU is an error: the engine would not run where it is built
    for, nor be tuned for the GPU it is built on.
    """
    detected = detect_gpu(nvidia_smi)
    if declared is None:
        return detected
    key = declared.strip().lower()
    if key not in KNOWN_GPUS:
        raise ValueError(f"unknown GPU {declared!r}; known: {', '.join(sorted(KNOWN_GPUS))}")
    target = KNOWN_GPUS[key]
    if detected is not None and detected.compute_capability != target.compute_capability:
        raise ValueError(f"--gpu {declared} (SM {target.sm}) but this machine has {detected.name} "
                         f"(SM {detected.sm}): TensorRT engines run only on the architecture they are built on")
    return target


def cap_cuda_memory(cap: int | None, device, model: str) -> float | None:
    """Cap this process's torch caching allocator on `device` at `cap` bytes, the model's cuda_memory_cap_bytes
    parameter (rendered from the build's memory plan, build/memory_plan.py stub_caps), so that one request cannot take
    the memory the decoder's KV cache was planned with: past the cap the request gets an out-of-memory error, the
    other models do not. torch.cuda.set_per_process_memory_fraction(fraction, device) limits the caching allocator
    to fraction x the device's total memory and raises an out-of-memory error beyond it (PyTorch docs,
    torch.cuda.set_per_process_memory_fraction). Returns the fraction set, None without a cap or on a CPU device."""
    if not cap or getattr(device, "type", str(device)) != "cuda":
        return None
    import torch

    total = torch.cuda.get_device_properties(device).total_memory
    fraction = min(1.0, cap / total)
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    log.info("%s: torch may hold %.2f GiB on %s (%.3f of it)", model, cap / 1024**3, device, fraction)
    return fraction
