"""Processes as Linux's /proc shows them (proc(5)): the one place af3trt reads /proc, one rule per question.

- alive(pid): /proc/<pid>/stat exists and its state is neither Z (zombie) nor X (dead);
- parents(), children(pid), descendants(pid): the tree of the processes that are alive, from field 4 (ppid) of stat;
- cmdline(pid): argv, [] when the process is gone;
- stub_pids(root), stub_names(root): Triton's python-backend stubs anywhere below `root` (tritonserver, or mpirun
  above its ranks under TP > 1), by their argv as Triton starts them: argv[0] is `triton_python_backend_stub`,
  argv[1] the model's `<repo>/<model>/<version>/model.py`;
- cpu_seconds(pid): utime + stime (stat fields 14 and 15, in clock ticks); a process that is gone raises
  ProcessLookupError (an OSError); tree_cpu_seconds(pid): the same over pid and its descendants alive;
- status_kb(pid, field), rss_mb(pid), peak_rss_mb(pid): a `Vm…` line of /proc/<pid>/status (VmRSS: resident now,
  VmHWM: its peak); 0 when the process is gone;
- cpu_jiffies(), meminfo_bytes(): the whole machine (/proc/stat's cpu line; /proc/meminfo).

ROOT is /proc; tests point it at a fake tree.

    stub_pids(server.proc.pid)  # {'decoder': {4242}, 'fusion': {4240}, ...}
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path("/proc")
STUB = "triton_python_backend_stub"  # the python backend's stub executable (Triton starts one per model instance)


def stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (whose parentheses may hold anything): [0] is field 3
    (state), [1] field 4 (ppid), [11] and [12] fields 14 and 15 (utime, stime); None when the process is gone."""
    try:
        text = (ROOT / str(pid) / "stat").read_text()
    except OSError:
        return None
    return text.rpartition(")")[2].split() or None


def alive(pid: int) -> bool:
    fields = stat(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def parents() -> dict[int, int]:
    """{pid: parent pid} of every process alive."""
    out = {}
    for d in ROOT.iterdir():
        if d.name.isdigit() and (fields := stat(int(d.name))) is not None and fields[0] not in ("Z", "X"):
            out[int(d.name)] = int(fields[1])
    return out


def children(parent: int) -> list[int]:
    """The processes alive whose parent is `parent`."""
    return sorted(pid for pid, ppid in parents().items() if ppid == parent)


def descendants(root: int) -> list[int]:
    """The processes alive below `root`, at any depth (root itself not included)."""
    kids: dict[int, list[int]] = {}
    for pid, ppid in parents().items():
        kids.setdefault(ppid, []).append(pid)
    out, todo = [], list(kids.get(root, ()))
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += kids.get(pid, ())
    return sorted(out)


def cmdline(pid: int) -> list[str]:
    """argv of a process; [] when it is gone (or a kernel thread)."""
    try:
        raw = (ROOT / str(pid) / "cmdline").read_bytes()
    except OSError:
        return []
    argv = raw.split(b"\0")
    if argv[-1] == b"":  # the NUL that ends the last argument
        argv.pop()
    return [a.decode(errors="replace") for a in argv]


def stub_model(argv: list[str]) -> str | None:
    """The model a python-backend stub serves (its model.py's folder two levels up), None for another process."""
    if len(argv) > 1 and Path(argv[0]).name == STUB and Path(argv[1]).name == "model.py":
        return Path(argv[1]).parent.parent.name
    return None


def stub_pids(root: int) -> dict[str, set[int]]:
    """{model: pids of its python stubs alive} anywhere below `root`."""
    out: dict[str, set[int]] = {}
    for pid in descendants(root):
        if (model := stub_model(cmdline(pid))) is not None:
            out.setdefault(model, set()).add(pid)
    return out


def stub_names(root: int) -> dict[str, int]:
    """{name: pid} of the python stubs below `root`: a model's name, and for its second instance on `model#2`, …
    (by pid)."""
    out = {}
    for model, pids in sorted(stub_pids(root).items()):
        for k, pid in enumerate(sorted(pids), start=1):
            out[model if k == 1 else f"{model}#{k}"] = pid
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process. Raises ProcessLookupError when it is gone."""
    fields = stat(pid)
    if fields is None:
        raise ProcessLookupError(f"process {pid} is gone (no /proc/{pid}/stat)")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of `pid` and its descendants alive (tritonserver and its python stubs); a process
    that ends meanwhile counts 0."""
    total = 0.0
    for p in [pid, *descendants(pid)]:
        try:
            total += cpu_seconds(p)
        except ProcessLookupError:
            pass
    return total


def status_kb(pid: int, field: str) -> int:
    """A `<field>: <n> kB` line of /proc/<pid>/status (VmRSS, VmHWM, …); 0 when the process is gone or has no such
    line (a kernel thread)."""
    try:
        for line in (ROOT / str(pid) / "status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_mb(pid: int) -> float:
    """Resident set (VmRSS) in MB; 0 when the process is gone."""
    return status_kb(pid, "VmRSS") / 1024


def peak_rss_mb(pid: int) -> float:
    """Peak resident set (VmHWM) in MB; 0 when the process is gone."""
    return status_kb(pid, "VmHWM") / 1024


def cpu_jiffies() -> tuple[int, int] | None:
    """(total, idle + iowait) clock ticks of all CPUs since boot, from /proc/stat's first line; None without it."""
    try:
        fields = [int(v) for v in (ROOT / "stat").read_text().splitlines()[0].split()[1:]]
        return sum(fields), fields[3] + fields[4]
    except (OSError, ValueError, IndexError):
        return None


def meminfo_bytes(text: str | None = None, key: str = "MemTotal") -> int | None:
    """A /proc/meminfo entry in bytes (`text`: that file's content, read when None); None when it is absent."""
    if text is None:
        try:
            text = (ROOT / "meminfo").read_text()
        except OSError:
            return None
    for line in text.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return None
