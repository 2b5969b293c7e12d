"""`af3trt bench --serving-path`: the CPU the serving path spends per request and per streamed token, the model's own
cost taken out.

    af3trt bench --serving-path --out perf/results/latest          # tiny checkpoint, stand-ins at 300 tokens/s

A CPU repository is built with `--stand-in-tokens-per-s R` (runtime/engines/stand_in.py: the encoder returns zeros, the
decoder makes deterministic tokens at R per second per request, in-flight batched, never an end id), served by the
real tritonserver with the real preprocess, fusion and postprocess, and the real OpenAI front in front of it. Loads:
gRPC streamed, gRPC not streamed (our client, perf/loadgen.py) and OpenAI streamed chat completions (httpx), each at
max_tokens 1 and max_tokens T, in interleaved rounds. CPU time per process is read from /proc/<pid>/stat (utime +
stime) around each load: tritonserver, each python-backend stub (by the model its command line names) and the
OpenAI front. With n requests per load, the linear model cpu = n * (per_request + tokens * per_token) gives

    per_token   = (cpu(T) - cpu(1)) / (n * (T - 1))        per_request = cpu(1) / n - per_token

per process, as medians of the rounds with their min-max. "Serving path" sums tritonserver, preprocess, fusion,
postprocess (and the OpenAI front for HTTP): what runs on CPUs on the GPU target too. The encoder and decoder stubs
are listed apart (stand-ins here; on the GPU target TensorRT and the tensorrtllm backend, which runs inside
tritonserver). One core of serving path sustains 1000 / per_token_ms tokens/s and 1000 / per_request_ms requests/s.
AIPerf (NVIDIA's client, `aiperf profile`) runs against the OpenAI front with ignore_eos beside our loads.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import logging
import shutil
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path


from af3trt.build.tables import BLANK, Column, Text, markdown_table
from af3trt.perf import clips as clipgen
from af3trt.perf import machine
from af3trt.perf.loadgen import run_load
from af3trt.runtime.host.proc import cpu_seconds, stub_names

log = logging.getLogger("af3trt.bench.serving_path")

REPO_ROOT = Path(__file__).resolve().parent.parent
# on CPUs on the GPU target too (the decoder front: builds with it, the GPU target's ensemble shape)
SERVING_PATH = ("tritonserver", "preprocess", "fusion", "decoder_front", "postprocess")
PROMPT = "What is said in the audio?"
LOAD_TIMEOUT_S = 300.0  # a request's gRPC deadline: a server that died fails the load instead of hanging it


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="af3trt bench --serving-path", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--serving-path", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help="results directory (default perf/results/<UTC stamp>)")
    ap.add_argument("--work", type=Path, help="checkpoint and build cache (default ~/.cache/af3trt/bench)")
    ap.add_argument("--preset", default="tiny", help="synthetic checkpoint preset (af3trt.export.synth)")
    # docs/gpu_projection.md: AF3 in FP8 on an H100 at batch 64 makes about 20,225 tokens/s, ~316 per request
    ap.add_argument("--tokens-per-s", type=float, default=300.0,
                    help="stand-in decoder steps per second (tokens per second per request; default: about an "
                         "H100's per request at batch 64, docs/gpu_projection.md)")
    ap.add_argument("--stream-interval-ms", default="50",
                    help="builds measured side by side, by their stream interval, e.g. 0,50 (streamed tokens faster "
                         "than one per this many ms share a response; 0: one response per token, as before "
                         "coalescing: at 300 tokens/s its tritonserver 2.51 aborted twice here, docs/performance.md); "
                         "front:N is the GPU target's shape, the decoder front coalescing at N ms in front of a "
                         "decoder that sends one response per token (0 alone is that shape without the front)")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--requests", type=int, default=64,
                    help="requests per load (CPU time is read in 10-ms clock ticks: 64 requests resolve 0.16 ms per "
                         "request per process)")
    ap.add_argument("--max-tokens", type=int, default=128, help="T: tokens per request of the long loads")
    ap.add_argument("--clip-seconds", type=float, default=8.0)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians and min-max over them)")
    ap.add_argument("--clips", choices=("new", "repeated"), default="new",
                    help="new: every request sends a clip never sent before (the clip with one sample changed), so "
                         "preprocess decodes it and computes its log-mel, as for new audio; repeated: one clip for "
                         "all, answered from preprocess's audio cache after its first request")
    ap.add_argument("--modes", default="grpc-stream,grpc,openai-stream", help="loads: grpc-stream, grpc, "
                                                                             "openai-stream, openai")
    ap.add_argument("--tiny-rounds", type=int, default=5,
                    help="rounds of the real-model check: streamed against non-streamed throughput on the real "
                         "checkpoint (no stand-ins), --tiny-requests of --tiny-tokens at --concurrency (0: skip)")
    ap.add_argument("--tiny-requests", type=int, default=16)
    ap.add_argument("--tiny-tokens", type=int, default=400)
    ap.add_argument("--aiperf-requests", type=int, default=32, help="AIPerf's streamed requests (0: skip AIPerf)")
    ap.add_argument("-v", "--verbose", action="store_true")
    return ap.parse_args(argv)


# ------------------------------------------------------------------------------------------------ processes

def serving_processes(server_pid: int, front_pid: int | None) -> dict[str, int]:
    """{name: pid}: tritonserver, its python-backend stubs by model (runtime/host/proc.py stub_names: a second
    instance of a model is 'model#2'), and the OpenAI front."""
    procs = {"tritonserver": server_pid, **stub_names(server_pid)}
    if front_pid:
        procs["openai"] = front_pid
    return procs


def snapshot(procs: dict[str, int]) -> dict[str, float]:
    """{name: CPU seconds}; ProcessLookupError (an OSError) when one of them is gone."""
    return {name: cpu_seconds(pid) for name, pid in procs.items()}


# ------------------------------------------------------------------------------------------------ loads

def wav_b64(clip: bytes) -> str:
    import soundfile as sf

    wave, rate = sf.read(io.BytesIO(clip), dtype="float32")
    buf = io.BytesIO()
    sf.write(buf, wave, rate, format="WAV", subtype="PCM_16")
    return base64.b64encode(buf.getvalue()).decode()


class ClipSource:
    """The clips of each load: with `new`, every request gets one never sent before (the same speech with one sample
    changed, so decoding and log-mel cost the same and no cache recognises it); with `repeated`, the one clip."""

    def __init__(self, clip: bytes, new: bool):
        import soundfile as sf

        self.clip, self.new, self.sent = clip, new, 0
        self.wave, _ = sf.read(io.BytesIO(clip), dtype="float32")
        self.b64 = wav_b64(clip)

    def take(self, n: int, wav: bool) -> list:
        """n clips (FLAC bytes) or, with wav, n base64 WAV strings (what the OpenAI loads send)."""
        if not self.new:
            return [self.b64 if wav else self.clip]
        out = []
        for _ in range(n):
            self.sent += 1
            wave = self.wave.copy()
            k = self.sent % len(wave)
            wave[k] = 0.5 if wave[k] < 0 else -0.5  # one sample: a new digest, the same decoding and log-mel work
            data = clipgen.flac_bytes(wave)
            out.append(wav_b64(data) if wav else data)
        return out


def openai_load(url: str, model: str, audio_b64: str | list[str], *, concurrency: int, requests: int, max_tokens: int,
                stream: bool) -> tuple[int, int, float]:
    """`requests` chat completions (`concurrency` at once), cycling over WAV clips: (answered, completion tokens,
    wall s)."""
    import httpx

    clips = [audio_b64] if isinstance(audio_b64, str) else audio_b64
    lock, counts = threading.Lock(), [0, 0]

    def one(i):
        body = {"model": model, "max_tokens": max_tokens, "stream": stream, "ignore_eos": True,
                **({"stream_options": {"include_usage": True}} if stream else {}),
                "messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {
                    "data": clips[i % len(clips)], "format": "wav"}}, {"type": "text", "text": PROMPT}]}]}
        with httpx.Client(timeout=LOAD_TIMEOUT_S) as c:
            tokens = 0
            if stream:
                with c.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
                    r.raise_for_status()
                    for line in r.iter_lines():
                        if line.startswith("data: {") and '"usage"' in line:
                            usage = json.loads(line[6:]).get("usage")
                            tokens = usage["completion_tokens"] if usage else tokens
            else:
                r = c.post(f"{url}/v1/chat/completions", json=body)
                r.raise_for_status()
                tokens = r.json()["usage"]["completion_tokens"]
        with lock:
            counts[0] += 1
            counts[1] += tokens

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(requests)))
    return counts[0], counts[1], time.perf_counter() - t0


def run_one(mode: str, grpc_url: str, http_url: str, clips: ClipSource, args, max_tokens: int, requests: int | None = None
            ) -> tuple[int, int, float]:
    """One load: (answered requests, generated tokens, wall seconds)."""
    api, _, streamed = mode.partition("-")
    requests = requests or args.requests
    if api == "grpc":
        inputs = [(PROMPT, c) for c in clips.take(requests, wav=False)]
        records, wall = run_load(grpc_url, inputs, concurrency=args.concurrency, requests=requests,
                                 max_tokens=max_tokens, stream=bool(streamed), ignore_eos=True, timeout=LOAD_TIMEOUT_S)
        errors = [r.error for r in records if not r.ok]
        if errors:
            raise RuntimeError(f"{mode}: {len(errors)} requests failed, e.g. {errors[0]}")
        return len(records), sum(r.tokens for r in records), wall
    return openai_load(http_url, "af3", clips.take(requests, wav=True), concurrency=args.concurrency,
                       requests=requests, max_tokens=max_tokens, stream=bool(streamed))


def per_process(short: dict[str, float], long: dict[str, float], n: int, tokens: int) -> dict[str, dict]:
    """The linear model's per-request and per-token CPU ms of each process from a 1-token and a T-token load of n
    requests each (`tokens`: generated tokens of the long load)."""
    out = {}
    extra = tokens - n  # tokens beyond the one each request of the short load had
    for name in long:
        per_token = (long[name] - short[name]) / extra if extra > 0 else 0.0
        out[name] = {"ms_per_request": 1000 * (short[name] / n - per_token), "ms_per_token": 1000 * per_token}
    return out


def summarize(rounds: list[dict[str, dict]], front: bool) -> dict:
    names = list(rounds[0])
    table = {}
    for name in names + ["serving_path"]:
        row = {}
        for key in ("ms_per_request", "ms_per_token"):
            vals = [sum(r[p][key] for p in SERVING_PATH + (("openai",) if front else ()) if p in r)
                    if name == "serving_path" else r[name][key] for r in rounds]
            row[key] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "runs": vals}
        table[name] = row
    sp = table["serving_path"]
    table["per_core"] = {k: 1000 / ms if ms > 0 else None for k, ms in (
        ("tokens_per_s", sp["ms_per_token"]["median"]), ("requests_per_s", sp["ms_per_request"]["median"]))}
    return table


# ------------------------------------------------------------------------------------------------ setup

def variant(name: str | int) -> tuple[int, bool]:
    """A --stream-interval-ms entry: (interval ms, with the decoder front) from "50" or "front:50"."""
    front, _, ms = str(name).strip().rpartition(":")
    if front not in ("", "front"):
        raise ValueError(f"a build is N or front:N, got {name!r}")
    return int(ms), front == "front"


def label(name: str | int) -> str:
    ms, front = variant(name)
    return f"front {ms} ms" if front else f"{ms} ms"


def build_stand_in(ckpt: Path, work: Path, args, tokens_per_s: float, build_name: str) -> Path:
    """The CPU build the loads run on: stand-ins at tokens_per_s (0: the checkpoint's real models); build_name: a
    --stream-interval-ms entry (variant)."""
    from af3trt.build.build_engines import BuildOptions, ServingConfig, build
    from af3trt.perf.bench import source_digest

    stream_interval_ms, front = variant(build_name)
    out = work / f"repo-{args.preset}-stand-in-{tokens_per_s:g}-interval-{stream_interval_ms}{'-front' if front else ''}"
    opts = BuildOptions(hf_model=ckpt, out=out, force=True, stand_in_tokens_per_s=tokens_per_s,
                        decoder_front=front and tokens_per_s > 0,
                        serving=ServingConfig(stream_interval_ms=stream_interval_ms,
                                              max_batch_size=max(args.concurrency, 1),
                                              max_output_len=max(args.max_tokens, args.tiny_tokens, 8),
                                              max_queue_size=0, queue_timeout_ms=0))
    key = {k: str(v) for k, v in asdict(opts).items() if k not in ("out", "force")}
    key["sources"] = source_digest()
    stamp = out / "bench_build.json"
    if not (stamp.exists() and json.loads(stamp.read_text()) == key):
        build(opts)
        stamp.write_text(json.dumps(key, indent=1))
    return out


class OpenAIFront:
    """`af3trt openai` on a free loopback port, stopped by its PID."""

    def __init__(self, grpc_url: str, log_path: Path):
        from af3trt.runtime.serve.server import free_port, wait_healthy

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        with open(log_path, "wb") as f:
            self.proc = subprocess.Popen([sys.executable, "-m", "af3trt.runtime.openai.app", "--triton", grpc_url,
                                          "--port", str(self.port)], stdout=f, stderr=subprocess.STDOUT)
        why = wait_healthy(self.url + "/health", self.proc, 120)
        if why == "exited":
            raise RuntimeError(f"af3trt openai exited: see {log_path}")
        if why:
            self.stop()
            raise TimeoutError("af3trt openai not ready after 120 s")

    def stop(self) -> None:
        from af3trt.runtime.serve.server import stop_process

        stop_process(self.proc)


def run_aiperf(http_url: str, tokenizer: Path, out: Path, *, concurrency: int, requests: int, max_tokens: int,
               clip_seconds: float, api_key: str | None = None, timeout: float = 900) -> dict:
    """`aiperf profile` against the OpenAI front: streamed chat, one synthetic WAV clip per request, fixed output
    length through `--extra-inputs ignore_eos:true` (its advice for fixed-length runs). Returns its summary."""
    # the `aiperf` extra's own venv (scripts/setup.sh: .venv/aiperf; its pins clash with the project's), else PATH
    own = Path(sys.prefix) / "aiperf" / "bin" / "aiperf"
    exe = str(own) if own.exists() else shutil.which("aiperf") or str(Path(sys.executable).parent / "aiperf")
    artifacts = out / "aiperf"
    cmd = [exe, "profile", "--model", "af3", "--url", http_url, "--endpoint-type", "chat", "--streaming",
           "--concurrency", str(concurrency), "--request-count", str(requests), "--tokenizer", str(tokenizer),
           "--audio-batch-size", "1", "--audio-length-mean", f"{clip_seconds:g}", "--audio-format", "wav",
           "--synthetic-input-tokens-mean", "16", "--output-tokens-mean", str(max_tokens),
           "--extra-inputs", "ignore_eos:true", "--artifact-dir", str(artifacts), "--ui-type", "none",
           *(["--api-key", api_key] if api_key else [])]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    (out / "aiperf.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"aiperf exited {proc.returncode}; see {out / 'aiperf.log'}")
    exports = sorted(artifacts.rglob("profile_export_aiperf.json"))
    if not exports:
        raise RuntimeError(f"aiperf wrote no profile_export_aiperf.json under {artifacts}")
    doc = json.loads(exports[-1].read_text())
    shown = [("<api key>" if api_key and c == api_key else c) for c in cmd[1:]]
    return {"command": " ".join(shown), "wall_s": time.perf_counter() - t0, "export": str(exports[-1]),
            "metrics": {k: doc[k] for k in ("request_throughput", "output_token_throughput", "time_to_first_token",
                                            "inter_token_latency", "request_count", "output_sequence_length",
                                            "error_request_count") if k in doc}}


def log_mel_cpu_ms(clip: bytes, runs: int = 20) -> float:
    """CPU ms of the clip's log-mel alone (one torch thread, as the preprocess stub runs it): part of preprocess's
    per-request cost on the CPU target, done on the device on the GPU target (af3trt.kernels.logmel)."""
    import torch

    from af3trt.runtime.stages import audio

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        chunks, _ = audio.split_windows(audio.decode_clip(clip, None).wave)
        frames = audio.request_frames(chunks)
        audio.log_mel(chunks, frames)
        times = []
        for _ in range(runs):
            t0 = time.process_time()
            audio.log_mel(chunks, frames)
            times.append(1000 * (time.process_time() - t0))
        return statistics.median(times)
    finally:
        torch.set_num_threads(threads)


def stream_against_whole(servers: dict, clip: bytes, args) -> dict:
    """The real checkpoint (no stand-ins), per build (by stream interval): tokens/s of --tiny-requests fixed-length
    requests streamed and not, in interleaved rounds. servers: {interval: TritonServer}."""
    runs = {iv: {"stream": [], "whole": []} for iv in servers}
    for srv in servers.values():  # warm-up
        run_load(srv.grpc_url, [(PROMPT, clip)], concurrency=args.concurrency, requests=2, max_tokens=4, stream=True)
    for k in range(args.tiny_rounds):
        for mode in ("stream", "whole") if k % 2 == 0 else ("whole", "stream"):  # neither always goes first
            for iv, srv in servers.items():
                records, wall = run_load(srv.grpc_url, [(PROMPT, clip)], concurrency=args.concurrency,
                                         requests=args.tiny_requests, max_tokens=args.tiny_tokens,
                                         stream=mode == "stream", ignore_eos=True, timeout=LOAD_TIMEOUT_S)
                bad = [r.error for r in records if not r.ok]
                if bad:
                    raise RuntimeError(f"real model, {mode}: {len(bad)} requests failed, e.g. {bad[0]}")
                runs[iv][mode].append(sum(r.tokens for r in records) / wall)
    out = {}
    for iv, r in runs.items():
        ratio = [s / w for s, w in zip(r["stream"], r["whole"])]
        out[iv] = {"tokens_per_s": r, "stream_over_whole": ratio, "median_ratio": statistics.median(ratio)}
    return out


def run_perf_analyzer_beside(grpc_url: str, clip: bytes, out: Path, *, concurrency: int, requests: int,
                             max_tokens: int) -> dict:
    """perf_analyzer against gRPC with the same shape as the AIPerf run (streamed, fixed length: ignore_eos)."""
    from af3trt.perf.analyzer import find_perf_analyzer, run_perf_analyzer, write_input_data
    from af3trt.perf.metrics import summarize as point

    data = write_input_data(out / "perf_analyzer_input.json", [(PROMPT, clip)], max_tokens=max_tokens, stream=True,
                            ignore_eos=True)
    (row,) = run_perf_analyzer(find_perf_analyzer(), grpc_url, data, concurrency=[concurrency], streaming=True,
                               requests_per_level=requests, rounds_per_level=1, out_dir=out / "perf_analyzer",
                               profile_export=True)
    return point(row["records"], row.get("window_s"))


# ------------------------------------------------------------------------------------------------ report

def fmt(cell: dict) -> str:
    return f"{cell['median']:.3f} [{cell['min']:.3f}–{cell['max']:.3f}]"


def _spread(vals: list[float]) -> str:
    return f"{statistics.median(vals):.0f} [{min(vals):.0f}–{max(vals):.0f}]"


# serving_path.md's tables (build/tables.py writes them), over the records of results["runs"] and ["real_model"]
LOADS = [Column("stream interval", "interval", lambda iv: label(str(iv))), Column("load", "mode"),
         Column("serving path ms / token", ("serving_path", "ms_per_token"), fmt),
         Column("serving path ms / request", ("serving_path", "ms_per_request"), fmt),
         Column("ms / request without log-mel (GPU target)", "without_log_mel", fmt),
         Column("tokens/s of one core", ("per_core", "tokens_per_s"), "{:.0f}"),
         Column("T-token loads, tokens/s", "throughput",
                lambda thr: f"{statistics.median(thr):.0f} ({', '.join(f'{t:.0f}' for t in thr)})")]
STREAMED = [Column("stream interval", "interval", lambda iv: label(str(iv))),
            Column("streamed tokens/s", ("tokens_per_s", "stream"), _spread),
            Column("non-streamed tokens/s", ("tokens_per_s", "whole"), _spread),
            Column("streamed / non-streamed, per round", lambda r: f"{r['median_ratio']:.2f} "
                   f"[{min(r['stream_over_whole']):.2f}–{max(r['stream_over_whole']):.2f}]")]
PROCESSES = [Column("process", lambda r: f"**{r['name']}**" if r["name"] == "serving_path" else r["name"]),
             Column("ms CPU / request", "ms_per_request", fmt), Column("ms CPU / token", "ms_per_token", fmt)]


def write_report(results: dict, out: Path) -> None:
    (out / "serving_path.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "serving_path.md").write_text(render(results))


def render(results: dict) -> str:
    """serving_path.md of a serving_path.json record."""
    a, runs = results["args"], results["runs"]
    lines = [f"# Serving path: CPU per request and per streamed token (stand-ins at {a['tokens_per_s']:g} tokens/s per "
             f"request)", "",
             f"`af3trt bench --serving-path`, {results['started_utc']}; {a['rounds']} rounds of {a['requests']} "
             f"requests at concurrency {a['concurrency']}, {a['clip_seconds']:g}-s clip, max_tokens 1 and "
             f"{a['max_tokens']} (ignore_eos), the builds (by stream interval) interleaved round by round; load "
             f"average at start {results['load_average_start']}. CPU ms from /proc/<pid>/stat: medians [min–max] over "
             f"the rounds. Serving path = {' + '.join(SERVING_PATH)} (+ the OpenAI front for HTTP).", "",
             f"Clips: {a.get('clips', 'repeated')} ({'each request sends a clip never sent before: preprocess decodes it and computes its log-mel' if a.get('clips') == 'new' else 'one clip for all: after the first request preprocess answers from its audio cache'}). "
             f"Per request without log-mel: the serving path less the clip's log-mel measured apart (below), what "
             f"stays on CPUs on the GPU target, where the log-mel runs on the device.", "",
             *_loads_table(results)]
    lm = results.get("log_mel_cpu_ms")
    if lm is not None:
        lines += ["", f"Of preprocess's per-request CPU, the clip's log-mel alone takes {lm:.2f} ms (measured apart, "
                      f"one thread); on the GPU target it runs on the device (af3trt.kernels)."]
    if "real_model" in results:
        lines += ["", f"## Real {a['preset']} checkpoint: streamed against non-streamed", "",
                  f"{a['tiny_requests']} requests of {a['tiny_tokens']} tokens at concurrency {a['concurrency']} "
                  f"(ignore_eos), {a['tiny_rounds']} rounds, streamed and non-streamed loads and the builds "
                  f"interleaved within each round, our gRPC client; medians [min–max].", "",
                  *markdown_table(STREAMED, [{"interval": iv, **rm} for iv, rm in results["real_model"].items()])]
    for iv, run in runs.items():
        for mode, table in run["modes"].items():
            lines += ["", f"## Per process: {mode}, stream interval {label(str(iv))}", "",
                      *markdown_table(PROCESSES, [{"name": k, **v} for k, v in table.items() if k != "per_core"])]
    lines += _aiperf_lines(results.get("aiperf"), list(runs)[-1] if runs else None)
    lines += _perf_analyzer_lines(results.get("perf_analyzer"))
    return "\n".join(lines) + "\n"


def _loads_table(results: dict) -> list[str]:
    """One row per build (stream interval) and load; a failed build's row says where it failed."""
    a, lm = results["args"], results.get("log_mel_cpu_ms")
    rows = []
    for iv, run in results["runs"].items():
        for mode, table in run["modes"].items():
            without = None if lm is None or a.get("clips") != "new" else \
                {k: v - lm for k, v in table["serving_path"]["ms_per_request"].items() if k != "runs"}
            rows.append({"interval": iv, "mode": mode, **table, "without_log_mel": without,
                         "throughput": run["throughput"][mode]})
    rows += [{"interval": iv, "mode": "failed", "serving_path": {"ms_per_token": Text(run["failed"][:300]),
                                                                 "ms_per_request": BLANK}, "without_log_mel": BLANK,
              "per_core": {"tokens_per_s": BLANK}, "throughput": BLANK}
             for iv, run in results["runs"].items() if "failed" in run]
    return markdown_table(LOADS, rows)


def _aiperf_lines(aiperf: dict | None, interval) -> list[str]:
    if aiperf is None:
        return []
    lines = ["", "## AIPerf against the OpenAI front (streamed chat, ignore_eos)", ""]
    m = aiperf.get("metrics")
    if m is None:
        return lines + [f"failed: {aiperf.get('error')}"]

    def stat(key, field="avg"):
        v = m.get(key, {}).get(field)
        return "n/a" if v is None else f"{v:.1f} {m[key].get('unit', '')}"

    return lines + [f"`aiperf {aiperf['command']}` (the stream interval {label(str(interval))} build)", "",
                    f"requests {stat('request_count')}, request throughput {stat('request_throughput')}, output "
                    f"tokens {stat('output_token_throughput')}, TTFT p50 {stat('time_to_first_token', 'p50')}, "
                    f"inter-token latency p50 {stat('inter_token_latency', 'p50')}, output length (AIPerf's own "
                    f"tokenizer count of the text) {stat('output_sequence_length')}."]


def _perf_analyzer_lines(pa: dict | None) -> list[str]:
    if pa is None:
        return []
    return ["", "## perf_analyzer against gRPC, beside it (same build, streamed, ignore_eos)", "",
            f"requests {pa.get('requests')} ({pa.get('errors')} failed), request throughput "
            f"{pa.get('throughput_rps', 0):.1f} requests/sec, output tokens {pa.get('output_tokens_per_s', 0):.1f} "
            f"tokens/sec, TTFT p50 {(pa.get('ttft_ms') or {}).get('p50') or 0:.1f} ms, tokens per request "
            f"{pa.get('tokens_per_request', 0):.1f}."]


def measure(servers: dict[int, tuple], clips: ClipSource, args) -> dict[int, dict]:
    """Interleaved rounds over the builds (by stream interval) and the loads: per build, each load's per-process
    table and its T-token loads' wall throughput. servers: {interval: (TritonServer, OpenAIFront)}."""
    modes = [m for m in args.modes.split(",") if m]
    procs = {iv: serving_processes(srv.proc.pid, front.proc.pid) for iv, (srv, front) in servers.items()}
    for iv, (srv, front) in servers.items():
        log.info("%s: processes %s", label(iv), procs[iv])
        for mode in modes:  # warm-up: first requests load lazily imported code
            run_one(mode, srv.grpc_url, front.url, clips, args, 4, requests=4)
    per_round = {iv: {m: [] for m in modes} for iv in servers}
    throughput = {iv: {m: [] for m in modes} for iv in servers}
    failed: dict[int, str] = {}  # a build whose load failed (its server died or wedged) leaves the later rounds
    for k in range(args.rounds):
        for mode in modes:
            for iv, (srv, front) in servers.items():
                if iv in failed:
                    continue
                cpu = {}
                try:
                    for t in (1, args.max_tokens):
                        before = snapshot(procs[iv])
                        n, tokens, wall = run_one(mode, srv.grpc_url, front.url, clips, args, t)
                        after = snapshot(procs[iv])
                        cpu[t] = ({p: after[p] - before[p] for p in procs[iv]}, n, tokens)
                        if t == args.max_tokens:
                            throughput[iv][mode].append(tokens / wall)
                except (RuntimeError, OSError) as e:  # OSError: /proc of a process that exited
                    failed[iv] = f"round {k + 1}, {mode}: {e}"
                    log.warning("%s failed: %s", label(iv), failed[iv])
                    continue
                (short, n, _), (long_, _, tokens) = cpu[1], cpu[args.max_tokens]
                per_round[iv][mode].append(per_process(short, long_, n, tokens))
                log.info("round %d %s, %s: serving path %.3f ms/token", k + 1, mode, label(iv),
                         sum(per_round[iv][mode][-1][p]["ms_per_token"] for p in SERVING_PATH
                             if p in per_round[iv][mode][-1]))
    return {iv: {"processes": procs[iv], "throughput": throughput[iv],
                 "modes": {m: summarize(per_round[iv][m], m.startswith("openai")) for m in modes if per_round[iv][m]},
                 **({"failed": failed[iv]} if iv in failed else {})}
            for iv in servers}


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    from contextlib import ExitStack

    from af3trt.perf.bench import prepare_checkpoint
    from af3trt.runtime.serve.server import TritonServer
    from af3trt.runtime.serve.triton_install import CACHE

    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = (args.out or REPO_ROOT / "perf" / "results" / stamp).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = (args.work or CACHE / "bench").resolve()
    work.mkdir(parents=True, exist_ok=True)
    args.hf_model, args.repo, args.thinking_requests = None, None, 0  # prepare_checkpoint's: the synthetic preset
    ckpt = prepare_checkpoint(args, work)
    intervals = [x.strip() for x in str(args.stream_interval_ms).split(",") if x.strip()]
    for x in intervals:
        variant(x)
    clip = clipgen.make_clip(clipgen.ClipSpec("speech", args.clip_seconds))
    results = {"af3trt_bench_serving_path": 1, "started_utc": stamp, "machine": machine.describe(REPO_ROOT),
               "load_average_start": machine.load_average(),
               "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}

    def serve(stack: ExitStack, tokens_per_s: float, iv: str, front: bool):
        repo = build_stand_in(ckpt, work, args, tokens_per_s, iv)
        name = f"{'stand-in' if tokens_per_s else 'real'}-{label(iv).replace(' ', '')}"
        srv = stack.enter_context(TritonServer(repo / "model_repository", log_path=out / f"tritonserver-{name}.log",
                                               exit_timeout=3).start(timeout=600))
        if not front:
            return repo, srv, None
        http = OpenAIFront(srv.grpc_url, out / f"openai-{name}.log")
        stack.callback(http.stop)
        return repo, srv, http

    with ExitStack() as stack:
        started = {iv: serve(stack, args.tokens_per_s, iv, True) for iv in intervals}
        results["runs"] = measure({iv: (srv, http) for iv, (_, srv, http) in started.items()},
                                  ClipSource(clip, args.clips == "new"), args)
        if args.aiperf_requests:  # against the last build (the default interval)
            repo, _, http = started[intervals[-1]]
            try:
                results["aiperf"] = run_aiperf(http.url, repo / "artifacts" / "lm", out,
                                               concurrency=min(args.concurrency, args.aiperf_requests),
                                               requests=args.aiperf_requests, max_tokens=args.max_tokens,
                                               clip_seconds=args.clip_seconds)
            except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
                results["aiperf"] = {"error": str(e)}
            results["perf_analyzer"] = run_perf_analyzer_beside(
                started[intervals[-1]][1].grpc_url, clip, out, concurrency=min(args.concurrency, args.aiperf_requests),
                requests=args.aiperf_requests, max_tokens=args.max_tokens)
    results["log_mel_cpu_ms"] = log_mel_cpu_ms(clip)
    if args.tiny_rounds:
        with ExitStack() as stack:
            real = {iv: serve(stack, 0.0, iv, False)[1] for iv in intervals}
            results["real_model"] = stream_against_whole(real, clip, args)
    write_report(results, out)
    print((out / "serving_path.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
