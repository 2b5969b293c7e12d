"""`af3trt soak --chaos`: every kind of request while processes are killed and stopped at random; every request must
end exact or with a clear error.

    af3trt soak --chaos --model-repository OUT/model_repository --minutes 30 [--concurrency 4] [--out DIR]
    af3trt soak --chaos --model-repository SABOTAGED --reference-repository GOOD --minutes 1 --faults none

Starts `af3trt serve --openai-port` on the repository (free loopback ports; liveness probes every few seconds, a
crash-loop bound this run never reaches) and asks every request spec (SPECS: whole and streamed answers over gRPC,
thinking, a conversation, a long answer, OpenAI chat whole and streamed, a long-form transcription, a gRPC stream
the client cancels and an OpenAI stream it disconnects from) once on the quiet server: those answers are the
references (from `--reference-repository` when given, on a server of its own started first). Then `--concurrency`
workers send specs drawn at random while a fault thread, every `--gap-s` seconds, sends SIGKILL or SIGSTOP (held
for a random 2-40 s, then SIGCONT unless the process is gone) to one of: each python stub, tritonserver, the OpenAI
front — each (target, signal) in turn in a shuffled cycle — and waits until the service heals (Triton ready, a
liveness probe answered, the front's /health 200) before the next gap.

Every request ends as one of:
- exact: the whole answer equals the reference (gRPC: token ids and text; OpenAI: text and token count / finish
  reason; transcription: text);
- error: a clear error (an AF3Error, an HTTP error status with OpenAI's error body, an error event in a stream, a
  broken connection), the part received before it a prefix of the reference;
- cut: a stream the client closed on purpose (cancellation, disconnect), what it received a prefix of the reference;
- wrong: a complete answer that differs from the reference; `truncated` when it is a strict prefix of it;
- mixed: a request that ended early (an error, a cut) after tokens that are not a prefix of the reference (another
  request's, or wrong ones);
- hang: no end within the request's deadline + 30 s.
Wrong, truncated, mixed and hang are failures. Each request is counted under the fault whose window (from the signal
to the heal) it overlaps, else under `none`. Afterwards every spec is asked once more on the healed server: each must
be exact; then SIGTERM must drain and stop the whole process tree. chaos.json and chaos.md hold the counts per fault
kind, the time to heal per fault (from the signal to the first good probe) and the launcher's own heal lines
(per stage: kill / start / model loads, unload / load).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from af3trt.build.tables import Column, markdown_table
TARGETS = ("preprocess", "encoder", "fusion", "decoder", "postprocess", "cancel", "tritonserver", "openai")
SIGNALS = ("SIGKILL", "SIGSTOP")
FAILURES = ("wrong", "truncated", "mixed", "hang")
LATE_S = 30.0  # past its deadline by more than this, a request counts as hung
KEY = "chaos-" + os.urandom(6).hex()


# ------------------------------------------------------------------------------------------------ requests


@dataclass(frozen=True)
class Spec:
    """One request, always the same: `via` grpc (fields of the client's Request), chat (an OpenAI chat body) or
    transcription (form fields and the clip). cut_after: the client closes the stream after this many chunks."""

    name: str
    via: str
    fields: dict
    clip: str = ""  # CLIPS key (chat and transcription)
    cut_after: int | None = None


def make_clips() -> dict[str, bytes]:
    from af3trt.perf import clips
    from af3trt.runtime import assets

    return {"speech5": assets.speech_path().read_bytes(),
            "speech3": clips.flac_bytes(clips.speech(3.0, seed=1)),
            "tone2": clips.flac_bytes(clips.nonspeech(2.0, seed=2)),
            "talk75": clips.flac_bytes(clips.speech(75.0, seed=3))}


def make_specs(thinking: bool) -> list[Spec]:
    conversation = [{"role": "system", "content": "You answer briefly."},
                    {"role": "user", "content": [{"type": "audio", "audio_index": 0},
                                                 {"type": "text", "text": "What do you hear?"}]},
                    {"role": "assistant", "content": "A voice."},
                    {"role": "user", "content": "And what does it say?"}]
    specs = [
        Spec("grpc-whole", "grpc", {"prompt": "What is said?", "audio": ["speech5"], "max_tokens": 24,
                                    "stream": False}),
        Spec("grpc-stream", "grpc", {"prompt": "Describe the sound.", "audio": ["speech3"], "max_tokens": 48,
                                     "stream": True}),
        Spec("grpc-conversation", "grpc", {"messages": conversation, "audio": ["tone2"], "max_tokens": 24,
                                           "stream": True}),
        Spec("grpc-long", "grpc", {"prompt": "Say a lot.", "audio": ["speech3"], "max_tokens": 200,
                                   "ignore_eos": True, "stream": True}),
        Spec("grpc-cancel", "grpc", {"prompt": "Say a lot.", "audio": ["speech5"], "max_tokens": 200,
                                     "ignore_eos": True, "stream": True}, cut_after=3),
        Spec("chat-whole", "chat", {"max_tokens": 24, "messages": [{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"format": "flac"}}, {"type": "text", "text": "What is it?"}]}]},
             clip="speech3"),
        Spec("chat-stream", "chat", {"max_tokens": 40, "stream": True, "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "input_audio", "input_audio": {"format": "flac"}},
                                         {"type": "text", "text": "Transcribe it."}]}]}, clip="speech5"),
        Spec("chat-disconnect", "chat", {"max_tokens": 200, "ignore_eos": True, "stream": True, "messages": [
            {"role": "user", "content": [{"type": "input_audio", "input_audio": {"format": "flac"}},
                                         {"type": "text", "text": "Say a lot."}]}]}, clip="tone2", cut_after=3),
        Spec("transcription-long", "transcription", {"chunking_strategy": "auto", "response_format": "json"},
             clip="talk75"),
    ]
    if thinking:
        specs.append(Spec("grpc-thinking", "grpc", {"prompt": "What is said?", "audio": ["speech5"],
                                                    "max_tokens": 32, "thinking": True, "stream": False}))
        specs.append(Spec("chat-thinking", "chat", {"max_tokens": 24, "reasoning_effort": "high", "messages": [
            {"role": "user", "content": [{"type": "input_audio", "input_audio": {"format": "flac"}},
                                         {"type": "text", "text": "What is it?"}]}]}, clip="speech5"))
    return specs


@dataclass
class Result:
    """What a request gave: `ids` (gRPC) or `text` received, whether it completed, its error, and when."""

    spec: str
    t0: float
    t1: float = 0.0
    ids: list[int] = field(default_factory=list)
    text: str = ""
    extra: str = ""  # chat: finish reason and completion tokens
    complete: bool = False
    error: str | None = None
    outcome: str = ""
    fault: str = "none"


class Asker:
    """Sends a Spec through gRPC (one shared AF3Client) or the OpenAI front (one httpx client per thread)."""

    def __init__(self, grpc_url: str, http_url: str, clips: dict[str, bytes], deadline_s: float):
        from af3trt.runtime.client.library import AF3Client

        self.grpc_url, self.http_url, self.clips, self.deadline_s = grpc_url, http_url, clips, deadline_s
        self.client = AF3Client(grpc_url, timeout=deadline_s)
        self.local = threading.local()
        self.model_id: str | None = None

    def http(self):
        import httpx

        if getattr(self.local, "http", None) is None:
            self.local.http = httpx.Client(base_url=self.http_url, timeout=httpx.Timeout(self.deadline_s, connect=10),
                                           headers={"authorization": f"Bearer {KEY}"})
        return self.local.http

    def close(self) -> None:
        self.client.close()

    def ask(self, spec: Spec) -> Result:
        res = Result(spec.name, time.monotonic())
        try:
            {"grpc": self._grpc, "chat": self._chat, "transcription": self._transcription}[spec.via](spec, res)
        except Exception as e:  # noqa: BLE001 - every way a request ends is recorded
            res.error = f"{type(e).__name__}: {e}"[:300]
        res.t1 = time.monotonic()
        return res

    def _grpc(self, spec: Spec, res: Result) -> None:
        from af3trt.runtime.client.library import Request

        f = dict(spec.fields)
        f["audio"] = [self.clips[k] for k in f.get("audio", ())]
        chunks = self.client.responses(Request(deadline_s=self.deadline_s, **f))
        try:
            for n, chunk in enumerate(chunks, 1):
                res.ids += chunk.token_ids
                res.text += chunk.text
                if spec.cut_after is not None and n >= spec.cut_after:
                    return  # the client leaves early: the stream is cancelled
        finally:
            chunks.close()
        res.complete = True

    def _model(self) -> str:
        if self.model_id is None:
            self.model_id = self.http().get("/v1/models").json()["data"][0]["id"]
        return self.model_id

    def _chat(self, spec: Spec, res: Result) -> None:
        body = json.loads(json.dumps(spec.fields))
        body["model"] = self._model()
        for m in body["messages"]:
            for p in m["content"] if isinstance(m["content"], list) else ():
                if p.get("type") == "input_audio":
                    p["input_audio"]["data"] = base64.b64encode(self.clips[spec.clip]).decode()
        if not body.get("stream"):
            r = self.http().post("/v1/chat/completions", json=body)
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {_error_message(r)}"
                return
            out = r.json()
            res.text = out["choices"][0]["message"]["content"]
            res.extra = f"{out['choices'][0]['finish_reason']} {out['usage']['completion_tokens']}"
            res.complete = True
            return
        with self.http().stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                r.read()
                res.error = f"HTTP {r.status_code}: {_error_message(r)}"
                return
            n, reason = 0, None
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    res.complete = reason is not None and res.error is None
                    if not res.complete and res.error is None:
                        res.error = "the stream ended without a finish reason"
                    break
                event = json.loads(data)
                if "error" in event:
                    res.error = f"error event: {event['error'].get('message')}"
                    continue
                for choice in event.get("choices", ()):
                    res.text += choice.get("delta", {}).get("content") or ""
                    reason = choice.get("finish_reason") or reason
                n += 1
                if spec.cut_after is not None and n > spec.cut_after:
                    return  # the client disconnects
            else:
                res.error = res.error or "the stream ended without [DONE]"
            res.extra = str(reason)

    def _transcription(self, spec: Spec, res: Result) -> None:
        form = {"model": self._model(), **spec.fields}
        r = self.http().post("/v1/audio/transcriptions", data=form,
                             files={"file": ("clip.flac", self.clips[spec.clip], "audio/flac")})
        if r.status_code != 200:
            res.error = f"HTTP {r.status_code}: {_error_message(r)}"
            return
        res.text = r.json()["text"]
        res.complete = True


def _error_message(r) -> str:
    try:
        err = r.json()["error"]
        assert isinstance(err["message"], str) and err["message"]
        return err["message"][:200]
    except Exception:  # noqa: BLE001 - not OpenAI's error body: say so (it is not a clear error)
        return f"(no error body) {r.text[:200]}"


def classify(res: Result, ref: Result, spec: Spec, deadline_s: float) -> str:
    """The outcome of one request against its reference (the module docstring's classes)."""
    if res.t1 - res.t0 > deadline_s + LATE_S:
        return "hang"
    got, want = (res.ids, ref.ids) if spec.via == "grpc" else (res.text, ref.text)
    prefix = got == want[:len(got)]
    if spec.via == "grpc" and prefix:  # the text too: a chunk's ids with another request's text would be mixed
        prefix = ref.text.startswith(res.text) or res.text == ref.text
    if res.error is not None:
        if "(no error body)" in res.error:
            return "wrong"  # an error answer without OpenAI's error body is not a clear error
        return "error" if prefix else "mixed"
    if not res.complete:  # the client closed it on purpose
        return "cut" if prefix else "mixed"
    if got == want and res.text == ref.text and res.extra == ref.extra:
        return "exact"
    return "truncated" if prefix and len(got) < len(want) else "wrong"


# ------------------------------------------------------------------------------------------------ the service


class Service:
    """`af3trt serve --openai-port` as an operator runs it, with fast liveness probes for the run."""

    def __init__(self, repo: Path, logs: Path, liveness: tuple[float, float, int] = (5.0, 15.0, 2),
                 start_timeout: float = 600.0):
        from af3trt.runtime.serve.server import die_with_this_process, free_port

        self.grpc, self.http, self.metrics, self.openai = (free_port() for _ in range(4))
        logs.mkdir(parents=True, exist_ok=True)
        self.log, self.triton_log = logs / "serve.log", logs / "tritonserver.log"
        period, deadline, failures = liveness
        cmd = [sys.executable, "-m", "af3trt.runtime.serve.server", "--model-repository", str(repo), "--grpc-port",
               str(self.grpc), "--http-port", str(self.http), "--metrics-port", str(self.metrics), "--openai-port",
               str(self.openai), "--log", str(self.triton_log), "--api-key-env", "AF3TRT_CHAOS_KEY",
               "--liveness-period-s", str(period), "--liveness-deadline-s", str(deadline), "--liveness-failures",
               str(failures), "--max-restarts", "1000", "--restart-window-s", "60", "--grace-seconds", "60"]
        env = dict(os.environ, AF3TRT_CHAOS_KEY=KEY)
        self.t_start = time.monotonic()
        cmd, preexec = die_with_this_process(cmd)  # a harness that dies takes its server with it
        self.proc = subprocess.Popen(cmd, env=env, stdout=open(self.log, "wb"), stderr=subprocess.STDOUT,
                                     start_new_session=True, preexec_fn=preexec)
        if not self.wait_healthy(start_timeout):
            self.stop()
            raise RuntimeError(f"af3trt serve did not come up in {start_timeout:.0f} s; log {self.log}")
        self.start_s = time.monotonic() - self.t_start

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.openai}"

    def pid_of(self, target: str) -> int | None:
        from af3trt.runtime.host.proc import children, cmdline, stub_pids

        for pid in children(self.proc.pid):
            argv = cmdline(pid)
            if not argv:
                continue
            if target == "openai":
                if "af3trt.runtime.openai.app" in argv:
                    return pid
            elif argv[0].endswith("tritonserver"):
                if target == "tritonserver":
                    return pid
                return min(stub_pids(pid).get(target, ()), default=None)
        return None

    def healthy(self, probe_deadline_s: float = 10.0) -> bool:
        """Triton ready, a liveness probe through the ensemble answered, and the front's /health 200."""
        from af3trt.runtime.serve.liveness import probe_triton

        if self.proc.poll() is not None:
            return False
        for url in (f"http://127.0.0.1:{self.http}/v2/health/ready", f"{self.http_url}/health"):
            try:
                with urllib_open(url, 5) as r:
                    if r.status != 200:
                        return False
            except OSError:
                return False
        return probe_triton(self.grpc_url, probe_deadline_s) is None

    def wait_healthy(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            if self.healthy():
                return True
            time.sleep(0.5)
        return False

    def stop(self, timeout: float = 180.0) -> dict:
        """SIGTERM (drain), then what is left of the tree. Returns {exit_code, seconds, left: pids that outlived it}."""
        from af3trt.runtime.host.proc import descendants

        tree = descendants(self.proc.pid)
        t0 = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        seconds = time.monotonic() - t0
        left = [p for p in tree if _outlives(p, 10.0)]
        for p in left:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return {"exit_code": self.proc.returncode, "seconds": round(seconds, 1), "left": left}


def urllib_open(url: str, timeout: float):
    import urllib.request

    return urllib.request.urlopen(url, timeout=timeout)


def _outlives(pid: int, within_s: float) -> bool:
    """Whether pid is still alive after up to within_s seconds."""
    from af3trt.runtime.host.proc import alive

    deadline = time.monotonic() + within_s
    while alive(pid):
        if time.monotonic() > deadline:
            return True
        time.sleep(0.2)
    return False


# ------------------------------------------------------------------------------------------------ faults


@dataclass
class Fault:
    kind: str  # "<target> <SIGNAL>"
    pid: int | None
    t: float
    held_s: float = 0.0  # SIGSTOP: how long it was held before SIGCONT (0: the process was gone by then)
    healed_s: float | None = None  # from the signal to the first healthy check
    t_end: float = 0.0


def inject(service: Service, kind: str, rng: random.Random, heal_timeout: float) -> Fault:
    target, sig = kind.split()
    pid = service.pid_of(target)
    fault = Fault(kind, pid, time.monotonic())
    if pid is None:
        fault.t_end = fault.t
        return fault
    hold = rng.uniform(2.0, 40.0) if sig == "SIGSTOP" else 0.0
    started = _start_time(pid)
    os.kill(pid, getattr(signal, sig))
    resumed = sig != "SIGSTOP"
    while time.monotonic() - fault.t < heal_timeout:
        now = time.monotonic()
        if not resumed and now - fault.t >= hold:
            if _start_time(pid) == started:  # the same process, still there: the supervisor did not replace it
                os.kill(pid, signal.SIGCONT)
                fault.held_s = round(now - fault.t, 1)
            resumed = True
        if fault.healed_s is None and service.healthy():
            fault.healed_s = round(time.monotonic() - fault.t, 2)
        if resumed and fault.healed_s is not None:
            break
        time.sleep(0.3)
    fault.t_end = time.monotonic()
    return fault


def _start_time(pid: int) -> str | None:
    """When the process started (/proc/<pid>/stat field 22): tells a process from a new one with its pid."""
    from af3trt.runtime.host.proc import stat

    fields = stat(pid)
    return fields[19] if fields and len(fields) > 19 else None


# ------------------------------------------------------------------------------------------------ the run


def references(service: Service, specs: list[Spec], clips: dict, deadline_s: float) -> dict[str, Result]:
    """Each spec once on a quiet server, uncut: the answers every later request must equal."""
    asker = Asker(service.grpc_url, service.http_url, clips, deadline_s)
    out = {}
    try:
        for spec in specs:
            uncut = Spec(spec.name, spec.via, spec.fields, spec.clip)
            res = asker.ask(uncut)
            if res.error or not res.complete:
                raise RuntimeError(f"reference for {spec.name} failed on the quiet server: {res.error}")
            out[spec.name] = res
    finally:
        asker.close()
    return out


def run(repo: Path, out: Path, *, minutes: float, concurrency: int = 4, seed: int = 0,
        reference_repo: Path | None = None, faults: bool = True, gap_s: tuple[float, float] = (10.0, 30.0),
        deadline_s: float = 120.0, log=print) -> dict:
    rng = random.Random(seed)
    logs = Path(tempfile.mkdtemp(prefix="af3trt-chaos-"))
    log(f"[chaos] logs in {logs}")
    clips = make_clips()
    thinking = (repo / ".." / "artifacts" / "think").resolve().is_dir()
    specs = make_specs(thinking)
    by_name = {s.name: s for s in specs}
    if reference_repo is not None:
        quiet = Service(reference_repo, logs / "reference")
        try:
            refs = references(quiet, specs, clips, deadline_s)
        finally:
            quiet.stop()
    service = Service(repo, logs / "serve")
    log(f"[chaos] af3trt serve healthy after {service.start_s:.1f} s")
    if reference_repo is None:
        refs = references(service, specs, clips, deadline_s)
    results: list[Result] = []
    fault_log: list[Fault] = []
    lock = threading.Lock()
    t0 = time.monotonic()
    end = t0 + 60 * minutes
    stopping = threading.Event()
    busy: dict[int, tuple[float, str]] = {}
    asker = Asker(service.grpc_url, service.http_url, clips, deadline_s)

    def worker(k: int) -> None:
        wrng = random.Random(seed * 1000 + k)
        while time.monotonic() < end:
            spec = wrng.choice(specs)
            busy[k] = (time.monotonic(), spec.name)
            res = asker.ask(spec)
            busy.pop(k, None)
            with lock:
                results.append(res)
            if res.error:
                time.sleep(0.5)  # a client backs off after an error

    def chaos() -> None:
        kinds = [f"{t} {s}" for t in TARGETS for s in SIGNALS]
        cycle: list[str] = []
        while not stopping.wait(rng.uniform(*gap_s)) and time.monotonic() < end - 5:
            if not cycle:
                cycle = rng.sample(kinds, len(kinds))
            kind = cycle.pop()
            f = inject(service, kind, rng, heal_timeout=300.0)
            fault_log.append(f)
            log(f"[chaos] {time.monotonic() - t0:6.0f} s  {kind:24s} pid {f.pid}  held {f.held_s:4.1f} s  "
                f"healed after {f.healed_s} s  ({len(results)} requests so far)")

    def progress() -> None:
        while not stopping.wait(60):
            with lock:
                c = Counter(r.outcome or _quick(r) for r in results)
            log(f"[chaos] {time.monotonic() - t0:6.0f} s  requests {len(results)}  {dict(c)}  load {os.getloadavg()}")

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(concurrency)]
    chaos_thread = threading.Thread(target=chaos, daemon=True)
    for t in threads:
        t.start()
    if faults:
        chaos_thread.start()
    threading.Thread(target=progress, daemon=True).start()
    loads = []
    while any(t.is_alive() for t in threads):
        loads.append(os.getloadavg()[0])
        time.sleep(5)
        now = time.monotonic()
        if now > end and all(now - b[0] > deadline_s + LATE_S for b in list(busy.values())):
            break  # the rest are hung: recorded as such below
    hung = [Result(name, b, t1=time.monotonic(), error="never ended") for b, name in busy.values()]
    stopping.set()
    if faults:
        chaos_thread.join(400)
    asker.close()
    for r in results + hung:
        r.outcome = classify(r, refs[r.spec], by_name[r.spec], deadline_s) if r.error != "never ended" else "hang"
        r.fault = fault_of(r, fault_log)
    healed_after = service.wait_healthy(300)
    after = references(service, specs, clips, deadline_s) if healed_after else {}
    exact_after = {name: classify(after[name], refs[name], by_name[name], deadline_s) == "exact"
                   for name in after} if after else {}
    launcher_lines = heal_lines(service.log.read_text(errors="replace"))
    stopped = service.stop()
    res = report(results + hung, fault_log, refs, exact_after, stopped, launcher_lines, loads, minutes=minutes,
                 concurrency=concurrency, seed=seed, repo=repo, reference_repo=reference_repo, start_s=service.start_s,
                 healed_after=healed_after, deadline_s=deadline_s)
    out.mkdir(parents=True, exist_ok=True)
    (out / "chaos.json").write_text(json.dumps(res, indent=1))
    (out / "chaos.md").write_text(report_md(res))
    return res


def _quick(r: Result) -> str:
    return "error" if r.error else "done" if r.complete else "cut"


def fault_of(r: Result, faults: list[Fault]) -> str:
    """The kind of the last fault whose window (signal to heal) overlaps the request; 'none' when none does."""
    kind = "none"
    for f in faults:
        if f.t <= r.t1 and r.t0 <= (f.t_end or f.t):
            kind = f.kind
    return kind


# The launcher's own heal lines (runtime/serve/supervisor.py)
HEAL_LINES = (re.compile(r"watchdog: model '(\w+)' is back after ([\d.]+) s \(unload ([\d.]+) s, load ([\d.]+) s\)"),
              re.compile(r"watchdog: tritonserver is back after ([\d.]+) s \(killed in ([\d.]+) s, started in "
                         r"([\d.]+) s(?: \(model loads: ([^)]*)\))?"),
              re.compile(r"the OpenAI front is back after ([\d.]+) s"),
              re.compile(r"tritonserver started in ([\d.]+) s(?: \(model loads: ([^)]*)\))?"))


def heal_lines(text: str) -> dict:
    """The launcher's heal (and start) lines in `text`: {reload: [...], restart: [...], front: [...], start: [...]}."""
    out: dict = {"reload": [], "restart": [], "front": [], "start": []}
    for line in text.splitlines():
        if m := HEAL_LINES[3].search(line):
            loads = dict((k, float(v)) for k, v in re.findall(r"(\w+) ([\d.]+) s", m.group(2) or ""))
            out["start"].append({"seconds": float(m.group(1)), "model_loads_s": loads})
            continue
        if m := HEAL_LINES[0].search(line):
            out["reload"].append({"model": m.group(1), "seconds": float(m.group(2)), "unload_s": float(m.group(3)),
                                  "load_s": float(m.group(4))})
        elif m := HEAL_LINES[1].search(line):
            loads = dict((k, float(v)) for k, v in re.findall(r"(\w+) ([\d.]+) s", m.group(4) or ""))
            out["restart"].append({"seconds": float(m.group(1)), "kill_s": float(m.group(2)),
                                   "start_s": float(m.group(3)), "model_loads_s": loads})
        elif m := HEAL_LINES[2].search(line):
            out["front"].append({"seconds": float(m.group(1))})
    return out


def report(results: list[Result], faults: list[Fault], refs: dict, exact_after: dict, stopped: dict,
           launcher: dict, loads: list[float], **conf) -> dict:
    per_kind: dict[str, Counter] = defaultdict(Counter)
    errors: dict[str, Counter] = defaultdict(Counter)
    for r in results:
        per_kind[r.fault][r.outcome] += 1
        if r.outcome == "error":
            errors[r.fault][re.sub(r"[0-9a-f]{32}|\d+", "N", r.error or "")[:120]] += 1
    heal: dict[str, list[float]] = defaultdict(list)
    for f in faults:
        if f.healed_s is not None:
            heal[f.kind].append(f.healed_s)
    failures = {r.spec + " " + r.outcome: asdict(r) for r in results if r.outcome in FAILURES}
    return {
        **{k: str(v) if isinstance(v, Path) else v for k, v in conf.items()},
        "requests": len(results), "outcomes": dict(Counter(r.outcome for r in results)),
        "per_fault_kind": {k: dict(v) for k, v in sorted(per_kind.items())},
        "faults": [asdict(f) for f in faults],
        "faults_per_kind": dict(Counter(f.kind for f in faults)),
        "heal_s_per_kind": {k: {"n": len(v), "median": float(np.median(v)), "max": max(v)}
                            for k, v in sorted(heal.items())},
        "unhealed": [f.kind for f in faults if f.healed_s is None and f.pid is not None],
        "launcher_heals": launcher,
        "errors_per_fault_kind": {k: dict(v.most_common(8)) for k, v in errors.items()},
        "failures": list(failures.values())[:40],
        "references": {k: {"ids": v.ids, "text": v.text[:200], "extra": v.extra} for k, v in refs.items()},
        "exact_after": exact_after, "stopped": stopped,
        "load_average": {"min": min(loads, default=0), "median": float(np.median(loads)) if loads else 0,
                         "max": max(loads, default=0)},
        "ok": (not any(r.outcome in FAILURES for r in results) and bool(exact_after) and all(exact_after.values())
               and stopped["exit_code"] == 0 and not stopped["left"]),
    }


def report_md(res: dict) -> str:
    cols = ("exact", "error", "cut", *FAILURES)
    lines = [f"# Chaos soak: {res['requests']} requests in {res['minutes']:g} min, concurrency {res['concurrency']}, "
             f"{len(res['faults'])} faults", "",
             f"`af3trt soak --chaos` (perf/chaos.py) on `{res['repo']}`; references from "
             f"`{res['reference_repo'] or 'the same repository, quiet'}`. Load average during the run: median "
             f"{res['load_average']['median']:.1f} (min {res['load_average']['min']:.1f}, max "
             f"{res['load_average']['max']:.1f}) on this machine's cores, shared with other work: times below are "
             f"measured under that load.", "",
             f"- outcomes: {res['outcomes']}",
             f"- **failures (wrong, truncated, mixed, hang): {sum(res['outcomes'].get(k, 0) for k in FAILURES)}**",
             f"- exact afterwards: {res['exact_after']}", f"- SIGTERM afterwards: {res['stopped']}",
             f"- faults never healed within 300 s: {res['unhealed'] or 'none'}",
             f"- af3trt serve healthy at start after {res['start_s']:.1f} s", "",
             *markdown_table(
                 [Column("fault", "kind"), Column("faults"), Column("requests", lambda r: sum(r["outcomes"].values())),
                  *(Column(k, lambda r, k=k: r["outcomes"].get(k, 0)) for k in cols),
                  Column("heal s (median / max)", "heal", lambda h: f"{h['median']:.1f} / {h['max']:.1f}")],
                 [{"kind": kind, "faults": res["faults_per_kind"].get(kind), "heal": res["heal_s_per_kind"].get(kind),
                   "outcomes": res["per_fault_kind"].get(kind, {})}
                  for kind in sorted(set(res["per_fault_kind"]) | set(res["faults_per_kind"]))])]
    lh = res["launcher_heals"]
    lines += ["", "The launcher's own heals (serve.log):", ""]
    if lh["restart"]:
        ks = [r["seconds"] for r in lh["restart"]]
        loads = defaultdict(list)
        for r in lh["restart"]:
            for m, s in r["model_loads_s"].items():
                loads[m].append(s)
        lines.append(f"- tritonserver restarts: {len(ks)}, median {np.median(ks):.1f} s (kill median "
                     f"{np.median([r['kill_s'] for r in lh['restart']]):.2f} s, start median "
                     f"{np.median([r['start_s'] for r in lh['restart']]):.1f} s); model loads, median: "
                     + ", ".join(f"{m} {np.median(v):.1f} s" for m, v in sorted(loads.items())))
    by_model = defaultdict(list)
    for r in lh["reload"]:
        by_model[r["model"]].append(r)
    for m, rs in sorted(by_model.items()):
        lines.append(f"- {m} stub reloads: {len(rs)}, median {np.median([r['seconds'] for r in rs]):.1f} s "
                     f"(unload {np.median([r['unload_s'] for r in rs]):.1f} s, load "
                     f"{np.median([r['load_s'] for r in rs]):.1f} s)")
    if lh["front"]:
        lines.append(f"- OpenAI front restarts: {len(lh['front'])}, median "
                     f"{np.median([r['seconds'] for r in lh['front']]):.1f} s")
    if res["errors_per_fault_kind"]:
        lines += ["", "Clear errors, most frequent per fault kind:", ""]
        for kind, errs in sorted(res["errors_per_fault_kind"].items()):
            lines.append(f"- {kind}: " + "; ".join(f"{n}× {e}" for e, n in list(errs.items())[:4]))
    if res["failures"]:
        lines += ["", "Failures (first 40 in chaos.json):", ""]
        lines += [f"- {f['spec']} {f['outcome']} under {f['fault']}: error {f['error']!r}, got "
                  f"{(f['ids'] or f['text'])!r:.120}" for f in res["failures"][:10]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="af3trt soak --chaos", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chaos", action="store_true", help="(this mode)")
    ap.add_argument("--model-repository", type=Path, required=True)
    ap.add_argument("--reference-repository", type=Path, default=None,
                    help="take the reference answers from this build (a server of its own, quiet) instead")
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gap-s", default="10-30", help="seconds between a heal and the next fault, LO-HI")
    ap.add_argument("--faults", choices=("random", "none"), default="random",
                    help="none: the same mix and oracles without faults (a sabotaged build's check)")
    ap.add_argument("--deadline-s", type=float, default=120.0, help="each request's deadline")
    ap.add_argument("--out", type=Path, default=Path("perf/results/chaos"))
    args = ap.parse_args(argv)

    def said(signum, _frame):  # a run stopped from outside says so, and its server drains (Service.stop via exit)
        print(f"[chaos] received {signal.Signals(signum).name}: stopping", flush=True)
        raise SystemExit(128 + signum)

    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, said)
    lo, _, hi = args.gap_s.partition("-")
    res = run(args.model_repository.resolve(), args.out, minutes=args.minutes, concurrency=args.concurrency,
              seed=args.seed, reference_repo=args.reference_repository and args.reference_repository.resolve(),
              faults=args.faults == "random", gap_s=(float(lo), float(hi or lo)), deadline_s=args.deadline_s)
    print(report_md(res))
    print(f"written: {args.out / 'chaos.json'}, {args.out / 'chaos.md'}")
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
