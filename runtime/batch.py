"""`af3trt batch INPUT.jsonl OUTPUT.jsonl`: a whole data set through the OpenAI-compatible front, in the file format
of OpenAI's Batch API, with a progress bar, resumable.

    af3trt batch in.jsonl out.jsonl --url http://127.0.0.1:9000          against a running `af3trt openai`
    af3trt batch in.jsonl out.jsonl --model-repository OUT/model_repository   starts `af3trt serve` for the run

Input, one request a line (OpenAI's batch input format):
    {"custom_id": "q1", "method": "POST", "url": "/v1/chat/completions", "body": {"model": …, "messages": […]}}
    {"custom_id": "t1", "method": "POST", "url": "/v1/audio/transcriptions", "body": {"file": "clips/a.flac", …}}
Audio is base64 in the body (chat: {"type": "input_audio", "input_audio": {"data", "format"}}; transcriptions:
"file": {"data": <base64>, "filename"}) or a local file named in the line (chat: "input_audio": {"file": PATH};
transcriptions: "file": PATH), read here, relative to the input file's folder: the server never opens a path. Every
other body field goes to the server as it is (sampling, thinking, chunking_strategy, response_format …).

Output, one line per request as it finishes, written and flushed at once (OpenAI's batch output format):
    {"id": "batch_req_…", "custom_id": "q1", "response": {"status_code": 200, "request_id": …, "body": {…}},
     "error": null}
An HTTP error answer is a response with its status code and OpenAI's error body; a line that cannot be sent (not
JSON, no custom_id, an unknown url, a missing audio file, a repeated custom_id) is a line with "response": null and
"error": {"code", "message", "line"}. Rerunning with the same OUTPUT skips the custom_ids (and bad line numbers)
already in it, so a run stopped by Ctrl-C, a crash or a kill resumes where it was; a torn last line (a kill in
the middle of a write) is cut off first.

Only answers the server gave are final. A line that got no answer for want of a server (a refused or broken
connection, no response in time, or 429/502/503/504 to the last try) is retried with exponential backoff (capped at
10 s) for at least --max-retries tries and --server-wait-s seconds — a server that restarts (`af3trt serve` restarts
a dead tritonserver or front) answers it in the same run — and if it still has none it is not written: the run ends
with exit status 75 (EX_TEMPFAIL) and says how many lines are left, and a rerun with the same OUTPUT sends them.

Concurrency: up to --concurrency requests in flight, halved each time the server answers busy (503/429: its queue
is full) and grown back by one per window of successes. The progress bar shows lines, rate, RTFx (audio seconds per
wall second) and ETA; a summary follows (lines, errors, req/s, RTFx, tokens).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import soundfile as sf

ENDPOINTS = ("/v1/chat/completions", "/v1/audio/transcriptions")
RETRY_STATUS = (429, 502, 503, 504)
EX_TEMPFAIL = 75  # sysexits.h: lines are left for a rerun (no server answered them)


class BadLine(ValueError):
    """A line that cannot become a request: its error line says why."""

    def __init__(self, message: str, code: str = "invalid_request"):
        super().__init__(message)
        self.code = code


@dataclass
class Job:
    number: int  # 1-based line number in the input
    custom_id: str
    url: str
    body: dict
    audio_seconds: float = 0.0


# ------------------------------------------------------------------------------------------------ lines


def parse_line(raw: str, number: int) -> Job:
    try:
        line = json.loads(raw)
    except json.JSONDecodeError as e:
        raise BadLine(f"not JSON: {e}", "invalid_json") from None
    if not isinstance(line, dict):
        raise BadLine("a line is a JSON object")
    cid = line.get("custom_id")
    if not isinstance(cid, str) or not cid:
        raise BadLine("custom_id (a non-empty string) is required", "missing_custom_id")
    if line.get("method", "POST") != "POST":
        raise BadLine(f"method must be POST, got {line.get('method')!r}")
    if line.get("url") not in ENDPOINTS:
        raise BadLine(f"url must be one of {', '.join(ENDPOINTS)}, got {line.get('url')!r}", "invalid_url")
    if not isinstance(line.get("body"), dict):
        raise BadLine("body (an object) is required")
    return Job(number, cid, line["url"], line["body"])


def _read(base: Path, name) -> bytes:
    """A clip named in a line, relative to the input file's folder."""
    if not isinstance(name, str) or not name:
        raise BadLine(f"an audio file name must be a non-empty string, got {name!r}")
    path = base / name
    try:
        return path.read_bytes()
    except OSError as e:
        raise BadLine(f"cannot read audio file {str(path)!r}: {e.strerror or e}", "file_not_found") from None


