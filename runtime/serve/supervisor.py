"""Keep a running tritonserver truthful and serving: a stub watchdog, a draining shutdown, a restricted API.

What Triton 2.51 does on its own, and why this module exists (each seen on this repository's CPU ensemble):
- When a python model's stub process dies (the kernel's OOM killer, a segfault), Triton keeps the model READY and
  answers every later request "Stub process '<model>_0_0' is not healthy" for ever; /v2/health/ready stays 200.
  Triton never restarts the stub. With explicit model control, unloading a composing model makes the ensemble
  UNAVAILABLE and /v2/health/ready 400 (with --strict-readiness); loading it again reloads the ensemble too.
  So the watchdog polls the stubs (runtime/host/proc.py stub_pids: processes below tritonserver running
  triton_python_backend_stub on <repo>/<model>/<version>/model.py)
  and, when one is gone, unloads that model (readiness false at once) and loads it again (readiness true when
  the ensemble can answer).
- On SIGTERM, Triton's own shutdown refuses new requests to every model at once, including the per-token requests
  a decoupled ensemble sends to its postprocess step: streams in flight stop mid-answer and hang until the exit
  timeout. Unloading only the ensemble instead refuses new requests ("Request for unknown model"), makes
  readiness false, lets requests in flight finish (state UNLOADING until they have), and then it is UNAVAILABLE.
  So a drain is: unload the ensembles, wait until no request is in flight (at most the grace period), then SIGTERM
  tritonserver (nothing in flight; it exits in seconds), and SIGKILL its process group if it does not.
- "No request in flight" is not "the ensemble is UNAVAILABLE": Triton 2.51 keeps a decoupled ensemble referenced by
  every gRPC stream that sent it a request until the client closes that stream, even when it is idle (seen: one
  idle AF3Stream kept af3 UNLOADING for the whole 30-s grace; closing it made af3 UNAVAILABLE at once). So the drain
  counts requests itself: those queued at a composing model (Triton's nv_inference_pending_request_count), those a
  python stub is working on (runtime/triton/context.py RunningRequests: an execute in progress, a CPU decoder request until
  its last response; the files of dead stubs do not count), and TensorRT-LLM's active and waiting requests
  (nv_trt_llm_request_metrics). It ends when that count is 0 on two polls in a row (a request handed from one step
  to the next is in neither count for the instant between them) or the ensembles are UNAVAILABLE. After the watchdog
  reloaded a model, the queue gauge of that model also counts the requests left queued at its unloaded instance, whose
  stub is dead (seen: hundreds of per-token postprocess requests after a postprocess stub was SIGKILLed under
  streaming load, failing one a second or slower, their streams already failed): such a model's queue counts only
  while a live stub of it works through it (requests_in_flight), so the drain ends with the last live request.
- Explicit model control opens Triton's model-repository API (load/unload) to every client. It is restricted with
  --http-restricted-api / --grpc-restricted-protocol "model-repository:<header>=<key>": a request without the
  header gets 403 (HTTP) / PERMISSION_DENIED (gRPC). The key is $AF3TRT_REPOSITORY_KEY or random per launch; it
  is passed to tritonserver on its command line (readable by local users with access to /proc of that process,
  not to network clients) and never logged.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import signal
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from af3trt.runtime.host.proc import alive, children, stub_pids
from af3trt.runtime.serve import liveness
from af3trt.runtime.triton.context import stub_work
from af3trt.runtime.triton.model_config import repository_configs

log = logging.getLogger(__name__)

KEY_ENV = "AF3TRT_REPOSITORY_KEY"
DEFAULT_GRACE_SECONDS = 60.0  # a 512-token answer at 100 ms/token, with margin


def repository_key() -> str:
    """The model-repository API key: $AF3TRT_REPOSITORY_KEY (to use the API yourself), else a random one."""
    return os.environ.get(KEY_ENV) or secrets.token_urlsafe(24)


class RepositoryAPI:
    """Triton's HTTP health and model-repository endpoints, with the restricted header."""

    def __init__(self, http_url: str, header: str, key: str, timeout: float = 600.0):
        self.base, self.header, self.key, self.timeout = f"http://{http_url}", header, key, timeout

    def _call(self, path: str, *, post: bool = False, keyed: bool = True) -> tuple[int, bytes]:
        req = urllib.request.Request(self.base + path, method="POST" if post else "GET",
                                     data=b"" if post else None)
        if keyed:
            req.add_header(self.header, self.key)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def ready(self) -> bool:
        try:
            return self._call("/v2/health/ready", keyed=False)[0] == 200
        except OSError:
            return False

    def states(self) -> dict[str, str]:
        """{model: READY | UNLOADING | UNAVAILABLE | LOADING}."""
        status, body = self._call("/v2/repository/index", post=True)
        if status != 200:
            raise RuntimeError(f"repository index: HTTP {status} {body[:200]!r}")
        return {m["name"]: m.get("state", "") for m in json.loads(body)}

    def load(self, model: str) -> None:
        status, body = self._call(f"/v2/repository/models/{model}/load", post=True)
        if status != 200:
            raise RuntimeError(f"load {model}: HTTP {status} {body[:300]!r}")

    def unload(self, model: str) -> None:
        status, body = self._call(f"/v2/repository/models/{model}/unload", post=True)
        if status != 200:
            raise RuntimeError(f"unload {model}: HTTP {status} {body[:300]!r}")


