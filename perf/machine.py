"""Where a benchmark ran: CPU (lscpu), cores, RAM, load, GPUs if any, package versions, the code's commit."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from pathlib import Path

LSCPU_KEYS = ("Model name", "Architecture", "CPU(s)", "Thread(s) per core", "Core(s) per socket", "Socket(s)",
              "CPU max MHz", "L2 cache", "L3 cache", "Flags")


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def parse_lscpu(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in LSCPU_KEYS:
            out[key.strip()] = value.strip()
    flags = out.pop("Flags", "").split()
    out["isa"] = " ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
                          if f in flags)
    return out


def meminfo_bytes(text: str, key: str = "MemTotal") -> int | None:
    for line in text.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return None


def describe(repo_root: Path | None = None) -> dict:
    from af3trt.build.build_engines import versions

    mem = Path("/proc/meminfo").read_text() if Path("/proc/meminfo").exists() else ""
    gpus = _run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"]).strip() \
        if shutil.which("nvidia-smi") else ""
    commit = _run(["git", "-C", str(repo_root), "rev-parse", "--short", "HEAD"]).strip() if repo_root else ""
    dirty = bool(_run(["git", "-C", str(repo_root), "status", "--porcelain", "--untracked-files=no"]).strip()) \
        if repo_root else False
    return {
        "cpu": parse_lscpu(_run(["lscpu"])), "logical_cpus": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "ram_bytes": meminfo_bytes(mem), "gpus": gpus or None, "os": platform.platform(),
        "python": platform.python_version(), "versions": versions(),
        "commit": (commit + ("+dirty" if dirty else "")) or None,
    }


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None