def _seconds(data: bytes) -> float:
    try:
        return float(sf.info(io.BytesIO(data)).duration)
    except (sf.SoundFileError, RuntimeError):
        return 0.0  # the server gives the precise error


def resolve_chat(job: Job, base: Path) -> dict:
    """The chat body to send: input_audio parts naming a "file" read here and sent as base64 (format from the
    file's suffix unless given); everything else unchanged."""
    body = dict(job.body)
    messages = body.get("messages")
    if not isinstance(messages, list):
        return body  # the server says what is wrong
    out = []
    for m in messages:
        if isinstance(m, dict) and isinstance(m.get("content"), list):
            parts = []
            for p in m["content"]:
                audio = p.get("input_audio") if isinstance(p, dict) and p.get("type") == "input_audio" else None
                if isinstance(audio, dict) and "file" in audio:
                    data = _read(base, audio["file"])
                    fmt = audio.get("format") or Path(audio["file"]).suffix.lstrip(".").lower()
                    p = {**p, "input_audio": {"data": base64.b64encode(data).decode(), "format": fmt}}
                    job.audio_seconds += _seconds(data)
                elif isinstance(audio, dict) and isinstance(audio.get("data"), str):
                    try:
                        job.audio_seconds += _seconds(base64.b64decode(audio["data"], validate=True))
                    except ValueError:
                        pass  # the server answers the bad base64
                parts.append(p)
            m = {**m, "content": parts}
        out.append(m)
    body["messages"] = out
    return body


def resolve_transcription(job: Job, base: Path) -> tuple[dict, tuple[str, bytes]]:
    """(form fields, (file name, bytes)) of a transcription line. Lists go as repeated `key[]` fields and objects
    as JSON text, as the server reads them."""
    body = dict(job.body)
    given = body.pop("file", None)
    if isinstance(given, str):
        data, name = _read(base, given), Path(given).name
    elif isinstance(given, dict) and isinstance(given.get("data"), str):
        try:
            data = base64.b64decode(given["data"], validate=True)
        except ValueError:
            raise BadLine("file.data is not valid base64") from None
        name = str(given.get("filename") or "audio")
    else:
        raise BadLine("a transcription body needs file: a path, or {\"data\": base64, \"filename\"}")
    job.audio_seconds = _seconds(data)
    fields: list[tuple[str, str]] = []
    for k, v in body.items():
        if isinstance(v, list):
            fields += [(f"{k}[]", str(x)) for x in v]
        elif isinstance(v, dict):
            fields.append((k, json.dumps(v)))
        elif isinstance(v, bool):
            fields.append((k, "true" if v else "false"))
        elif v is not None:
            fields.append((k, str(v)))
    return fields, (name, data)


def read_done(output: Path) -> tuple[set[str], set[int]]:
    """The custom_ids already answered in OUTPUT and the line numbers already reported bad; a torn last line (no
    newline: the writer was killed mid-write) is cut off."""
    ids: set[str] = set()
    bad: set[int] = set()
    if not output.exists():
        return ids, bad
    with open(output, "rb+") as f:
        data = f.read()
        keep = data.rfind(b"\n") + 1
        if keep < len(data):
            f.truncate(keep)
    for raw in data[:keep].splitlines():
        try:
            line = json.loads(raw)
        except json.JSONDecodeError:
            continue
        if line.get("custom_id"):
            ids.add(line["custom_id"])
        elif isinstance(line.get("error"), dict) and isinstance(line["error"].get("line"), int):
            bad.add(line["error"]["line"])
    return ids, bad