def ensembles(repo: Path) -> list[str]:
    """The ensemble models of a repository (read from their config.pbtxt)."""
    return [name for name, cfg in repository_configs(repo).items() if cfg.platform == "ensemble"]


def decoupled_python_models(repo: Path) -> set[str]:
    """Python-backend models with a decoupled transaction policy (the CPU decoder)."""
    return {name for name, cfg in repository_configs(repo).items()
            if cfg.backend == "python" and cfg.model_transaction_policy.decoupled}


def healed_since_restart(reloads: list[dict]) -> frozenset[str]:
    """Models the watchdog unloaded and loaded since it last restarted tritonserver (Watchdog.reloads): their unloaded
    instance may still hold requests queued for its dead stub (see requests_in_flight)."""
    out: set[str] = set()
    for r in reloads:
        out = set() if r["action"] == "restart" else out | {r["model"]}
    return frozenset(out)


@dataclass
class Restarts:
    """The crash-loop bound: at most `limit` restarts of one process within any `window_s` seconds."""

    limit: int = 5
    window_s: float = 600.0
    times: list = field(default_factory=list)

    def allow(self) -> bool:
        now = time.monotonic()
        self.times = [t for t in self.times if now - t < self.window_s]
        if len(self.times) >= self.limit:
            return False
        self.times.append(now)
        return True


@dataclass
class Checks:
    """How the supervisor watches: liveness probes (runtime/serve/liveness.py; period 0: none) and the crash-loop
    bound, one Restarts per process it restarts (tritonserver, the OpenAI front)."""

    period_s: float = liveness.PERIOD_S
    deadline_s: float = liveness.DEADLINE_S
    failures: int = liveness.FAILURES
    restarts: Restarts = field(default_factory=Restarts)
    start_timeout_s: float = 180.0  # a restarted tritonserver's, as the first start's (--start-timeout)
    status_file: Path | None = None  # liveness.write_status: what the launcher is healing, for `af3trt probe`

    def bound(self) -> Restarts:
        return Restarts(self.restarts.limit, self.restarts.window_s)


def exit_status(returncode: int | None) -> int:
    """A process's end as a shell reports it (128 + N for signal N), never 0: the launcher gave up."""
    if returncode is None or returncode == 0:
        return 1
    return 128 - returncode if returncode < 0 else returncode


