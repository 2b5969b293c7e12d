"""Several tritonserver replicas of one model repository behind HAProxy, on loopback: the scale-out layout of a
Kubernetes deployment, on one machine.

    af3trt replicas --model-repository out/af3-tiny/model_repository --replicas 2
    af3trt ask --url 127.0.0.1:8001 "What is said?" --audio clip.flac      # through the balancer

Layout (every address 127.0.0.1, replica ports free ones):

    clients ──gRPC (h2c)──▶ HAProxy :grpc ──proto h2──▶ replica i  grpc port
            ──HTTP/1.1───▶ HAProxy :http ─────────────▶ replica i  http port
                           HAProxy :stats /stats        (per-server state and request counts; ;csv for machines)

HAProxy balances per request (HTTP mode: each gRPC call is one HTTP/2 stream), checks every replica with
`GET /v2/health/ready` on its HTTP port every 500 ms (2 failures → DOWN, 2 successes → UP), and retries a request
whose connection to a dead replica fails on another one. A replica killed with SIGKILL is taken out by the
checks; started again on the same ports it rejoins by itself. Each replica gets its own python-backend
shared-memory prefix (this process's id and the replica's index), as TensorRT-LLM's launcher gives each rank.

Only what this module started is stopped: the replicas by their process group (tritonserver and its python
stubs), HAProxy by its PID.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from af3trt.runtime.stages.contract import ENSEMBLE
from af3trt.runtime.serve.server import ServerError, TritonServer, free_port, stop_process

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
GRPC_BACKEND = "triton_grpc"
HTTP_BACKEND = "triton_http"
READY_PATH = "/v2/health/ready"


def find_haproxy() -> Path:
    for candidate in (os.environ.get("AF3TRT_HAPROXY"), shutil.which("haproxy"), "/usr/sbin/haproxy"):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    raise ServerError("haproxy not found: `apt-get install haproxy` (scripts/setup.sh installs it) or set "
                      "AF3TRT_HAPROXY")


@dataclass(frozen=True)
class ReplicaPorts:
    grpc: int
    http: int
    metrics: int


def haproxy_config(replicas: list[ReplicaPorts], *, grpc_port: int, http_port: int, stats_port: int) -> str:
    """HAProxy 2.6 configuration: gRPC over h2 and HTTP to every replica, health-checked on Triton's ready endpoint."""

    def servers(kind: str) -> str:
        lines = []
        for i, r in enumerate(replicas):
            target = r.grpc if kind == "grpc" else r.http
            # checks always speak HTTP/1.1 to the replica's HTTP port, whatever the traffic's protocol
            proto = " proto h2 check-proto h1" if kind == "grpc" else ""
            lines.append(f"    server r{i} {HOST}:{target}{proto} check port {r.http} inter 500ms fall 2 rise 2")
        return "\n".join(lines)

    return f"""# written by af3trt replicas
global
    maxconn 2048

defaults
    mode http
    timeout connect 2s
    timeout client 600s
    timeout server 600s
    timeout check 2s
    retries 3
    option redispatch 1
    retry-on conn-failure empty-response

frontend grpc
    bind {HOST}:{grpc_port} proto h2
    default_backend {GRPC_BACKEND}

frontend http
    bind {HOST}:{http_port}
    default_backend {HTTP_BACKEND}

backend {GRPC_BACKEND}
    balance roundrobin
    # Every client's gRPC calls share a few long-lived h2 connections per replica: tritonserver 2.51 keeps memory for
    # every connection it accepts (docs/memory.md), so a client that connects once per request must not become a
    # connection per request at the replica. Seen: 8 such clients in a row used one server connection per replica
    # with HAProxy 2.6's default reuse mode too; "always" also lets a client connection's first request share one.
    http-reuse always
    option httpchk GET {READY_PATH}
    http-check expect status 200
{servers("grpc")}

backend {HTTP_BACKEND}
    balance roundrobin
    option httpchk GET {READY_PATH}
    http-check expect status 200
{servers("http")}

listen stats
    bind {HOST}:{stats_port}
    stats enable
    stats uri /stats
    stats refresh 5s
"""


