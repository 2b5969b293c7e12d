"""`af3trt soak`: hold the server under steady load and measure errors and memory per request, per process.

    af3trt soak --model-repository out/af3-tiny/model_repository --requests 100000 --client per-connection
    af3trt soak --model-repository … --minutes 10 --concurrency 16 --client reused --out perf/results/soak
    af3trt soak --url 127.0.0.1:8001 --server-pid PID --watch haproxy=PID2 …   # a server (and proxy) you started
    af3trt soak --chaos --model-repository … --minutes 30    # every request kind under random kills (perf/chaos.py)
    af3trt soak --heal --model-repository …                  # start and heal times per stage (perf/heal.py)

Client modes (--client): `reused` — one AF3Client for all workers, every request a stream of one connection (what
af3trt's clients and the OpenAI front do); `per-connection` — a new connection for every request, closed after it once
the request's stream has ended with the server's status (a connect-per-request client written as docs/memory.md says);
`legacy` — AF3Client before issue 19: a tritonclient client and stream per request, stopped with
stop_stream(cancel_requests=True) after the last response, which cancels the finished stream (a client that hangs up
early: tritonserver 2.51 keeps 13-22 KB for each such stream; docs/memory.md compares them).

Closed loop: `concurrency` clients send requests back to back, each with one speech clip of 1–8 s (--clip-seconds;
drawn with a fixed seed) and a short prompt, alternately streaming and not. Every `--sample-s` seconds the RSS of
every server process (tritonserver and each python stub, named by its model) is recorded. The report gives requests,
errors (by message), latency percentiles, throughput, the RSS series, and **bytes per request per process**: the slope
of a least-squares line through (requests done, RSS) over the samples after warm-up (the first --warmup-share of the
requests: allocator pools, torch and ONNX Runtime caches, gRPC state pools fill there), and the same over the second
half alone. A leak is a slope that stays; warm-up is a step before the fitted window. The run ends after --requests
requests or --minutes minutes, whichever comes first.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

from af3trt.build.tables import Column, markdown_table
from af3trt.perf import clips
from af3trt.perf.loadgen import one_request, record
from af3trt.perf.metrics import RequestRecord, summarize
from af3trt.runtime.client.library import AF3Client, AF3Stream, Request
from af3trt.runtime.host.proc import rss_mb, stub_names

PROMPTS = ("What is said?", "Transcribe the audio.", "Describe the sound.", "Who is speaking, and about what?")


def process_tree_rss(server_pid: int) -> dict[str, float]:
    """{name: RSS MB} of tritonserver and its python stubs (named by model: runtime/host/proc.py stub_names)."""
    return {"tritonserver": rss_mb(server_pid), **{name: rss_mb(pid) for name, pid in stub_names(server_pid).items()}}


def make_clips(n: int = 8, seed: int = 0, seconds: tuple[float, float] = (1.0, 8.0)) -> list[bytes]:
    """n speech clips of seconds[0]..seconds[1] s (FLAC bytes)."""
    rng = np.random.default_rng(seed)
    return [clips.flac_bytes(clips.make_wave(clips.ClipSpec("speech", float(rng.uniform(*seconds))), seed=k))
            for k in range(n)]


def parse_seconds(text: str) -> tuple[float, float]:
    """'1-8' → (1.0, 8.0); '0.5' → (0.5, 0.5)."""
    lo, _, hi = text.partition("-")
    lo_s, hi_s = float(lo), float(hi or lo)
    if not 0 < lo_s <= hi_s:
        raise ValueError(f"clip seconds must be LO-HI with 0 < LO <= HI, got {text!r}")
    return lo_s, hi_s


CLIENT_MODES = ("reused", "per-connection", "legacy")


def soak(url: str, server_pid: int, *, minutes: float, concurrency: int, max_tokens: int = 32,
         sample_s: float = 10.0, settle_min: float = 2.0, seed: int = 0, requests: int | None = None,
         client_mode: str = "reused", warmup_share: float = 0.2, watch: dict[str, int] | None = None,
         clip_seconds: tuple[float, float] = (1.0, 8.0), stuck_s: float = 120.0, log=print) -> dict:
    if client_mode not in CLIENT_MODES:
        raise ValueError(f"client_mode must be one of {CLIENT_MODES}")
    audio = make_clips(seed=seed, seconds=clip_seconds)
    shared = AF3Client(url, timeout=600)
    records: list[tuple[float, RequestRecord]] = []
    issued = iter(range(requests)) if requests else None
    lock = threading.Lock()
    t0 = time.monotonic()
    end = t0 + minutes * 60
    series: list[dict] = []
    busy: dict[int, float | None] = {}  # worker → when its request in progress began (None between requests)
    exhausted = threading.Event()  # every one of `requests` was issued

    def worker(k: int) -> None:
        rng = np.random.default_rng(seed * 1000 + k)
        n = 0
        while time.monotonic() < end:
            if issued is not None and next(issued, None) is None:
                exhausted.set()
                break
            busy[k] = time.monotonic()
            clip = audio[int(rng.integers(len(audio)))]
            prompt = PROMPTS[int(rng.integers(len(PROMPTS)))]
            if client_mode == "reused":
                rec, _ = one_request(shared, prompt, clip, max_tokens=max_tokens, stream=(k + n) % 2 == 0)
            elif client_mode == "per-connection":  # a connection of its own, opened for this request, closed after
                with AF3Client(url, timeout=600, private_connection=True) as own:
                    rec, _ = one_request(own, prompt, clip, max_tokens=max_tokens, stream=(k + n) % 2 == 0)
            else:  # legacy: AF3Client before issue 19: a tritonclient stream per request, stopped with cancel_requests
                with AF3Stream(url, timeout=600) as own:
                    rec, _ = record(own.responses(Request(prompt, [clip], max_tokens=max_tokens,
                                                          stream=(k + n) % 2 == 0)))
            n += 1
            with lock:
                records.append((time.monotonic() - t0, rec))
            busy[k] = None

    def tree_rss() -> dict[str, float]:
        rss = process_tree_rss(server_pid)
        rss.update({name: rss_mb(pid) for name, pid in (watch or {}).items()})
        return rss

    stopped = threading.Event()

    def sampler() -> None:
        while True:
            t = time.monotonic() - t0
            rss = tree_rss()
            with lock:
                done = len(records)
                errors = sum(1 for _, r in records if not r.ok)
            series.append({"t_s": round(t, 1), "requests": done, "errors": errors,
                           "total_mb": round(sum(rss.values()), 3), "processes_mb": {k: round(v, 3) for k, v in rss.items()}})
            log(f"[soak] {t:6.0f} s  requests {done:6d}  errors {errors:3d}  server RSS {sum(rss.values()):8.1f} MB")
            if stopped.wait(min(sample_s, max(0.0, end - time.monotonic()))) or time.monotonic() >= end:
                return

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(concurrency)]
    for t in threads:
        t.start()
    sample_thread = threading.Thread(target=sampler, daemon=True)
    sample_thread.start()
    stuck = wait_workers(threads, busy, lambda: exhausted.is_set() or time.monotonic() >= end, stuck_s)
    if stuck:
        log(f"[soak] {len(stuck)} worker(s) stuck for over {stuck_s:.0f} s in one request (left behind): {stuck}")
    stopped.set()
    sample_thread.join()
    shared.close()
    rss = tree_rss()
    series.append({"t_s": round(time.monotonic() - t0, 1), "requests": len(records),
                   "errors": sum(1 for _, r in records if not r.ok),
                   "total_mb": round(sum(rss.values()), 3), "processes_mb": {k: round(v, 3) for k, v in rss.items()}})
    recs = [r for _, r in records]
    summary = summarize(recs)
    return {
        "url": url, "minutes": minutes, "requests_asked": requests, "client_mode": client_mode, "concurrency": concurrency,
        "max_tokens": max_tokens, "clip_seconds": "%g-%g" % clip_seconds, "streaming_share": 0.5, "summary": summary,
        "workers_stuck": len(stuck),
        "errors_by_message": dict(Counter(r.error.split("]")[-1].strip()[:160] for r in recs if not r.ok)),
        "bytes_per_request": bytes_per_request(series, warmup_requests=int(warmup_share * len(recs))),
        # the same fit over the second half only: a leak keeps its slope there, warm-up that lasts flattens out
        "bytes_per_request_second_half": bytes_per_request(series, warmup_requests=len(recs) // 2),
        "rss_growth": rss_growth(series, settle_min * 60), "rss_series": series,
    }


def wait_workers(threads: list[threading.Thread], busy: dict, done_issuing, stuck_s: float) -> list[int]:
    """Join the workers. Once no more requests are to be issued (done_issuing()), a worker that has been in one
    request for over stuck_s is left behind (a client call that never returns, e.g. grpc/grpc#20026: a Python
    channel's close() can deadlock with its connectivity watcher) so that the run still ends and reports. Returns
    the workers left behind."""
    while True:
        alive = [k for k, t in enumerate(threads) if t.is_alive()]
        if not alive:
            return []
        now = time.monotonic()
        stuck = [k for k in alive if busy.get(k) is not None and now - busy[k] > stuck_s]
        if done_issuing() and len(stuck) == len(alive):
            return stuck
        threads[alive[0]].join(1.0)


def bytes_per_request(series: list[dict], warmup_requests: int) -> dict:
    """Per process (and in total): the slope in bytes per request of a least-squares line through (requests done,
    RSS) over the samples after `warmup_requests`, with the RSS at the start and end of that window. Needs 3 samples
    there spanning some requests."""
    after = [s for s in series if s["requests"] >= warmup_requests]
    if len(after) < 3 or after[-1]["requests"] - after[0]["requests"] < 1:
        return {"note": f"fewer than 3 samples after {warmup_requests} requests"}
    x = np.array([s["requests"] for s in after], float)

    def fit(mb: list[float]) -> dict:
        y = np.array(mb, float) * 2**20
        slope, icept = np.polyfit(x, y, 1)
        resid = y - (slope * x + icept)
        return {"bytes_per_request": round(float(slope), 1), "from_mb": round(mb[0], 1), "to_mb": round(mb[-1], 1),
                "residual_rms_kb": round(float(np.sqrt(np.mean(resid**2))) / 1024, 1)}

    names = sorted({k for s in after for k in s["processes_mb"]})
    return {"warmup_requests": warmup_requests, "from_requests": int(x[0]), "to_requests": int(x[-1]),
            "samples": len(after), "total": fit([s["total_mb"] for s in after]),
            "per_process": {k: fit([s["processes_mb"].get(k, 0.0) for s in after]) for k in names}}


def rss_growth(series: list[dict], settle_s: float) -> dict:
    """Total and per-process RSS change from the first sample at or after settle_s to the last sample."""
    after = [s for s in series if s["t_s"] >= settle_s]
    if len(after) < 2:
        return {"note": f"no samples after {settle_s:.0f} s"}
    a, b = after[0], after[-1]
    per = {k: {"from_mb": a["processes_mb"].get(k), "to_mb": v,
               "growth_pct": (round(100 * (v / a["processes_mb"][k] - 1), 2) if a["processes_mb"].get(k) else None)}
           for k, v in b["processes_mb"].items()}
    return {"from_s": a["t_s"], "to_s": b["t_s"], "from_mb": a["total_mb"], "to_mb": b["total_mb"],
            "growth_pct": round(100 * (b["total_mb"] / a["total_mb"] - 1), 2), "per_process": per}


PER_PROCESS = [Column("process"), Column("bytes / request", "bytes_per_request", "{:.0f}"),
               Column("second half: bytes / request", "second_half", "{:.0f}"), Column("RSS from (MB)", "from_mb"),
               Column("RSS to (MB)", "to_mb"), Column("residual RMS (KB)", "residual_rms_kb")]
SAMPLES = [Column("t (s)", "t_s"), Column("requests"), Column("errors"), Column("total RSS (MB)", "total_mb", "{:.1f}"),
           Column("tritonserver (MB)", lambda p: p["processes_mb"].get("tritonserver", 0.0), "{:.1f}")]


def report_md(res: dict, max_rows: int = 25) -> str:
    s, g, b = res["summary"], res["rss_growth"], res["bytes_per_request"]
    lat = s.get("latency_ms", {})
    lines = [
        f"# Soak: {s['requests']} requests, client mode `{res['client_mode']}`, concurrency {res['concurrency']}",
        "",
        f"{res['clip_seconds']} s speech clips, half streaming, {res['max_tokens']} output tokens, greedy.",
        "",
        f"- requests {s['requests']}, errors {s['errors']}" + (f" ({res['errors_by_message']})" if s["errors"] else ""),
        f"- throughput {s.get('throughput_rps', 0):.2f} req/s; latency p50 {lat.get('p50', 0) / 1e3:.2f} s, "
        f"p90 {lat.get('p90', 0) / 1e3:.2f} s, p99 {lat.get('p99', 0) / 1e3:.2f} s",
        f"- server RSS (tritonserver + stubs) {g.get('from_mb')} MB at {g.get('from_s')} s → {g.get('to_mb')} MB at "
        f"{g.get('to_s')} s: **{g.get('growth_pct')} %**",
    ]
    if "per_process" in b:
        lines += [
            f"- **bytes per request** (least-squares slope of RSS over requests {b['from_requests']}–{b['to_requests']}, "
            f"after {b['warmup_requests']} warm-up requests, {b['samples']} samples): total "
            f"**{b['total']['bytes_per_request']:.0f} B**",
            "",
        ]
        half = res.get("bytes_per_request_second_half", {}).get("per_process", {})
        lines += markdown_table(PER_PROCESS, [
            {"process": k, **v, "second_half": half.get(k, {}).get("bytes_per_request")}
            for k, v in b["per_process"].items()])
    else:
        lines.append(f"- bytes per request: {b.get('note')}")
    series = res["rss_series"]
    shown = thin(series, max_rows)
    lines += ["", f"RSS samples ({len(shown)} of {len(series)}, evenly spaced; all in soak.json):", "",
              *markdown_table(SAMPLES, shown)]
    return "\n".join(lines) + "\n"


def thin(series: list, max_rows: int) -> list:
    """At most max_rows items of series, evenly spaced, always the first and the last."""
    if len(series) <= max_rows:
        return list(series)
    picks = np.linspace(0, len(series) - 1, max_rows).round().astype(int)
    return [series[i] for i in sorted(set(picks.tolist()))]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--chaos" in argv:  # every request kind while processes are killed at random (perf/chaos.py)
        from af3trt.perf import chaos

        return chaos.main(argv)
    if "--heal" in argv:  # start and heal times per stage (perf/heal.py)
        from af3trt.perf import heal

        return heal.main(argv)
    ap = argparse.ArgumentParser(prog="af3trt soak", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--model-repository", type=Path, help="start tritonserver on this repository (loopback)")
    where.add_argument("--url", help="gRPC address of a running server (with --server-pid)")
    ap.add_argument("--server-pid", type=int, help="PID of that tritonserver (for the RSS series)")
    ap.add_argument("--minutes", type=float, default=10.0, help="stop after this long (or --requests)")
    ap.add_argument("--requests", type=int, default=None, help="stop after this many requests (or --minutes)")
    ap.add_argument("--client", choices=CLIENT_MODES, default="reused",
                    help="reused: one connection for every request; per-connection: a new one per request; legacy: "
                         "a tritonclient stream per request, cancelled at its end (AF3Client before issue 19)")
    ap.add_argument("--warmup-share", type=float, default=0.2,
                    help="bytes per request are fitted after this share of the requests")
    ap.add_argument("--proxy", action="store_true",
                    help="with --model-repository: serve it as `af3trt replicas --replicas 1` (HAProxy in front) and "
                         "soak through the proxy; HAProxy's RSS is recorded too")
    ap.add_argument("--watch", action="append", default=[], metavar="NAME=PID",
                    help="also record this process's RSS (e.g. a proxy in front of tritonserver)")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--clip-seconds", type=parse_seconds, default=(1.0, 8.0), metavar="LO-HI",
                    help="speech clips of LO..HI seconds (default 1-8); e.g. 0.5-1 with --max-tokens 2 for a light, "
                         "fast mix that reaches 100,000 requests sooner")
    ap.add_argument("--sample-s", type=float, default=10.0, help="seconds between RSS samples")
    ap.add_argument("--settle-min", type=float, default=2.0, help="RSS growth is measured from this minute on")
    ap.add_argument("--out", type=Path, default=Path("perf/results/soak"))
    args = ap.parse_args(argv)
    if args.url and not args.server_pid:
        ap.error("--url needs --server-pid (the RSS series is read from /proc)")
    args.out.mkdir(parents=True, exist_ok=True)
    server = None
    watch = {name: int(pid) for name, pid in (w.split("=", 1) for w in args.watch)}
    if args.model_repository and args.proxy:
        from af3trt.runtime.serve.replicas import ReplicaSet

        server = ReplicaSet(args.model_repository.resolve(), 1, args.out / "replicas").start()
        url, pid = server.grpc_url, server.servers[0].proc.pid
        watch["haproxy"] = server.haproxy.pid
    elif args.model_repository:
        from af3trt.runtime.serve.server import TritonServer

        server = TritonServer(args.model_repository.resolve(), log_path=args.out / "tritonserver.log").start()
        url, pid = server.grpc_url, server.proc.pid
    else:
        url, pid = args.url, args.server_pid
    try:
        res = soak(url, pid, minutes=args.minutes, concurrency=args.concurrency, max_tokens=args.max_tokens,
                   sample_s=args.sample_s, settle_min=args.settle_min, requests=args.requests,
                   client_mode=args.client, warmup_share=args.warmup_share, watch=watch,
                   clip_seconds=args.clip_seconds)
    finally:
        if server:
            server.stop()  # TritonServer or ReplicaSet
    (args.out / "soak.json").write_text(json.dumps(res, indent=1))
    (args.out / "soak.md").write_text(report_md(res))
    print(report_md(res).split("\nRSS samples")[0])
    print(f"written: {args.out / 'soak.json'}, {args.out / 'soak.md'}")
    return 0 if res["summary"]["errors"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
