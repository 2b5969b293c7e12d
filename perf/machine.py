"""Where a benchmark ran: CPU (lscpu), cores, RAM, load, GPUs if any, package versions, the code's commit."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import time
from pathlib import Path

from af3trt.runtime.host.proc import cpu_jiffies, meminfo_bytes, tree_cpu_seconds

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


def describe(repo_root: Path | None = None) -> dict:
    from af3trt.build.common import versions

    gpus = _run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"]).strip() \
        if shutil.which("nvidia-smi") else ""
    commit = _run(["git", "-C", str(repo_root), "rev-parse", "--short", "HEAD"]).strip() if repo_root else ""
    dirty = bool(_run(["git", "-C", str(repo_root), "status", "--porcelain", "--untracked-files=no"]).strip()) \
        if repo_root else False
    return {
        "cpu": parse_lscpu(_run(["lscpu"])), "logical_cpus": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "ram_bytes": meminfo_bytes(), "gpus": gpus or None, "os": platform.platform(),
        "python": platform.python_version(), "versions": versions(),
        "commit": (commit + ("+dirty" if dirty else "")) or None,
    }


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def cpu_sample(pid: int | None = None) -> dict:
    """Jiffies of the whole machine (total, idle) and CPU seconds of process `pid` and its descendants (the
    tritonserver we started and its python-backend stubs); two samples give busy cores over an interval."""
    out = {"t": None, "total": 0, "idle": 0, "tree_s": None}
    jiffies = cpu_jiffies()
    if jiffies is None:
        return out
    out.update(t=time.monotonic(), total=jiffies[0], idle=jiffies[1])
    if pid is not None:
        out["tree_s"] = tree_cpu_seconds(pid)
    return out


def busy_cores(a: dict, b: dict) -> dict:
    """Cores in use between two cpu_sample()s: all processes, and the sampled process tree."""
    if a.get("t") is None or b.get("t") is None or b["total"] <= a["total"]:
        return {}
    cpus = os.cpu_count() or 1
    out = {"machine_busy_cores": cpus * (1 - (b["idle"] - a["idle"]) / (b["total"] - a["total"]))}
    if a.get("tree_s") is not None and b.get("tree_s") is not None and b["t"] > a["t"]:
        out["server_cores"] = (b["tree_s"] - a["tree_s"]) / (b["t"] - a["t"])
    return out
