"""runtime/host/proc.py, the one reader of /proc: on a fake /proc tree (every rule, exactly), and on this process."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from af3trt.runtime.host import proc


def _process(root, pid, ppid, *, state="S", name="python", utime=0, stime=0, argv=(), status=None):
    d = root / str(pid)
    d.mkdir()
    # fields 3… of proc(5): state ppid pgrp session tty_nr tpgid flags minflt cminflt majflt cmajflt utime stime
    (d / "stat").write_text(f"{pid} ({name}) {state} {ppid} 1 1 0 -1 0 0 0 0 0 {utime} {stime} 0 0 20 0 1 0\n")
    (d / "cmdline").write_bytes(b"".join(a.encode() + b"\0" for a in argv))
    (d / "status").write_text(status or "")


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A server (10) with a stub of fusion (11), two of decoder (13, 12 by pid), a zombie (14), an MPI rank (15)
    whose own stub (16) is a grandchild, and a process elsewhere (20) that runs a model.py but is no stub."""
    stub, repo = "/opt/tritonserver/backends/python/triton_python_backend_stub", "/srv/repo"
    _process(tmp_path, 1, 0, name="init")
    _process(tmp_path, 10, 1, name="tritonserver", argv=["tritonserver", "--model-repository", repo],
             utime=300, stime=100, status="Name:\ttritonserver\nVmHWM:\t  204800 kB\nVmRSS:\t  102400 kB\n")
    _process(tmp_path, 11, 10, name="triton_python_b", argv=[stub, f"{repo}/fusion/1/model.py", "shm"])
    _process(tmp_path, 13, 10, name="triton_python_b", argv=[stub, f"{repo}/decoder/1/model.py"], utime=50)
    _process(tmp_path, 12, 10, name="triton_python_b", argv=[stub, f"{repo}/decoder/1/model.py"], utime=50)
    _process(tmp_path, 14, 10, state="Z", name="a (weird) name", argv=[stub, f"{repo}/postprocess/1/model.py"],
             utime=1000)
    _process(tmp_path, 15, 10, name="orted", argv=["tritonserver", "--rank", "1"])
    _process(tmp_path, 16, 15, name="triton_python_b", argv=[stub, f"{repo}/encoder/1/model.py"], stime=7)
    _process(tmp_path, 20, 1, name="python", argv=["python", f"{repo}/fusion/1/model.py"])
    (tmp_path / "stat").write_text("cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 50 0 25 400 25 0 0 0 0 0\n")
    (tmp_path / "meminfo").write_text("MemTotal:       24000000 kB\nMemFree:         1000 kB\n")
    (tmp_path / "self").mkdir()  # not a pid: ignored
    monkeypatch.setattr(proc, "ROOT", tmp_path)
    return tmp_path


def test_the_tree_holds_processes_alive(fake):
    assert proc.alive(10) and not proc.alive(14) and not proc.alive(99)  # zombie, gone
    assert proc.parents() == {1: 0, 10: 1, 11: 10, 12: 10, 13: 10, 15: 10, 16: 15, 20: 1}
    assert proc.children(10) == [11, 12, 13, 15]
    assert proc.descendants(10) == [11, 12, 13, 15, 16]
    assert proc.stat(14)[0] == "Z"  # the command name's own parentheses do not shift the fields


def test_stubs_are_found_by_their_argv_at_any_depth(fake):
    assert proc.stub_pids(10) == {"fusion": {11}, "decoder": {12, 13}, "encoder": {16}}  # not the zombie, not 20
    assert proc.stub_names(10) == {"decoder": 12, "decoder#2": 13, "encoder": 16, "fusion": 11}
    assert proc.stub_pids(1) == proc.stub_pids(10)  # from higher up too; 20 runs a model.py but is no stub
    assert proc.stub_model(["python", "/srv/repo/fusion/1/model.py"]) is None
    assert proc.cmdline(11)[:2] == ["/opt/tritonserver/backends/python/triton_python_backend_stub",
                                    "/srv/repo/fusion/1/model.py"] and proc.cmdline(99) == []


def test_cpu_time_and_memory(fake):
    tick = os.sysconf("SC_CLK_TCK")
    assert proc.cpu_seconds(10) == pytest.approx(400 / tick)
    with pytest.raises(ProcessLookupError):
        proc.cpu_seconds(99)
    assert proc.tree_cpu_seconds(10) == pytest.approx((400 + 50 + 50 + 7) / tick)  # the zombie's 1000 not counted
    assert proc.rss_mb(10) == 100.0 and proc.peak_rss_mb(10) == 200.0
    assert proc.rss_mb(11) == 0.0 and proc.rss_mb(99) == 0.0  # no such line; gone
    assert proc.cpu_jiffies() == (1000, 850)
    assert proc.meminfo_bytes() == 24000000 * 1024 and proc.meminfo_bytes(key="Nope") is None


def test_this_process_and_a_child_of_it():
    me = os.getpid()
    assert proc.alive(me) and proc.parents()[me] == os.getppid()
    assert proc.cmdline(me) == sys.orig_argv
    assert proc.cpu_seconds(me) > 0 and proc.rss_mb(me) > 1 and proc.peak_rss_mb(me) >= proc.rss_mb(me)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert child.pid in proc.children(me) and child.pid in proc.descendants(me)
    finally:
        child.kill()
        child.wait()
    assert not proc.alive(child.pid) and child.pid not in proc.children(me)
    total, idle = proc.cpu_jiffies()
    assert total > idle > 0 and proc.meminfo_bytes() > 0
