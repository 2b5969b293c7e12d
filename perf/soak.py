"""`af3trt soak`: hold the server under steady load for minutes and watch for errors and memory creep.

    af3trt soak --model-repository out/af3-tiny/model_repository --minutes 10 --concurrency 16 --out perf/results/soak
    af3trt soak --url 127.0.0.1:8001 --server-pid PID --minutes 10     # a server you started (PID of tritonserver)

Closed loop: `concurrency` clients send requests back to back, each with one speech clip of 1–8 s (drawn with a fixed
seed) and a short prompt, alternately streaming and not. Every `--sample-s` seconds the RSS of every server process
(tritonserver and each python stub, named by its model) is recorded. The report gives requests, errors (by message),
latency percentiles, throughput, the RSS series, and the growth of the total RSS from minute `--settle-min` (after
warm-up: allocator pools, torch and ONNX Runtime caches) to the end.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

from af3trt.perf import clips
from af3trt.perf.loadgen import one_request
from af3trt.perf.metrics import RequestRecord, summarize
from af3trt.runtime.client import AF3Client
from af3trt.runtime.supervisor import stub_pids

PROMPTS = ("What is said?", "Transcribe the audio.", "Describe the sound.", "Who is speaking, and about what?")


def process_tree_rss(server_pid: int) -> dict[str, float]:
    """{name: RSS MB} of tritonserver and its python stubs (named by model; repeated models get #k)."""
    out = {"tritonserver": _rss_mb(server_pid)}
    for model, pids in sorted(stub_pids(server_pid).items()):
        for k, pid in enumerate(sorted(pids)):
            out[model if k == 0 else f"{model}#{k}"] = _rss_mb(pid)
    return out


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def make_clips(n: int = 8, seed: int = 0) -> list[bytes]:
    """n speech clips of 1..8 s (FLAC bytes)."""
    rng = np.random.default_rng(seed)
    return [clips.flac_bytes(clips.make_wave(clips.ClipSpec("speech", float(rng.uniform(1, 8))), seed=k))
            for k in range(n)]


def soak(url: str, server_pid: int, *, minutes: float, concurrency: int, max_tokens: int = 32,
         sample_s: float = 10.0, settle_min: float = 2.0, seed: int = 0, log=print) -> dict:
    audio = make_clips(seed=seed)
    client = AF3Client(url, timeout=600)
    records: list[tuple[float, RequestRecord]] = []
    lock = threading.Lock()
    t0 = time.monotonic()
    end = t0 + minutes * 60
    series: list[dict] = []

    def worker(k: int) -> None:
        rng = np.random.default_rng(seed * 1000 + k)
        n = 0
        while time.monotonic() < end:
            clip = audio[int(rng.integers(len(audio)))]
            prompt = PROMPTS[int(rng.integers(len(PROMPTS)))]
            rec, _ = one_request(client, prompt, clip, max_tokens=max_tokens, stream=(k + n) % 2 == 0)
            n += 1
            with lock:
                records.append((time.monotonic() - t0, rec))

    def sampler() -> None:
        while True:
            t = time.monotonic() - t0
            rss = process_tree_rss(server_pid)
            with lock:
                done = len(records)
                errors = sum(1 for _, r in records if not r.ok)
            series.append({"t_s": round(t, 1), "requests": done, "errors": errors,
                           "total_mb": round(sum(rss.values()), 1), "processes_mb": {k: round(v, 1) for k, v in rss.items()}})
            log(f"[soak] {t:6.0f} s  requests {done:6d}  errors {errors:3d}  server RSS {sum(rss.values()):8.1f} MB")
            if time.monotonic() >= end:
                return
            time.sleep(min(sample_s, max(0.0, end - time.monotonic())))

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(concurrency)]
    for t in threads:
        t.start()
    sample_thread = threading.Thread(target=sampler, daemon=True)
    sample_thread.start()
    for t in threads:
        t.join()
    sample_thread.join()
    series.append({"t_s": round(time.monotonic() - t0, 1), "requests": len(records),
                   "errors": sum(1 for _, r in records if not r.ok),
                   "total_mb": round(sum(process_tree_rss(server_pid).values()), 1),
                   "processes_mb": {k: round(v, 1) for k, v in process_tree_rss(server_pid).items()}})
    recs = [r for _, r in records]
    summary = summarize(recs)
    return {
        "minutes": minutes, "concurrency": concurrency, "max_tokens": max_tokens, "clip_seconds": "1-8",
        "streaming_share": 0.5, "summary": summary,
        "errors_by_message": dict(Counter(r.error.split("]")[-1].strip()[:160] for r in recs if not r.ok)),
        "rss_growth": rss_growth(series, settle_min * 60), "rss_series": series,
    }


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


