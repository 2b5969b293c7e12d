"""Start and stop a real `tritonserver` for a model repository, bound to loopback unless told otherwise.

The binary, its backends and the python stub's environment come from runtime/serve/triton_install.py ($AF3TRT_TRITONSERVER,
PATH, or the `nvidia-pytriton` wheel); `af3trt doctor` (runtime/serve/doctor.py) checks them before `af3trt serve` starts
the server. Only the process we started is ever stopped.

    af3trt serve --model-repository out/af3-tiny/model_repository [--openai-port 9000]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import itertools
from dataclasses import dataclass, field
from pathlib import Path

from af3trt.runtime.serve import liveness
from af3trt.runtime.serve.tp_launch import AUTO_COMPLETE_OFF, leader_mode_command, shm_prefix_arg
from af3trt.runtime.triton.context import server_root
from af3trt.runtime.serve.doctor import preflight_or_exit
from af3trt.runtime.openai import app as openai_server
from af3trt.runtime.serve.triton_install import ServerError, find_tritonserver, prepare_backends, server_env

log = logging.getLogger(__name__)

def _die_with(parent: int):
    """preexec_fn: the child gets SIGKILL when its parent thread exits (Linux PR_SET_PDEATHSIG), and exits at
    once if the parent is already gone (the race between fork and prctl)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)

    def preexec() -> None:
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG = 1 (linux/prctl.h)
        if os.getppid() != parent:
            os._exit(1)

    return preexec


def die_with_this_process(cmd: list[str]) -> tuple[list[str], object]:
    """(command, preexec_fn) for a child that gets SIGKILL when the thread starting it exits. With util-linux's
    setpriv on PATH the parent-death signal is set by setpriv, which then execs the command (same PID): no Python
    runs between fork and exec. A preexec_fn does, and in a process with other threads (gRPC's, a client's
    persistent channel) it can crash the child before exec ("Fatal Python error: Segmentation fault" in
    _execute_child, seen in the suite; the subprocess docs warn that preexec_fn is not safe with threads).
    Without setpriv: the preexec_fn."""
    setpriv = shutil.which("setpriv")
    if setpriv:
        return [setpriv, "--pdeathsig", "KILL", "--", *cmd], None
    return cmd, _die_with(os.getpid())


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float, interval: float = 0.3) -> str | None:
    """Poll GET `url` until it answers 200 while `proc` (the process serving it) lives: None once it did, else why
    not ("exited" or "timeout")."""
    import urllib.error

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return "exited"
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return None
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(interval)
    return "timeout"


