"""Which GPU the engines are built for, and which precisions it can run.

A TensorRT engine is specific to the GPU architecture it was built on, so the build normally runs on the serving
GPU and detects it with nvidia-smi. To prepare a build (quantize, validate, derive trtllm-build flags, size) on a
machine without one, declare the target: `--gpu h100`.

What TensorRT-LLM 1.2 can run where (its builder.py and the TensorRT support matrix):
  FP8 weights or FP8 KV cache   SM 8.9+ (Ada L4/L40S, Hopper H100/H200, Blackwell); not A100 (8.0) or A10 (8.6)
  bf16                          SM 8.0+ (Ampere and newer)
  INT8/INT4 weight-only, SmoothQuant, INT8 KV cache   not on SM 10.x (B200/GB200): the 1.2 builder raises
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from dataclasses import asdict, dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: tuple[int, int]
    memory_mib: int  # nvidia-smi memory.total
    declared: bool = False  # True when named by the user rather than detected

    @property
    def sm(self) -> int:
        return self.compute_capability[0] * 10 + self.compute_capability[1]

    @property
    def memory_bytes(self) -> int:
        return self.memory_mib * 1024 * 1024

    def as_dict(self) -> dict:
        d = asdict(self)
        d["sm"] = self.sm
        return d


# Targets one can declare; memory as nvidia-smi reports it for the common SKU.
KNOWN_GPUS = {
    "h100": GpuInfo("NVIDIA H100 80GB HBM3", (9, 0), 81559, True),
    "h200": GpuInfo("NVIDIA H200", (9, 0), 143771, True),
    "b200": GpuInfo("NVIDIA B200", (10, 0), 183359, True),
    "a100": GpuInfo("NVIDIA A100-SXM4-80GB", (8, 0), 81920, True),
    "a100-40gb": GpuInfo("NVIDIA A100-SXM4-40GB", (8, 0), 40960, True),
    "a10": GpuInfo("NVIDIA A10", (8, 6), 23028, True),
    "l40s": GpuInfo("NVIDIA L40S", (8, 9), 46068, True),
    "l4": GpuInfo("NVIDIA L4", (8, 9), 23034, True),
    "t4": GpuInfo("Tesla T4", (7, 5), 15360, True),
}

FP8_MIN_SM = 89
BF16_MIN_SM = 80
NO_INT8_SMS = range(100, 120)  # builder.py: "INT8/INT4 quantization is not supported on SM>=100" (and < 120)


class PrecisionError(ValueError):
    """The precision cannot run on the target GPU."""


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


def detect_gpus(nvidia_smi: str = "nvidia-smi", timeout: float = 20.0) -> list[GpuInfo]:
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


def check_precision(precision: str, kv_cache: str = "auto", gpu: GpuInfo | None = None) -> list[str]:
    """Raise PrecisionError when `gpu` cannot run this precision; return notes (e.g. when nothing could be checked)."""
    if gpu is None:
        return ["no GPU detected and none declared (--gpu): precision support was not checked"]
    problems = []
    fp8_parts = [what for what, on in (("FP8 weights", precision == "fp8"), ("an FP8 KV cache", kv_cache == "fp8"))
                 if on]
    if fp8_parts and gpu.sm < FP8_MIN_SM:
        problems.append(f"{' and '.join(fp8_parts)} need an SM 8.9+ GPU (Ada L4/L40S, Hopper H100/H200, Blackwell); "
                        f"{gpu.name} is SM {gpu.compute_capability[0]}.{gpu.compute_capability[1]}. "
                        f"Use int8_wo, int8_sq or int4_awq weights and an int8 or auto KV cache there.")
    if gpu.sm < BF16_MIN_SM and precision != "fp16":
        problems.append(f"{gpu.name} (SM {gpu.sm}) has no bf16 tensor cores; build with --precision fp16")
    int8_parts = [what for what, on in (("INT8/INT4 weights", precision in ("int8_wo", "int8_sq", "int4_awq")),
                                        ("an INT8 KV cache", kv_cache == "int8")) if on]
    if int8_parts and gpu.sm in NO_INT8_SMS:
        problems.append(f"{' and '.join(int8_parts)}: TensorRT-LLM 1.2 refuses INT8/INT4 quantization on SM "
                        f"{gpu.sm} ({gpu.name}); use fp8 (or bf16) with an fp8 KV cache")
    if problems:
        raise PrecisionError(f"precision {precision} with KV cache {kv_cache} on {gpu.name}: " + " ".join(problems))
    return []