# ------------------------------------------------------------------------------------------------ running


class Window:
    """How many requests may be in flight: halved on a busy answer, grown by one per `limit` successes."""

    def __init__(self, cap: int):
        self.cap, self.limit, self.inflight = cap, float(cap), 0
        self.changed = asyncio.Condition()

    async def __aenter__(self):
        async with self.changed:
            await self.changed.wait_for(lambda: self.inflight < max(1, int(self.limit)))
            self.inflight += 1

    async def __aexit__(self, *exc):
        async with self.changed:
            self.inflight -= 1
            self.changed.notify_all()

    def busy(self) -> None:
        self.limit = max(1.0, self.limit / 2)

    def ok(self) -> None:
        self.limit = min(float(self.cap), self.limit + 1.0 / self.limit)


@dataclass
class Tally:
    total: int  # lines to do in this run
    done: int = 0
    errors: int = 0
    skipped: int = 0
    retries: int = 0
    unanswered: int = 0  # lines no server answered: not written, a rerun sends them
    audio_s: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    t0: float = field(default_factory=time.monotonic)
    t_end: float | None = None  # when the run stopped (the summary's wall time leaves out stopping a server)
    shown: float = 0.0
    last: str = ""

    def rate(self) -> float:
        return self.done / max(time.monotonic() - self.t0, 1e-9)

    def bar(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.shown < (0.25 if sys.stderr.isatty() else 10.0):  # a log gets a line per 10 s
            return
        self.shown = now
        wall = max(now - self.t0, 1e-9)
        frac = self.done / self.total if self.total else 1.0
        rate = self.done / wall
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        filled = int(frac * 30)
        text = (f"\r[{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total} {frac:4.0%} | {rate:.2f} req/s"
                f" | RTFx {self.audio_s / wall:.1f} | ETA {_clock(eta)} | errors {self.errors}")
        if text == self.last:
            return
        self.last = text
        sys.stderr.write(text if sys.stderr.isatty() else text[1:] + "\n")
        sys.stderr.flush()

    def summary(self, interrupted: bool) -> str:
        wall = max((self.t_end or time.monotonic()) - self.t0, 1e-9)
        head = ("interrupted: rerun the same command to resume" if interrupted else
                f"{self.unanswered} lines got no answer (no server): rerun the same command to send them" if
                self.unanswered else "done")
        return (f"{head}: {self.done} lines answered in {wall:.1f} s ({self.errors} errors; {self.skipped} already "
                f"in the output), {self.done / wall:.2f} req/s, {self.audio_s:.0f} s of audio (RTFx "
                f"{self.audio_s / wall:.1f}), tokens {self.prompt_tokens} prompt + {self.completion_tokens} completion, "
                f"{self.retries} retries")


def _clock(s: float) -> str:
    if s == float("inf"):
        return "?"
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class Writer:
    def __init__(self, path: Path):
        self.f = open(path, "a", encoding="utf-8")

    def write(self, obj: dict) -> None:
        self.f.write(json.dumps(obj, ensure_ascii=False) + "\n")  # one whole line, then flushed
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def _line(custom_id: str | None, response: dict | None = None, error: dict | None = None) -> dict:
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id, "response": response, "error": error}