# Triton's log lines for a model's load: `I1207 19:03:27.666963 14582 model_lifecycle.cc:472] "loading: decoder:1"`
# and `... model_lifecycle.cc:839] "successfully loaded 'decoder'"` (core r24.10 src/model_lifecycle.cc).
_LOG_TIME = r"^[IWE](\d{4}) (\d\d):(\d\d):(\d\d\.\d+) \d+ \S+\] "
_LOADING = re.compile(_LOG_TIME + r'"loading: ([^:"]+):\d+"')
_LOADED = re.compile(_LOG_TIME + r"\"successfully loaded '([^']+)'\"")


def load_seconds(log_text: str) -> dict[str, float]:
    """{model: seconds from "loading" to "successfully loaded"} in a stretch of tritonserver's log (the last load of
    each model in it)."""
    def at(m) -> float:
        return int(m.group(2)) * 3600 + int(m.group(3)) * 60 + float(m.group(4))

    began, out = {}, {}
    for line in log_text.splitlines():
        if m := _LOADING.match(line):
            began[m.group(5)] = at(m)
        elif (m := _LOADED.match(line)) and m.group(5) in began:
            out[m.group(5)] = round((at(m) - began[m.group(5)]) % 86400, 2)
    return out


def last_start_loads(server) -> dict[str, float]:
    """load_seconds over the lines tritonserver logged since its last start."""
    try:
        with open(server.log_path, "rb") as f:
            f.seek(server.log_offset)
            return load_seconds(f.read().decode("utf-8", "replace"))
    except (OSError, TypeError):
        return {}


def format_loads(server) -> str:
    loads = last_start_loads(server)
    return (f"{server.start_seconds:.1f} s" if server.start_seconds is not None else "?") + (
        " (model loads: " + ", ".join(f"{m} {s:.1f} s" for m, s in sorted(loads.items(), key=lambda kv: -kv[1])) + ")"
        if loads else "")


_SUCCESS = re.compile(r'^nv_inference_request_success\{model="([^"]+)",.*\} (\S+)$')


def delivered(server, timeout: float = 5.0) -> int | None:
    """Requests and streamed tokens that got through so far: Triton's success count of the ensembles and of their
    last step (postprocess: one request per streamed response), from its metrics; None when they do not answer. A
    probe that failed while this grew failed for a busy server, not a wedged one. The other steps do not count: with
    the decoder wedged, requests still pass preprocess, encoder and fusion, and fail after."""
    try:
        with urllib.request.urlopen(f"http://{server.host}:{server.metrics_port}/metrics", timeout=timeout) as r:
            text = r.read().decode()
    except OSError:
        return None
    counted = set(ensembles(server.model_repository)) | last_steps(server.model_repository)
    return int(sum(float(m.group(2)) for m in map(_SUCCESS.match, text.splitlines()) if m and m.group(1) in counted))


def last_steps(repo: Path) -> set[str]:
    """The model each ensemble runs last (read from their config.pbtxt)."""
    return {cfg.ensemble_scheduling.step[-1].model_name for cfg in repository_configs(repo).values()
            if cfg.platform == "ensemble" and cfg.ensemble_scheduling.step}


