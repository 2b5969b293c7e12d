"""The server launcher: binary discovery, the stub environment, loopback binding, and clear failures."""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

import pytest

from af3trt.runtime import server


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
    from af3trt.runtime.server import free_port

    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