async def send(http, job: Job, base: Path, window: Window, tally: Tally, max_retries: int,
               server_wait_s: float = 0.0) -> dict | None:
    """One line's output, None when no server answered it (never raises)."""
    try:
        if job.url == ENDPOINTS[0]:
            kw = {"json": resolve_chat(job, base)}
        else:
            fields, (name, data) = resolve_transcription(job, base)
            form: dict[str, list[str]] = {}
            for k, v in fields:
                form.setdefault(k, []).append(v)
            kw = {"data": form, "files": {"file": (name, data)}}
    except BadLine as e:
        return _line(job.custom_id, error={"code": e.code, "message": str(e), "line": job.number})
    try:
        return await _post(http, job, kw, window, tally, max_retries, server_wait_s)
    except Exception as e:  # noqa: BLE001 - whatever goes wrong here is this line's error, not the run's end
        return _line(job.custom_id, error={"code": "client_error", "message": f"{type(e).__name__}: {e}",
                                           "line": job.number})


async def _post(http, job: Job, kw: dict, window: Window, tally: Tally, max_retries: int,
                server_wait_s: float = 0.0) -> dict | None:
    """The line's output for the server's answer; None when no answer came from a server after max_retries tries
    and server_wait_s seconds (the line is not final: a rerun sends it)."""
    import httpx

    t0 = time.monotonic()
    attempt = 0
    while True:
        async with window:
            try:
                r = await http.post(job.url, **kw)
            except httpx.TransportError:  # refused, broken, or no response in time: no server answered
                r = None
        if r is not None and r.status_code not in RETRY_STATUS:
            window.ok()
            try:
                body = r.json()
            except ValueError:
                body = r.text
            if isinstance(body, dict) and isinstance(body.get("usage"), dict):
                tally.prompt_tokens += int(body["usage"].get("prompt_tokens") or 0)
                tally.completion_tokens += int(body["usage"].get("completion_tokens") or 0)
            if r.status_code == 200:
                tally.audio_s += job.audio_seconds
            rid = r.headers.get("x-request-id") or uuid.uuid4().hex
            return _line(job.custom_id, {"status_code": r.status_code, "request_id": rid, "body": body})
        window.busy()
        attempt += 1
        if attempt > max_retries and time.monotonic() - t0 >= server_wait_s:
            return None
        tally.retries += 1
        await asyncio.sleep(min(10.0, 0.25 * 2 ** min(attempt, 8)) * (0.5 + random.random()))


async def run(input_path: Path, output: Path, url: str, concurrency: int, max_retries: int,
              api_key: str | None, timeout: float, tally: Tally, server_wait_s: float = 0.0) -> Tally:
    import httpx

    base = input_path.resolve().parent
    done_ids, bad_lines = read_done(output)
    with open(input_path, encoding="utf-8") as f:
        n_lines = sum(1 for raw in f if raw.strip())
    writer = Writer(output)
    window = Window(concurrency)
    pending: set[asyncio.Task] = set()
    seen: set[str] = set()
    tally.t0 = time.monotonic()
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    http = httpx.AsyncClient(base_url=url.rstrip("/"), headers=headers, timeout=timeout, limits=limits)
    tally.total = n_lines - len(done_ids) - len(bad_lines)

    def finish(task: asyncio.Task) -> None:
        pending.discard(task)
        if task.cancelled():
            return
        out = task.result()
        if out is None:  # no server answered it: not final, a rerun sends it
            tally.unanswered += 1
            return
        writer.write(out)
        tally.done += 1
        tally.errors += out["error"] is not None or (out["response"] or {}).get("status_code") != 200
        tally.bar()

    try:
        with open(input_path, encoding="utf-8") as f:
            number = 0
            for raw in f:
                if not raw.strip():
                    continue
                number += 1
                if number in bad_lines:
                    tally.skipped += 1
                    continue
                try:
                    job = parse_line(raw, number)
                    if job.custom_id in seen:
                        raise BadLine(f"custom_id {job.custom_id!r} repeats an earlier line's", "duplicate_custom_id")
                except BadLine as e:
                    finish_line = _line(None, error={"code": e.code, "message": str(e), "line": number})
                    writer.write(finish_line)
                    tally.done += 1
                    tally.errors += 1
                    continue
                seen.add(job.custom_id)
                if job.custom_id in done_ids:
                    tally.skipped += 1
                    continue
                while len(pending) >= 2 * concurrency:  # read ahead only as far as the window can use
                    await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                task = asyncio.ensure_future(send(http, job, base, window, tally, max_retries, server_wait_s))
                pending.add(task)
                task.add_done_callback(finish)
        tally.total = tally.done + tally.unanswered + len(pending)  # bad lines among the first estimate
        while pending:
            await asyncio.wait(pending)
        tally.bar(force=True)
    finally:
        tally.t_end = time.monotonic()
        for t in list(pending):
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        await http.aclose()
        writer.close()
    return tally


