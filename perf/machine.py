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
    from af3trt.build.common import versions

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


def cpu_sample(pid: int | None = None) -> dict:
    """Jiffies of the whole machine (total, idle) and CPU seconds of process `pid` and its descendants (the
    tritonserver we started and its python-backend stubs); two samples give busy cores over an interval."""
    out = {"t": None, "total": 0, "idle": 0, "tree_s": None}
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        out.update(total=sum(fields), idle=fields[3] + fields[4])
    except (OSError, ValueError, IndexError):
        return out
    import time

    out["t"] = time.monotonic()
    if pid is not None:
        out["tree_s"] = sum(_proc_cpu_s(p) for p in _descendants(pid))
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


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, stack = [], [pid]
    while stack:
        p = stack.pop()
        out.append(p)
        stack += children.get(p, [])
    return out


def _proc_cpu_s(pid: int) -> float:
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0