def report_md(res: dict) -> str:
    s, g = res["summary"], res["rss_growth"]
    lat = s.get("latency_ms", {})
    lines = [
        f"# Soak: {res['minutes']:g} min at concurrency {res['concurrency']}",
        "",
        f"1–8 s speech clips, half streaming, {res['max_tokens']} output tokens, greedy.",
        "",
        f"- requests {s['requests']}, errors {s['errors']}" + (f" ({res['errors_by_message']})" if s["errors"] else ""),
        f"- throughput {s.get('throughput_rps', 0):.2f} req/s; latency p50 {lat.get('p50', 0) / 1e3:.2f} s, "
        f"p90 {lat.get('p90', 0) / 1e3:.2f} s, p99 {lat.get('p99', 0) / 1e3:.2f} s",
        f"- server RSS (tritonserver + stubs) {g.get('from_mb')} MB at {g.get('from_s')} s → {g.get('to_mb')} MB at "
        f"{g.get('to_s')} s: **{g.get('growth_pct')} %**",
        "",
        "| process | RSS from (MB) | RSS to (MB) | growth % |",
        "|---|---|---|---|",
    ]
    for k, v in g.get("per_process", {}).items():
        lines.append(f"| {k} | {v['from_mb']} | {v['to_mb']} | {v['growth_pct']} |")
    lines += ["", "| t (s) | requests | errors | total RSS (MB) |", "|---|---|---|---|"]
    lines += [f"| {p['t_s']} | {p['requests']} | {p['errors']} | {p['total_mb']} |" for p in res["rss_series"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="af3trt soak", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--model-repository", type=Path, help="start tritonserver on this repository (loopback)")
    where.add_argument("--url", help="gRPC address of a running server (with --server-pid)")
    ap.add_argument("--server-pid", type=int, help="PID of that tritonserver (for the RSS series)")
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--sample-s", type=float, default=10.0, help="seconds between RSS samples")
    ap.add_argument("--settle-min", type=float, default=2.0, help="RSS growth is measured from this minute on")
    ap.add_argument("--out", type=Path, default=Path("perf/results/soak"))
    args = ap.parse_args(argv)
    if args.url and not args.server_pid:
        ap.error("--url needs --server-pid (the RSS series is read from /proc)")
    args.out.mkdir(parents=True, exist_ok=True)
    server = None
    if args.model_repository:
        from af3trt.runtime.server import TritonServer

        server = TritonServer(args.model_repository.resolve(), log_path=args.out / "tritonserver.log").start()
    try:
        url = args.url or server.grpc_url
        pid = args.server_pid or server.proc.pid
        res = soak(url, pid, minutes=args.minutes, concurrency=args.concurrency, max_tokens=args.max_tokens,
                   sample_s=args.sample_s, settle_min=args.settle_min)
    finally:
        if server:
            server.stop()
    (args.out / "soak.json").write_text(json.dumps(res, indent=1))
    (args.out / "soak.md").write_text(report_md(res))
    print(report_md(res).split("\n| process")[0])
    print(f"written: {args.out / 'soak.json'}, {args.out / 'soak.md'}")
    return 0 if res["summary"]["errors"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