# ------------------------------------------------------------------------------------------------ a server for the run


class Served:
    """`af3trt serve --openai-port` for the length of a run, on free loopback ports; stopped by its PID."""

    def __init__(self, repository: Path, start_timeout: float, extra: list[str] = ()):
        from af3trt.runtime.serve.server import free_port

        self.port, self.grpc_port = free_port(), free_port()
        self.log = Path(tempfile.mkdtemp(prefix="af3trt-batch-")) / "serve.log"
        cmd = [sys.executable, "-m", "af3trt.runtime.serve.server", "--model-repository", str(repository),
               "--grpc-port", str(self.grpc_port), "--http-port", str(free_port()), "--metrics-port",
               str(free_port()), "--openai-port", str(self.port), "--start-timeout", str(start_timeout), *extra]
        with open(self.log, "wb") as logf:
            self.proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}"
        self.wait(start_timeout + 60)

    def wait(self, timeout: float) -> None:
        from af3trt.runtime.serve.server import wait_healthy

        why = wait_healthy(self.url + "/health", self.proc, timeout, interval=0.5)
        if why == "exited":
            raise SystemExit(f"af3trt serve exited ({self.proc.returncode}); log {self.log}:\n"
                             f"{self.log.read_text(errors='replace')[-3000:]}")
        if why:
            self.stop()
            raise SystemExit(f"af3trt serve not ready after {timeout:.0f} s; log {self.log}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # drains, then stops tritonserver and the front
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="af3trt batch", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input", type=Path, help="requests, one JSON line each (OpenAI batch input format)")
    ap.add_argument("output", type=Path, help="answers, one JSON line each; an existing file is resumed")
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="the OpenAI-compatible front, e.g. http://127.0.0.1:9000")
    where.add_argument("--model-repository", type=Path, help="start `af3trt serve` on this repository for the run")
    ap.add_argument("--concurrency", type=int, default=16, help="most requests in flight (halved while busy)")
    ap.add_argument("--max-retries", type=int, default=10,
                    help="tries at least after a busy answer or no answer (refused or broken connection)")
    ap.add_argument("--server-wait-s", type=float, default=600.0,
                    help="keep retrying a line that no server answers for at least this long (a server restarting "
                         "answers it in the same run); after that it is left for a rerun, not written")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds one request may take")
    ap.add_argument("--api-key-env", default=None, metavar="VAR", help="send the key in this environment variable")
    ap.add_argument("--start-timeout", type=float, default=300.0)
    args = ap.parse_args(argv)
    if not args.input.is_file():
        ap.error(f"{args.input}: no such file")
    key = os.environ.get(args.api_key_env) if args.api_key_env else None
    served = Served(args.model_repository.resolve(), args.start_timeout) if args.model_repository else None
    url = served.url if served else args.url
    url = url if url.startswith("http") else f"http://{url}"
    interrupted, tally = False, Tally(total=0)
    try:
        asyncio.run(run(args.input, args.output, url, args.concurrency, args.max_retries, key, args.timeout, tally,
                        args.server_wait_s))
    except KeyboardInterrupt:
        interrupted = True
    finally:
        if served:
            served.stop()
    print("\n" + tally.summary(interrupted), file=sys.stderr)
    return 130 if interrupted else EX_TEMPFAIL if tally.unanswered else 0


if __name__ == "__main__":
    raise SystemExit(main())