class Watchdog(threading.Thread):
    """Keep tritonserver answering; readiness is false from the moment it acts until the ensemble can answer again.

    - A python stub died: a non-decoupled model is unloaded and loaded (its requests in flight already got an error
      from Triton, "Stub process ... is not healthy"; those elsewhere in the ensemble finish). A decoupled python
      model (the CPU decoder) is different: its requests in flight were released to the dead stub, nothing in
      Triton 2.51 ever completes them, and they hang through an unload and a reload (seen). So then tritonserver
      itself is restarted on the same ports: those requests fail with a broken connection instead of hanging.
    - tritonserver died (a crash, the OOM killer, a SIGKILL): it is started again, after what is left of its process
      group (its python stubs) is killed.
    - A liveness probe (runtime/serve/liveness.py: one token of a cached clip through the ensemble, with a deadline)
      failed `failures` times in a row while nothing else got through either (delivered(): a probe queued behind long
      requests of a busy server does not count): a stage is wedged while readiness may still say 200 (seen: a
      SIGSTOPped decoder stub). tritonserver and its stubs are SIGKILLed and started again.
    A restart past the crash-loop bound (Checks.restarts) is not made: `gave_up` is set to the exit status for the
    launcher and the supervisor stops.
    """

    def __init__(self, server, api: RepositoryAPI, poll_s: float = 0.5, checks: Checks | None = None):
        super().__init__(name="af3trt-stub-watchdog", daemon=True)
        self.server, self.api, self.poll_s = server, api, poll_s
        self.checks = checks or Checks(period_s=0)
        self.restarts = self.checks.bound()
        self.ensembles = ensembles(server.model_repository)
        self.decoupled = decoupled_python_models(server.model_repository)
        self.stopping = threading.Event()
        self.idle = threading.Event()  # set while not healing
        self.idle.set()
        self.gave_up: int | None = None  # the exit status, once a restart was past the crash-loop bound
        self.reloads: list[dict] = []  # {model, dead_pids, action, seconds, cause, phases}
        # A restarted tritonserver was started by this thread, and PR_SET_PDEATHSIG fires when the *thread* that
        # started a process ends: so this thread lives until the supervisor has stopped tritonserver.
        self.released = threading.Event()

    def run(self) -> None:
        known = stub_pids(self.server.proc.pid)
        failed, next_probe = 0, time.monotonic() + self.checks.period_s
        while self.gave_up is None and not self.stopping.wait(self.poll_s):
            acted = False
            if self.server.proc.poll() is not None:
                acted = self.act(self.restart, f"tritonserver exited with code {self.server.proc.returncode}")
            else:
                for model, pids in list(known.items()):
                    dead = sorted(p for p in pids if not alive(p))
                    if dead and not self.stopping.is_set():
                        acted = self.act(self.heal, model, dead)
                        break
            if not acted and self.checks.period_s > 0 and time.monotonic() >= next_probe:
                before = delivered(self.server)
                why = liveness.probe_triton(self.server.grpc_url, self.checks.deadline_s)
                next_probe = time.monotonic() + self.checks.period_s
                if why is None:
                    failed = 0
                elif before is not None and (after := delivered(self.server)) is not None and after > before:
                    # slow, not wedged: other requests finished or streamed tokens meanwhile (long requests ahead
                    # of the probe in a queue); the probe counts neither way
                    log.info("watchdog: liveness probe failed (%s) while %d responses got through: busy", why,
                             after - before)
                else:
                    failed += 1
                    log.warning("watchdog: liveness probe failed (%d of %d): %s", failed, self.checks.failures, why)
                if failed >= self.checks.failures and not self.stopping.is_set():
                    acted = self.act(self.restart, f"{failed} liveness probes failed in a row, the last: {why}")
            if acted:
                failed, next_probe = 0, time.monotonic() + self.checks.period_s
                if self.server.proc.poll() is None:
                    known = stub_pids(self.server.proc.pid)
            else:
                for model, pids in stub_pids(self.server.proc.pid).items():  # stubs started since
                    known[model] = known.get(model, set()) | pids
        self.released.wait()

    def act(self, heal, *args) -> bool:
        self.idle.clear()
        try:
            heal(*args)
        except Exception as e:  # noqa: BLE001 - keep watching; the next poll retries
            log.error("watchdog: healing failed: %s", e)
        finally:
            self.idle.set()
        return True

    def restart(self, cause: str, model: str = "tritonserver", dead: list[int] = ()) -> None:
        """SIGKILL tritonserver and its stubs, start it again (readiness false until it is ready), within the bound."""
        if not self.restarts.allow():
            log.error("watchdog: %s; %d restarts within %.0f s already: giving up", cause, self.restarts.limit,
                      self.restarts.window_s)
            self.gave_up = exit_status(self.server.proc.returncode)
            return
        t0 = time.monotonic()
        log.warning("watchdog: %s; restarting tritonserver", cause)
        liveness.write_status(self.checks.status_file, f"restarting tritonserver: {cause}",
                              self.checks.start_timeout_s + 30)
        self.server.kill()
        killed = time.monotonic() - t0
        self.server.start_seconds = None
        try:
            self.server.start(self.checks.start_timeout_s)
        finally:
            liveness.write_status(self.checks.status_file, None)
            self.reloads.append({"model": model, "dead_pids": list(dead), "action": "restart", "cause": cause,
                                 "seconds": round(time.monotonic() - t0, 2),
                                 "phases": {"kill_s": round(killed, 2), "start_s": self.server.start_seconds,
                                            "model_loads_s": last_start_loads(self.server)}})
        log.warning("watchdog: tritonserver is back after %.1f s (killed in %.1f s, started in %s); ready=%s",
                    time.monotonic() - t0, killed, format_loads(self.server), self.api.ready())

    def heal(self, model: str, dead: list[int]) -> None:
        if model in self.decoupled:
            log.warning("watchdog: the python stub of model '%s' died (pid %s)", model, ", ".join(map(str, dead)))
            self.restart(f"the python stub of model '{model}' died", model, dead)
            return
        t0 = time.monotonic()
        log.warning("watchdog: the python stub of model '%s' died (pid %s); unloading and reloading it", model,
                    ", ".join(map(str, dead)))
        self.api.unload(model)  # readiness false from here (the ensemble goes with it)
        t1 = time.monotonic()
        self.api.load(model)  # blocks until loaded; Triton reloads the ensembles that use it
        t2 = time.monotonic()
        states = self.api.states()
        for e in self.ensembles:
            if states.get(e) != "READY":
                self.api.load(e)
        seconds = time.monotonic() - t0
        self.reloads.append({"model": model, "dead_pids": dead, "action": "reload", "cause": "stub died",
                             "seconds": round(seconds, 2),
                             "phases": {"unload_s": round(t1 - t0, 2), "load_s": round(t2 - t1, 2),
                                        "ensemble_s": round(time.monotonic() - t2, 2)}})
        log.warning("watchdog: model '%s' is back after %.1f s (unload %.1f s, load %.1f s); ready=%s", model,
                    seconds, t1 - t0, t2 - t1, self.api.ready())

    def healed(self) -> frozenset[str]:
        return healed_since_restart(self.reloads)

    def stop(self) -> None:
        self.stopping.set()
        self.idle.wait(600)


