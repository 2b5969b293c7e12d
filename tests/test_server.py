"""The server launcher: binary discovery, the stub environment, loopback binding, and clear failures."""

from __future__ import annotations

import json
import os
import sysconfig
from pathlib import Path

import pytest

from af3trt.runtime.serve import server
from af3trt.runtime.serve.server import TritonServer


def test_finds_the_wheel_binary_and_prepares_the_stub():
    binary = server.find_tritonserver()
    assert binary.name == "tritonserver" and os.access(binary, os.X_OK)
    backends = server.prepare_backends(binary)
    stub = backends / "python" / "triton_python_backend_stub"
    assert stub.exists() and os.access(stub, os.X_OK)
    assert (backends / "python" / "libtriton_python.so").exists()


def test_env_override_must_exist(monkeypatch, tmp_path):
    monkeypatch.setenv("AF3TRT_TRITONSERVER", str(tmp_path / "missing"))
    with pytest.raises(server.ServerError, match="does not exist"):
        server.find_tritonserver()


def test_stub_environment_uses_this_interpreter():
    env = server.server_env(server.find_tritonserver())
    assert sysconfig.get_config_var("LIBDIR") in env["LD_LIBRARY_PATH"].split(":")
    site_dir = Path(env["PYTHONPATH"].split(os.pathsep)[0])
    assert "site.addsitedir" in (site_dir / "sitecustomize.py").read_text()
    assert env["PYTHONUTF8"] == "1"


def test_a_full_triton_install_gets_no_interpreter_libdir(tmp_path, monkeypatch):
    """In the NGC image the interpreter's LIBDIR is /usr/lib/x86_64-linux-gnu, where the host driver's libcuda is;
    on LD_LIBRARY_PATH it would shadow the CUDA forward-compatibility libcuda the image wires through ld.so.conf
    (server r26.04 build.py, /etc/ld.so.conf.d/00-cuda-compat.conf). Only the pip wheel's tritonserver, whose stub
    links this interpreter's libpython, gets it."""
    full = tmp_path / "opt" / "tritonserver"
    (full / "bin").mkdir(parents=True)
    (full / "backends" / "python").mkdir(parents=True)
    (full / "bin" / "tritonserver").write_text("")
    monkeypatch.setenv("LD_LIBRARY_PATH", "/usr/local/cuda/lib64")
    wheel = server.find_tritonserver()
    assert server.server_env(wheel)["LD_LIBRARY_PATH"].split(":")[0] == sysconfig.get_config_var("LIBDIR")
    assert server.server_env(full / "bin" / "tritonserver")["LD_LIBRARY_PATH"] == "/usr/local/cuda/lib64"
    monkeypatch.delenv("LD_LIBRARY_PATH")
    assert "LD_LIBRARY_PATH" not in server.server_env(full / "bin" / "tritonserver")


def test_stubs_do_not_inherit_a_tf32_override(monkeypatch):
    """TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1 forces TF32 in every fp32 cuBLAS matmul of a torch process, overriding
    set_float32_matmul_precision (PyTorch docs, cuda_environment_variables.rst); the mel matmul must stay fp32."""
    monkeypatch.setenv("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", "1")
    monkeypatch.setenv("AF3TRT_SOMETHING_ELSE", "kept")
    env = server.server_env(server.find_tritonserver())
    assert "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE" not in env and env["AF3TRT_SOMETHING_ELSE"] == "kept"