def stop_process(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    """SIGTERM a process we started, SIGKILL it if it is still there after grace_s, and reap it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def kill_group(pgid: int) -> None:
    """SIGKILL what is left of process group `pgid` (a tritonserver we started in a session of its own, and the python
    stubs it forked): the stubs of a tritonserver that died by SIGKILL live on as orphans otherwise (seen: the
    decoder's stub for 40 minutes, holding its weights). Linux never hands out a PID still in use as a group id, so
    the group is still ours while any member lives."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


_HANDED_OUT: set[int] = set()  # ports free_port has returned in this process


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now and that this process has not been handed before: the kernel may offer a port
    again once the probing socket is closed, and two ports chosen before either is bound (a replica's metrics port,
    HAProxy's frontend) must differ."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def memory_pool_args(model_repository: Path) -> list[str]:
    """Triton's CUDA memory pool on GPU 0 (where the ensemble and the encoder run) as the build's memory plan sized
    it (manifest.json `gpu.memory_plan.cuda_memory_pool`, build/memory_plan.py cuda_pool_bytes); none for a CPU build.
    Flag: `--cuda-memory-pool-byte-size=<GPU device ID>:<pool byte size>` (triton-inference-server/server r26.04
    src/command_line_parser.cc); the pool is allocated when the server starts (core r26.04 src/server.cc,
    CudaMemoryManager::Create), before the decoder's executor measures free memory for its KV cache."""
    manifest = Path(model_repository).parent / "manifest.json"
    if not manifest.is_file():
        return []
    plan = (json.loads(manifest.read_text(encoding="utf-8")).get("gpu") or {}).get("memory_plan") or {}
    pool = plan.get("cuda_memory_pool")
    return [f"--cuda-memory-pool-byte-size=0:{int(pool)}"] if pool else []


_SERVER_SERIALS = itertools.count()  # TritonServer.shm_prefix: one per server this process starts


@dataclass
class TritonServer:
    """One tritonserver process: `with TritonServer(repo) as srv: srv.grpc_url`."""

    model_repository: Path
    host: str = "127.0.0.1"
    grpc_port: int | None = None
    http_port: int | None = None
    metrics_port: int | None = None
    log_path: Path | None = None
    log_verbose: int = 0
    exit_timeout: int = 5
    extra_args: list[str] = field(default_factory=list)
    world_size: int = 1  # TensorRT-LLM ranks (= TP size of the engine): >1 launches leader mode under mpirun
    proc: subprocess.Popen | None = None
    # Explicit model control (what the supervisor's watchdog and drain need), with Triton's model-repository API
    # restricted to clients that send header `api_key_header: api_key`. None: every model loads at start, no API.
    api_key: str | None = field(default=None, repr=False)
    api_key_header: str = "af3trt-repository-key"
    # tritonserver gets SIGKILL when the thread that started it dies (PR_SET_PDEATHSIG): never an orphan.
    die_with_parent: bool = True
    log_offset: int = 0  # where the last start's lines begin in log_path
    start_seconds: float | None = None  # how long the last start() took, to ready
    # The python backend's shared-memory region prefix: "" gives this server one of its own (af3trt_<pid>_<n>_), so
    # that what a killed tritonserver leaves in /dev/shm is known to be its and removed (remove_leftovers).
    shm_prefix: str = ""

    def __post_init__(self) -> None:
        self.shm_prefix = self.shm_prefix or f"af3trt_{os.getpid()}_{next(_SERVER_SERIALS)}_"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    def command(self, binary: Path, backends: Path) -> list[str]:
        rank = self.rank_command(binary, backends)
        if self.world_size == 1:
            return [*rank, shm_prefix_arg(self.shm_prefix)]
        return leader_mode_command(rank, self.world_size, shm_prefix=f"{self.shm_prefix}rank")  # one prefix a rank

    def remove_leftovers(self, pid: int) -> None:
        """What tritonserver `pid` (gone) leaves behind when it is killed: the python backend's shared-memory regions
        (Triton unlinks them only on a clean exit: 1.5 GB of them had piled up in /dev/shm here) and its stubs'
        request context folder (runtime/triton/context.py server_root)."""
        shm = Path("/dev/shm")
        for region in shm.glob(f"{self.shm_prefix}*") if shm.is_dir() else ():
            region.unlink(missing_ok=True)
        shutil.rmtree(server_root(pid), ignore_errors=True)

    def rank_command(self, binary: Path, backends: Path) -> list[str]:
        return [
            str(binary), f"--model-repository={self.model_repository}", f"--backend-directory={backends}",
            f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
            f"--http-address={self.host}", f"--http-port={self.http_port}",
            f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}",
            "--exit-on-error=true", "--strict-readiness=true", f"--log-verbose={self.log_verbose}",
            # Triton 2.51 keeps a decoupled ensemble "live" after streamed requests for the whole exit timeout
            f"--exit-timeout-secs={self.exit_timeout}",
            # Our configs are complete (rendered from model_config protobuf). With auto-complete on, the python backend
            # starts a throw-away stub per model load only to ask model.py for its config, a second interpreter
            # importing model.py (torch, for the decoder and preprocess) before the real one (python_backend 0ccc764
            # src/python_be.cc ModelState::Create: LaunchAutoCompleteStubProcess; seen on 2.51 as two "Starting
            # Python backend stub" lines per load). Measured here at load 5: a stub reload 2.0 s -> 0.2-0.5 s.
            AUTO_COMPLETE_OFF,
            *self.control_args(),
            *memory_pool_args(Path(self.model_repository)),
            *self.extra_args,
        ]

    def control_args(self) -> list[str]:
        if self.api_key is None:
            return []
        restricted = f"model-repository:{self.api_key_header}={self.api_key}"
        return ["--model-control-mode=explicit", "--load-model=*",
                f"--http-restricted-api={restricted}", f"--grpc-restricted-protocol={restricted}"]

    def redacted(self, cmd: list[str]) -> str:
        """The command line as it may be logged: the repository key never is."""
        text = " ".join(cmd)
        return text.replace(self.api_key, "<redacted>") if self.api_key else text

    def start(self, timeout: float = 180.0) -> "TritonServer":
        binary = find_tritonserver()
        backends = prepare_backends(binary)
        self.grpc_port = self.grpc_port or free_port(self.host)
        self.http_port = self.http_port or free_port(self.host)
        self.metrics_port = self.metrics_port or free_port(self.host)
        if self.log_path is None:
            self.log_path = Path(self.model_repository).parent / "tritonserver.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = self.command(binary, backends)
        log.info("starting %s", self.redacted(cmd))
        self.log_offset = self.log_path.stat().st_size if self.proc is not None and self.log_path.exists() else 0
        t0 = time.monotonic()
        with open(self.log_path, "ab" if self.proc is not None else "wb") as logf:  # a restart appends
            cmd, preexec = die_with_this_process(cmd) if self.die_with_parent else (cmd, None)
            self.proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=server_env(binary),
                                         start_new_session=True, preexec_fn=preexec)
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - t0
        return self

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        url = f"http://{self.http_url}/v2/health/ready"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"tritonserver exited with code {self.proc.returncode} before it was ready; "
                                  f"log {self.log_path}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        log.info("tritonserver ready: grpc %s, http %s (pid %d)", self.grpc_url, self.http_url,
                                 self.proc.pid)
                        return
            except OSError:
                pass
            time.sleep(0.1)  # a start or a heal is over when this sees it: 0.5-s polls added 0.25 s to each, on average
        raise ServerError(f"tritonserver not ready after {timeout:.0f} s; log {self.log_path}:\n{self.log_tail()}")

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(Path(self.log_path).read_text(encoding="utf-8", errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the process we started (by PID; its process group holds only the python stubs it spawned), then
        whatever of its group outlived it."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        kill_group(self.proc.pid)
        self.remove_leftovers(self.proc.pid)

    def kill(self) -> None:
        """SIGKILL tritonserver and its python stubs at once (a wedged or half-dead server: its requests fail either
        way), and reap it."""
        if self.proc is not None:
            kill_group(self.proc.pid)
            self.proc.wait(10)
            self.remove_leftovers(self.proc.pid)

    def restart(self, timeout: float = 180.0) -> "TritonServer":
        """kill(), then start again on the same ports (the log is appended to)."""
        self.kill()
        return self.start(timeout)

    def __enter__(self) -> "TritonServer":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


class Front:
    """`af3trt openai` as the launcher's child (`af3trt serve --openai-port`): started, watched and restarted by the
    supervisor like tritonserver. A port that is already taken is an error at start, not a front that never came."""

    def __init__(self, cmd: list[str], host: str, port: int):
        self.cmd, self.host, self.port = cmd, host, port
        self.proc: subprocess.Popen | None = None

    @property
    def local_host(self) -> str:  # where this machine reaches it
        return "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host

    @property
    def url(self) -> str:
        return f"http://{self.local_host}:{self.port}"

    def check_port(self) -> None:
        """ServerError when something already listens on the front's port (checked before tritonserver starts)."""
        with socket.socket() as s:  # SO_REUSEADDR as uvicorn binds: a port in TIME_WAIT is free, a listener is not
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((self.host, self.port))
            except OSError as e:
                raise ServerError(f"the OpenAI front cannot listen on {self.host}:{self.port}: {e.strerror}") from None

    def start(self, timeout: float = 120.0) -> "Front":
        self.check_port()
        cmd, preexec = die_with_this_process(self.cmd)
        self.proc = subprocess.Popen(cmd, preexec_fn=preexec)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:  # any HTTP answer (503 while Triton is not ready) means it listens
            if self.proc.poll() is not None:
                raise ServerError(f"the OpenAI front exited with code {self.proc.returncode} before it answered on "
                                  f"{self.url} (its log is above)")
            try:
                with socket.create_connection((self.local_host, self.port), timeout=2):
                    return self
            except OSError:
                time.sleep(0.2)
        self.kill()
        raise ServerError(f"the OpenAI front did not listen on {self.url} within {timeout:.0f} s")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait(10)

    def stop(self, grace_s: float = 10.0) -> None:
        if self.proc is not None:
            stop_process(self.proc, grace_s)


def main(argv=None) -> int:
    from af3trt.runtime.serve import supervisor

    ap = argparse.ArgumentParser(prog="af3trt serve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-repository", required=True, type=Path)
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    ap.add_argument("--grpc-port", type=int, default=8001)
    ap.add_argument("--http-port", type=int, default=8000)
    ap.add_argument("--metrics-port", type=int, default=8002)
    ap.add_argument("--log", type=Path, default=None)
    ap.add_argument("--world-size", type=int, default=1,
                    help="TensorRT-LLM ranks = the engine's TP size; >1 runs one tritonserver per GPU under mpirun")
    ap.add_argument("--start-timeout", type=float, default=180.0,
                    help="seconds to wait for readiness (engine loading on a GPU can take many minutes)")
    ap.add_argument("--openai-port", type=int, default=None,
                    help="also serve the OpenAI-compatible API (af3trt openai) on this port, same --host")
    openai_server.add_arguments(ap)
    ap.add_argument("--grace-seconds", type=float, default=supervisor.DEFAULT_GRACE_SECONDS,
                    help="on SIGTERM/SIGINT: how long requests in flight may take to finish (a second signal "
                         "stops at once)")
    ap.add_argument("--no-watchdog", dest="watchdog", action="store_false",
                    help="do not heal: no stub watchdog, no liveness probe, no restart of a dead tritonserver or front")
    ap.add_argument("--liveness-period-s", type=float, default=liveness.PERIOD_S,
                    help="seconds between liveness probes (one token of a cached clip through the ensemble; "
                         "0: none)")
    ap.add_argument("--liveness-deadline-s", type=float, default=liveness.DEADLINE_S,
                    help="a probe's whole answer must come within this")
    ap.add_argument("--liveness-failures", type=int, default=liveness.FAILURES,
                    help="failed probes in a row before tritonserver (or the front) is restarted")
    ap.add_argument("--max-restarts", type=int, default=supervisor.Restarts.limit,
                    help="crash-loop bound: more restarts than this within --restart-window-s and serve gives up "
                         "with a non-zero exit status (for the orchestrator to act on)")
    ap.add_argument("--restart-window-s", type=float, default=supervisor.Restarts.window_s)
    ap.add_argument("--status-file", type=Path, default=None,
                    help="write what the launcher is healing here, for `af3trt probe --status-file` (Kubernetes' "
                         "liveness probe then waits for a restart in progress instead of killing it)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    preflight_or_exit(args.model_repository.resolve())  # af3trt doctor: backends, stub, GPU, versions
    srv = TritonServer(args.model_repository.resolve(), args.host, args.grpc_port, args.http_port,
                       args.metrics_port, args.log, world_size=args.world_size, api_key=supervisor.repository_key())
    front = None
    if args.openai_port is not None:  # the OpenAI-compatible API in a child process, stopped after the drain
        triton = f"127.0.0.1:{srv.grpc_port}" if args.host in ("0.0.0.0", "::") else f"{args.host}:{args.grpc_port}"
        front = Front(openai_server.command(args, triton, args.host, args.openai_port), args.host, args.openai_port)
    checks = supervisor.Checks(args.liveness_period_s, args.liveness_deadline_s, args.liveness_failures,
                               supervisor.Restarts(args.max_restarts, args.restart_window_s),
                               start_timeout_s=args.start_timeout, status_file=args.status_file)
    try:
        if front is not None:
            front.check_port()
        srv.start(timeout=args.start_timeout)
        log.info("tritonserver started in %s", supervisor.format_loads(srv))
        print(f"serving {args.model_repository} on grpc {srv.grpc_url}, http {srv.http_url} (log {srv.log_path}); "
              f"SIGTERM or Ctrl-C drains and stops it", flush=True)
        if front is not None:
            front.start()
    except ServerError as e:
        srv.stop()
        print(f"af3trt serve: {e}", file=sys.stderr, flush=True)
        return 1
    try:
        return supervisor.supervise(srv, grace_s=args.grace_seconds, watchdog=args.watchdog, front=front,
                                    checks=checks)
    finally:
        if front is not None:
            front.stop()


if __name__ == "__main__":
    raise SystemExit(main())