# Gauges of requests in flight in Triton's /metrics: queued at a model's scheduler (Triton core), and TensorRT-LLM's
# executor (tensorrtllm backend, triton_backend/inflight_batcher_llm/src/custom_metrics_reporter/
# custom_metrics_reporter.cc: family nv_trt_llm_request_metrics, request_type active|max|scheduled|context|waiting).
IN_FLIGHT_GAUGES = (re.compile(r'^nv_inference_pending_request_count\{model="([^"]+)".*\} (\S+)$'),
                    re.compile(r'^nv_trt_llm_request_metrics\{model="([^"]+)",request_type="(?:active|waiting)".*\} (\S+)$'))


def requests_in_flight(server, ensemble_names: list[str], healed: frozenset[str] = frozenset(),
                       finished: dict[str, int] | None = None) -> tuple[dict[str, int], dict[str, int]]:
    """({model: requests in flight there}, {model: requests left queued for a dead stub}) over the composing models.
    In flight: queued (Triton's metrics), being worked on by a python stub (RunningRequests files of live stubs), and
    in TensorRT-LLM's executor; empty when nothing is.

    `healed`: python models the watchdog unloaded and loaded since tritonserver started. Triton's queue gauge of
    such a model also counts requests still queued at the unloaded instance, whose stub is dead: Triton 2.51 keeps
    that instance until its queue is empty, and its python backend fails each of those requests only after a 1-s
    timed wait on the dead stub's health mutex (triton-inference-server/python_backend r24.10, src/python_be.cc
    ModelInstanceState::IsStubProcessAlive), one at a time. Under streaming load they are hundreds of per-token
    postprocess requests of streams that already failed ("Stub process '<model>_0_0' is not healthy."), and the
    decoder adds more while it finishes those streams. So a healed model's queue counts only while its live stubs
    work through it: they are running a request now, or finished one since the previous call (`finished`, kept by
    the caller between calls; a live instance with a queue is never idle across two polls); else it is left over."""
    work: dict[str, tuple[int, int]] = {}
    for pid in [server.proc.pid, *children(server.proc.pid)]:  # tritonserver, or mpirun and its ranks (TP > 1)
        for m, (n, done) in stub_work(pid).items():
            running, total = work.get(m, (0, 0))
            work[m] = (running + n, total + done)
    out, left = {m: n for m, (n, _) in work.items() if n}, {}
    finished = {} if finished is None else finished
    served = {m for m in healed if m in work and (work[m][0] or work[m][1] != finished.get(m))}
    finished.update({m: done for m, (_, done) in work.items()})
    with urllib.request.urlopen(f"http://{server.host}:{server.metrics_port}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            for gauge in IN_FLIGHT_GAUGES:
                m = gauge.match(line)
                if not m or m.group(1) in ensemble_names or float(m.group(2)) <= 0:
                    continue
                into = left if m.group(1) in healed and m.group(1) not in served else out  # left: nobody waits
                into[m.group(1)] = into.get(m.group(1), 0) + int(float(m.group(2)))
    return out, left


def drain(server, api: RepositoryAPI, grace_s: float, hurry: threading.Event | None = None,
          poll_s: float = 0.2, healed: frozenset[str] = frozenset()) -> float:
    """Refuse new requests, let those in flight finish within grace_s, then stop tritonserver and its stubs.
    `healed`: the models the watchdog reloaded (Watchdog.healed). Returns the seconds the drain waited for requests
    in flight."""
    names = ensembles(server.model_repository)
    t0 = time.monotonic()
    log.warning("draining: refusing new requests; waiting up to %.0f s for requests in flight", grace_s)
    stop_s, left = server.exit_timeout + 15, {}
    try:
        for e in names:
            api.unload(e)
        idle_polls, finished = 0, {}
        while time.monotonic() - t0 < grace_s and not (hurry and hurry.is_set()):
            states = api.states()
            if all(states.get(e) in ("UNAVAILABLE", None) for e in names):
                break
            busy, left = requests_in_flight(server, names, healed, finished)
            idle_polls = 0 if busy else idle_polls + 1
            if idle_polls >= 2:  # see the module docstring: the ensemble may stay referenced by idle streams
                break
            time.sleep(poll_s)
        else:
            log.warning("grace period over after %.1f s with requests still in flight: stopping anyway",
                        time.monotonic() - t0)
            server.stop(timeout=stop_s)
            return time.monotonic() - t0
        log.warning("drained in %.1f s", time.monotonic() - t0)
        if healed:
            # Nothing live is in flight. Triton waits --exit-timeout-secs for what is and then logs "Exit timeout
            # expired. Exiting immediately.", but an unloaded instance still failing requests queued for its dead
            # stub, one a second, holds the process up (seen: 20 s, then our SIGKILL): nobody waits for those.
            log.warning("models reloaded after a stub died (%s; left queued for a dead stub: %s): stopping "
                        "tritonserver at its exit timeout", ", ".join(sorted(healed)), left or "none seen")
            stop_s = server.exit_timeout + 2
    except (OSError, RuntimeError) as e:
        log.warning("drain: %s; stopping tritonserver", e)
    waited = time.monotonic() - t0
    server.stop(timeout=stop_s)
    log.warning("tritonserver stopped %.1f s after the drain (exit code %s)", time.monotonic() - t0 - waited,
                server.proc.returncode)
    return waited


def supervise(server, *, grace_s: float = DEFAULT_GRACE_SECONDS, watchdog: bool = True, front=None,
              checks: Checks | None = None) -> int:
    """Run until SIGTERM/SIGINT arrives (then drain), keeping tritonserver (Watchdog) and the OpenAI front
    (runtime/serve/server.py Front: restarted when it exits or stops answering HTTP) alive within the crash-loop
    bound; a second signal cuts the grace short.

    Returns the exit status for the launcher: 0 after a drain; non-zero when it gave up (a restart past the bound,
    or any death with watchdog=False): 128 + N for a process killed by signal N, else its own exit code."""
    api = RepositoryAPI(server.http_url, server.api_key_header, server.api_key)
    stop, hurry = threading.Event(), threading.Event()
    checks = checks or Checks()

    def on_signal(signum, _frame):
        log.warning("received %s", signal.Signals(signum).name)
        (hurry if stop.is_set() else stop).set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    dog = Watchdog(server, api, checks=checks) if watchdog and server.api_key else None
    if dog:
        dog.start()
    keeper = FrontKeeper(front, checks) if front is not None else None

    def died() -> bool:  # tritonserver exited, and nobody will start it again
        return server.proc.poll() is not None and dog is None

    try:
        while not stop.wait(0.5):
            if died():
                log.error("tritonserver exited with code %s; log %s:\n%s", server.proc.returncode, server.log_path,
                          server.log_tail(30))
                return exit_status(server.proc.returncode)
            if dog and dog.gave_up is not None:
                return dog.gave_up
            if keeper and (gave_up := keeper.check(watchdog)) is not None:
                return gave_up
        if dog:
            dog.stop()
        drain(server, api, grace_s, hurry, healed=dog.healed() if dog else frozenset())
        return 0
    finally:
        if dog:
            dog.stopping.set()
            dog.idle.wait(600)  # a restart in progress ends before tritonserver is stopped
        server.stop()
        if dog:
            dog.released.set()
        for s, h in previous.items():
            signal.signal(s, h)


class FrontKeeper:
    """The OpenAI front's watch, from the supervisor's loop: restarted when it exited (reaped, so no zombie) or when
    `failures` GETs of /live in a row got no answer within the deadline (a wedged front; /live does not ask Triton),
    within its own crash-loop bound."""

    def __init__(self, front, checks: Checks):
        self.front, self.checks, self.restarts = front, checks, checks.bound()
        self.failed, self.next_probe = 0, time.monotonic() + checks.period_s
        self.restarted: list[dict] = []

    def check(self, heal: bool) -> int | None:
        """None while the front runs (or was restarted); the launcher's exit status when it gave up on it."""
        cause = None
        if self.front.proc.poll() is not None:
            cause = f"the OpenAI front exited with code {self.front.proc.returncode}"
        elif self.checks.period_s > 0 and time.monotonic() >= self.next_probe:
            why = liveness.probe_http(self.front.url + "/live", self.checks.deadline_s)
            self.next_probe = time.monotonic() + self.checks.period_s
            self.failed = 0 if why is None else self.failed + 1
            if self.failed >= self.checks.failures:
                cause = f"the OpenAI front failed {self.failed} liveness probes in a row: {why}"
        if cause is None:
            return None
        if not heal or not self.restarts.allow():
            log.error("%s; %s", cause, "giving up" if heal else "no watchdog: stopping")
            self.front.kill()
            return exit_status(self.front.proc.returncode)
        log.warning("%s; restarting it", cause)
        t0 = time.monotonic()
        self.front.kill()
        try:
            self.front.start()
        except Exception as e:  # noqa: BLE001 - the next check sees it dead and tries again, within the bound
            log.error("restarting the OpenAI front failed: %s", e)
        self.failed, self.next_probe = 0, time.monotonic() + self.checks.period_s
        self.restarted.append({"cause": cause, "seconds": round(time.monotonic() - t0, 2)})
        log.warning("the OpenAI front is back after %.1f s", time.monotonic() - t0)
        return None