@dataclass
class ReplicaSet:
    """N tritonservers on one repository behind one HAProxy: `with ReplicaSet(repo, 2, workdir) as rs: rs.grpc_url`."""

    model_repository: Path
    replicas: int = 2
    workdir: Path = Path("out/replicas")
    grpc_port: int | None = None
    http_port: int | None = None
    stats_port: int | None = None
    start_timeout: float = 300.0
    servers: list[TritonServer] = field(default_factory=list)
    ports: list[ReplicaPorts] = field(default_factory=list)
    haproxy: subprocess.Popen | None = None

    @property
    def grpc_url(self) -> str:
        return f"{HOST}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"{HOST}:{self.http_port}"

    @property
    def stats_url(self) -> str:
        return f"http://{HOST}:{self.stats_port}/stats"

    def _server(self, i: int) -> TritonServer:
        p = self.ports[i]
        return TritonServer(Path(self.model_repository), HOST, p.grpc, p.http, p.metrics,
                            log_path=self.workdir / f"replica{i}.log",
                            shm_prefix=f"af3trt_{os.getpid()}_replica{i}_")

    def start(self) -> "ReplicaSet":
        if self.replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {self.replicas}")
        haproxy = find_haproxy()
        self.workdir = Path(self.workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.grpc_port = self.grpc_port or free_port(HOST)
        self.http_port = self.http_port or free_port(HOST)
        self.stats_port = self.stats_port or free_port(HOST)
        self.ports = [ReplicaPorts(free_port(HOST), free_port(HOST), free_port(HOST)) for _ in range(self.replicas)]
        try:
            for i in range(self.replicas):
                log.info("starting replica %d of %d", i + 1, self.replicas)
                self.servers.append(self._server(i).start(self.start_timeout))
            cfg = self.workdir / "haproxy.cfg"
            cfg.write_text(haproxy_config(self.ports, grpc_port=self.grpc_port, http_port=self.http_port,
                                          stats_port=self.stats_port), encoding="utf-8")
            check = subprocess.run([str(haproxy), "-c", "-q", "-f", str(cfg)], capture_output=True, text=True)
            if check.returncode != 0:
                raise ServerError(f"haproxy rejected {cfg}:\n{check.stdout}{check.stderr}")
            with open(self.workdir / "haproxy.log", "wb") as logf:
                self.haproxy = subprocess.Popen([str(haproxy), "-db", "-f", str(cfg)], stdout=logf,
                                                stderr=subprocess.STDOUT, start_new_session=True)
            for i in range(self.replicas):
                self.wait_state(i, "UP", timeout=30)
        except BaseException:
            self.stop()
            raise
        return self

    # -------------------------------------------------------------------------------------------- state

    def stats(self) -> list[dict]:
        """HAProxy's per-proxy/per-server rows (the stats page as CSV)."""
        with urllib.request.urlopen(self.stats_url + ";csv", timeout=5) as r:
            text = r.read().decode().lstrip("# ")
        return list(csv.DictReader(io.StringIO(text)))

    def server_row(self, i: int, backend: str = GRPC_BACKEND) -> dict:
        for row in self.stats():
            if row["pxname"] == backend and row["svname"] == f"r{i}":
                return row
        raise ServerError(f"no server r{i} in backend {backend}")

    def wait_state(self, i: int, state: str, timeout: float = 30.0) -> float:
        """Wait until HAProxy reports replica i as `state` (UP / DOWN) in the gRPC backend; seconds waited."""
        if self.haproxy is None or self.haproxy.poll() is not None:
            raise ServerError(f"haproxy is not running; log {self.workdir / 'haproxy.log'}")
        t0 = time.monotonic()
        status = "no answer from the stats page"
        while True:
            try:
                status = self.server_row(i)["status"]
            except OSError:  # haproxy still binding its stats port
                pass
            else:
                if status.split()[0] == state:
                    return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                raise ServerError(f"replica {i} is {status!r} in haproxy after {timeout:.0f} s, wanted {state}")
            time.sleep(0.2)

    def replica_requests(self, i: int, model: str = ENSEMBLE) -> int:
        """Successful requests of `model` that replica i served, from its own Triton metrics."""
        with urllib.request.urlopen(f"http://{HOST}:{self.ports[i].metrics}/metrics", timeout=5) as r:
            for line in r.read().decode().splitlines():
                if line.startswith(f'nv_inference_request_success{{model="{model}",'):
                    return int(float(line.rsplit(" ", 1)[1]))
        return 0

    # -------------------------------------------------------------------------------------------- failures

    def kill(self, i: int) -> None:
        """SIGKILL replica i (tritonserver and its python stubs: the process group we started)."""
        proc = self.servers[i].proc
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)

    def restart(self, i: int) -> None:
        """Start replica i again on its ports (HAProxy's checks bring it back UP)."""
        self.servers[i].stop()
        self.servers[i] = self._server(i).start(self.start_timeout)

    def stop(self) -> None:
        if self.haproxy is not None:
            stop_process(self.haproxy, grace_s=10)
        for srv in self.servers:
            srv.stop()

    def __enter__(self) -> "ReplicaSet":
        return self.start() if not self.servers else self

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="af3trt replicas", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-repository", required=True, type=Path)
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--grpc-port", type=int, default=8001, help="the balancer's gRPC port (127.0.0.1)")
    ap.add_argument("--http-port", type=int, default=8000, help="the balancer's HTTP port (127.0.0.1)")
    ap.add_argument("--stats-port", type=int, default=8404, help="HAProxy's stats page (127.0.0.1)")
    ap.add_argument("--workdir", type=Path, default=Path("out/replicas"), help="logs and haproxy.cfg")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rs = ReplicaSet(args.model_repository.resolve(), args.replicas, args.workdir, args.grpc_port, args.http_port,
                    args.stats_port)

    def _terminate(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    try:
        rs.start()
        print(f"{args.replicas} replicas behind haproxy: grpc {rs.grpc_url}, http {rs.http_url}, stats "
              f"{rs.stats_url}; logs in {rs.workdir} (haproxy pid {rs.haproxy.pid}). Ctrl-C stops everything "
              f"started here.", flush=True)
        while True:
            if rs.haproxy.poll() is not None:
                raise ServerError(f"haproxy exited with {rs.haproxy.returncode}; log {rs.workdir / 'haproxy.log'}")
            time.sleep(1)
    except KeyboardInterrupt:
        return 0
    except ServerError as e:
        print(f"error: {e}", flush=True)
        return 2
    finally:
        rs.stop()


if __name__ == "__main__":
    raise SystemExit(main())