def test_stub_openmp_threads_sleep_unless_the_user_says(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert server.server_env(server.find_tritonserver())["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert server.server_env(server.find_tritonserver())["OMP_WAIT_POLICY"] == "ACTIVE"


def test_binds_loopback_by_default(tmp_path):
    srv = server.TritonServer(tmp_path, grpc_port=1, http_port=2, metrics_port=3)
    cmd = srv.command(Path("tritonserver"), Path("backends"))
    for flag in ("--grpc-address", "--http-address", "--metrics-address"):
        assert f"{flag}=127.0.0.1" in cmd


@pytest.mark.integration
def test_a_broken_repository_fails_fast_with_the_log(tmp_path):
    (tmp_path / "repo" / "bad").mkdir(parents=True)
    (tmp_path / "repo" / "bad" / "config.pbtxt").write_text('backend: "python"\nthis is not a config')
    srv = server.TritonServer(tmp_path / "repo", log_path=tmp_path / "log.txt")
    with pytest.raises(server.ServerError, match="exited with code"):
        srv.start(timeout=120)
    assert srv.proc.poll() is not None


def test_free_ports_are_never_handed_out_twice():
    """Ports picked one after another before any is bound (a replica set: each replica's three, HAProxy's three)
    must all differ, although the kernel may offer a just-closed probe port again."""
    from af3trt.runtime.serve.server import free_port

    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)


def test_the_cuda_memory_pool_of_the_memory_plan_goes_to_rank_0_only(tmp_path):
    """A GPU build's manifest carries the plan's pool (build/memory_plan.py cuda_pool_bytes); the server passes it as
    `--cuda-memory-pool-byte-size=0:<bytes>` (server r26.04 src/command_line_parser.cc: "<GPU device ID>:<pool byte
    size>", default 64 MB), on the rank that runs the ensemble only (the TP worker ranks load only the decoder)."""
    repo = tmp_path / "model_repository"
    repo.mkdir()
    srv = TritonServer(repo, grpc_port=1, http_port=2, metrics_port=3)
    assert not any("cuda-memory-pool" in a for a in srv.rank_command(Path("ts"), Path("b")))  # CPU build: no manifest
    (tmp_path / "manifest.json").write_text(json.dumps({"target": "gpu", "gpu": {"memory_plan": {
        "cuda_memory_pool": 3_000_000_000}}}))
    assert "--cuda-memory-pool-byte-size=0:3000000000" in srv.rank_command(Path("ts"), Path("b"))
    srv.world_size = 2
    blocks = " ".join(srv.command(Path("ts"), Path("b"))).split(" : ")
    assert "--cuda-memory-pool-byte-size=0:3000000000" in blocks[0]
    assert "cuda-memory-pool" not in blocks[1]


def test_children_die_with_the_launcher_without_python_between_fork_and_exec(tmp_path):
    """die_with_this_process: setpriv sets the parent-death signal and execs the command, so no Python runs in the
    forked child (a preexec_fn crashed children in a process with gRPC threads); a child started so is killed when
    the process that started it exits."""
    import shutil
    import subprocess
    import sys
    import time

    from af3trt.runtime.serve.server import die_with_this_process

    assert shutil.which("setpriv"), "util-linux's setpriv is on Debian and Ubuntu base images"
    cmd, preexec = die_with_this_process(["sleep", "600"])
    assert preexec is None and cmd[-3:] == ["--", "sleep", "600"]
    launcher = ("import subprocess, sys\n"
                "from af3trt.runtime.serve.server import die_with_this_process\n"
                "cmd, pre = die_with_this_process(['sleep', '600'])\n"
                "p = subprocess.Popen(cmd, preexec_fn=pre)\n"
                "print(p.pid, flush=True)\n"
                "sys.stdin.readline()\n")
    parent = subprocess.Popen([sys.executable, "-c", launcher], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    child = int(parent.stdout.readline())
    deadline = time.monotonic() + 60
    while open(f"/proc/{child}/cmdline").read().split("\0")[0] != "sleep":  # until setpriv exec'd it (same PID)
        assert time.monotonic() < deadline, "setpriv never exec'd the command"
        time.sleep(0.01)
    parent.stdin.close()  # the launcher exits
    parent.wait(60)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            state = open(f"/proc/{child}/stat").read().split(")")[1].split()[0]
        except FileNotFoundError:
            break
        if state == "Z":  # killed, waiting for init to reap it
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"sleep {child} outlived its launcher")
