"""The CPU reference as a serving engine (issue 20, items 3 and 4), in one run: af3trt against transformers on the
AF3-shaped checkpoint (the `af3` synthetic preset: decoder head_dim 128), then the audio cache.

    python -m af3trt.perf.engine --out perf/results/latest      # writes engine.json and engine.md there

(1) Interleaved rounds. Each round makes fresh variants of 8 distinct spoken clips of 7-10 s (one sample nudged by a
    round-dependent 1e-4, so no clip repeats and af3trt's audio cache never hits) and measures, on those clips:
      burst        af3trt: the 8 sent at once, non-streamed, 32 tokens (first send to last answer)
      sustained    af3trt: a closed loop at concurrency 8 over `--sustained` x 8 such clips (a longer, steadier
                   measure than a 1.5-s burst)
      sequential   transformers generate, one clip after another
      batched      transformers generate over the 8 at once (its own left padding)
    Reported: per measure the median req/s, the spread (max - min) / median over the rounds, and af3trt's ratios
    to the peers' medians.
(2) Audio cache, through the OpenAI front (`af3trt openai`, the `openai` client, 8 streamed chat completions at once,
    base64 FLAC, 32 tokens): req/s and TTFT p50 on clips never sent, then on the same clips again; and the TTFT
    of a 10-minute clip's first turn against its second turn (the clip sent again with the first answer and a
    follow-up question).
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import subprocess
import sys
import threading
import time
import urllib.request
from functools import lru_cache
from pathlib import Path

import numpy as np

from af3trt.build.tables import Column, Text, markdown_table
from af3trt.perf import bench, compare, machine
from af3trt.perf import clips as clipgen
from af3trt.perf.loadgen import run_load
from af3trt.runtime.host.proc import tree_cpu_seconds

log = logging.getLogger("af3trt.bench")


@lru_cache(maxsize=None)
def _spoken(i: int, seconds: float) -> np.ndarray:
    return clipgen.spoken(clipgen.SENTENCES[i], seconds)


def fresh_clips(count: int, variant: int) -> list[tuple[float, bytes]]:
    """`count` distinct spoken clips of 7-10 s, made new for `variant` (one sample changed by variant * 1e-4)."""
    secs = np.linspace(7.0, 10.0, count)
    out = []
    for i, s in enumerate(secs):
        wave = _spoken(i, float(s)).copy()
        wave[0] += 1e-4 * variant
        out.append((float(s), clipgen.flac_bytes(wave)))
    return out


def spread(values: list[float]) -> float:
    return float((max(values) - min(values)) / np.median(values)) if values else float("nan")


def af3trt_round(url: str, args, variant: int, pid: int | None = None) -> tuple[dict, dict]:
    """One burst and one sustained closed loop on fresh clips (variants variant … variant + args.sustained); with the
    server's `pid`, the CPU seconds its process tree spent on each (a measure a neighbour's load changes less than
    wall time: on a shared machine the wall-time ratio is partly a ratio of CPU shares)."""
    cpu0 = tree_cpu_seconds(pid) if pid else None
    burst = compare.burst(url, fresh_clips(args.burst_clips, variant), args.max_tokens)
    cpu1 = tree_cpu_seconds(pid) if pid else None
    loop = [c for k in range(args.sustained) for c in fresh_clips(args.burst_clips, variant + 1 + k)]
    records, window = run_load(url, compare.items_of(loop), concurrency=args.burst_clips, requests=len(loop),
                               max_tokens=args.max_tokens, stream=False)
    cpu2 = tree_cpu_seconds(pid) if pid else None
    bad = [r for r in records if not r.ok]
    if bad:
        raise RuntimeError(f"sustained: {len(bad)} requests failed: {bad[0].error}")
    sustained = {"name": "sustained", "seconds": window, "requests": len(records),
                 "tokens": sum(r.tokens for r in records), "throughput_rps": len(records) / window,
                 "tool": f"af3trt client (gRPC), closed loop at concurrency {args.burst_clips}"}
    if pid:
        burst["cpu_s_per_request"] = (cpu1 - cpu0) / args.burst_clips
        sustained["cpu_s_per_request"] = (cpu2 - cpu1) / len(records)
    return burst, sustained


def peer_round(ref, clips: list[tuple[float, bytes]], max_tokens: int) -> dict:
    """transformers one clip at a time, then one batched generate over all: req/s and CPU seconds per request (this
    process's CPU time, which is transformers' alone while it runs)."""
    items = compare.items_of(clips)
    ref.set_threads(ref.threads)  # torch's thread count is process-wide: every peer sets its own
    out = {}
    for peer in PEERS:
        cpu0 = time.process_time()
        run = ref.sequential(items, len(items), max_tokens) if peer == "sequential" else \
            ref.batched(items, len(items), max_tokens)
        seconds = float(np.sum(run["seconds"]))
        out[peer] = {"seconds": seconds, "requests": len(items), "throughput_rps": len(items) / seconds,
                     "cpu_s_per_request": (time.process_time() - cpu0) / len(items),
                     "tool": f"transformers {ref.dtype} generate in the bench process ({ref.threads} torch threads)"}
    return out


PEERS = ("sequential", "batched")  # transformers one clip at a time, one batched generate over the round's clips


def peer_names(dtypes: list[str]) -> list[str]:
    """The peers' measure names: `sequential` / `batched` for the first dtype (transformers' default load), suffixed
    by the dtype for the others (e.g. `sequential bfloat16`)."""
    return [p if i == 0 else f"{p} {d}" for i, d in enumerate(dtypes) for p in PEERS]


def pick_threads(ref, warm, max_tokens: int) -> dict:
    """The faster of 1 and all cores for a transformers peer, timed on the warm-up's batched generate."""
    timed = {}
    for n in sorted({1, os.cpu_count() or 1}):
        ref.set_threads(n)
        timed[n] = ref.batched(compare.items_of(warm), len(warm), max_tokens)["seconds"]
    ref.set_threads(min(timed, key=timed.get))
    return timed


def run_rounds(urls: dict[str, str], refs: dict, args, pids: dict[str, int] | None = None) -> dict:
    """Rounds of: every af3trt variant's burst and sustained loop, then each transformers peer (`refs`: dtype →
    TransformersBaseline) one at a time and batched on the round's burst clips."""
    runs: dict[str, list[dict]] = {f"{v} {m}": [] for v in urls for m in ("burst", "sustained")}
    names = peer_names(list(refs))
    runs.update({k: [] for k in names})
    threads = warm_peers(refs, fresh_clips(args.burst_clips, 0), args)
    variant = 1000  # variants below 1000 are the warm-ups'
    load = []
    for i in range(args.rounds):
        load.append(machine.load_average())
        for name, url in urls.items():
            burst, sustained = af3trt_round(url, args, variant, (pids or {}).get(name))
            runs[f"{name} burst"].append(burst)
            runs[f"{name} sustained"].append(sustained)
            variant += 1 + args.sustained
        clips = fresh_clips(args.burst_clips, variant - 1 - args.sustained)
        for k, ref in enumerate(refs.values()):
            base = peer_round(ref, clips, args.max_tokens)
            for peer, name in zip(PEERS, names[2 * k:2 * k + 2]):
                runs[name].append(base[peer])
        log.info("round %d: %s", i + 1, ", ".join(f"{k} {v[-1]['throughput_rps']:.2f}" for k, v in runs.items()))
    peers = {d: {"threads": r.threads, "dtype": r.dtype, "threads_timed": threads.get(d)} for d, r in refs.items()}
    return {"rounds": args.rounds, "peers": peers,
            "load_average_by_round": load, **summarize_rounds(runs, names)}


def warm_peers(refs: dict, warm: list[tuple[float, bytes]], args) -> dict:
    """One uncounted round per transformers peer; each peer's threads picked then unless --baseline-threads.
    → {dtype: batched seconds by threads} of the peers whose threads were picked."""
    threads = {}
    for dtype, ref in refs.items():
        peer_round(ref, warm, args.max_tokens)  # warm-up, not counted
        if not args.baseline_threads:
            threads[dtype] = pick_threads(ref, warm, args.max_tokens)
            log.info("transformers %s threads: %d (batched warm-up seconds by threads: %s)", dtype, ref.threads,
                     threads[dtype])
    return threads


def summarize_rounds(runs: dict[str, list[dict]], peers: list[str]) -> dict:
    """Per measure: req/s of each round, median, spread; af3trt's ratios to each peer (req/s, and CPU seconds per
    request: peer / af3trt); the burst rounds' stage splits."""
    rps = {k: [r["throughput_rps"] for r in v] for k, v in runs.items()}
    med = {k: float(np.median(v)) for k, v in rps.items()}
    out = {"req_s": rps, "median_req_s": med, "spread": {k: spread(v) for k, v in rps.items()},
           "ratios": {f"{a} vs {b}": med[a] / med[b] for a in runs if a not in peers for b in peers}}
    cpu = {k: [r["cpu_s_per_request"] for r in v if "cpu_s_per_request" in r] for k, v in runs.items()}
    c = out["cpu_s_per_request"] = {k: float(np.median(v)) for k, v in cpu.items() if v}
    out["cpu_ratios"] = {f"{a} vs {b}": c[b] / c[a] for a in runs if a not in peers and a in c
                         for b in peers if b in c}
    out["splits"] = {k: [r.get("split") for r in v] for k, v in runs.items() if k.endswith("burst")}
    return out


# ------------------------------------------------------------------------------------------------ OpenAI front

class OpenAIFront:
    """`af3trt openai` as a subprocess on a free loopback port, stopped by its PID."""

    def __init__(self, triton_url: str, log_path: Path):
        from af3trt.runtime.serve.server import free_port

        self.port = free_port()
        self.logf = open(log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "af3trt.runtime.openai.app", "--triton", triton_url,
                                      "--port", str(self.port)], stdout=self.logf, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}/v1"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"af3trt openai exited; log: {log_path}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5)
                return
            except urllib.error.HTTPError:
                return
            except OSError:
                time.sleep(0.3)
        raise TimeoutError("af3trt openai did not start")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.logf.close()


def _user(clip: bytes, text: str) -> dict:
    return {"role": "user", "content": [{"type": "input_audio", "input_audio": {
        "data": base64.b64encode(clip).decode(), "format": "flac"}}, {"type": "text", "text": text}]}


def chat(client, messages: list[dict], max_tokens: int) -> dict:
    """One streamed chat completion: TTFT (first content), latency, answer text."""
    t0 = time.perf_counter()
    ttft, text = None, []
    for ev in client.chat.completions.create(model="af3", messages=messages, max_tokens=max_tokens, stream=True,
                                             temperature=0):
        if ev.choices and ev.choices[0].delta.content:
            ttft = ttft or time.perf_counter() - t0
            text.append(ev.choices[0].delta.content)
    return {"ttft_ms": 1e3 * (ttft if ttft is not None else time.perf_counter() - t0),
            "latency_ms": 1e3 * (time.perf_counter() - t0), "text": "".join(text)}


def chat_burst(client, spoken: list[tuple[float, bytes]], max_tokens: int) -> dict:
    results: list[dict] = [{}] * len(spoken)

    def one(i):
        results[i] = chat(client, [_user(spoken[i][1], compare.PROMPT)], max_tokens)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(spoken))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    window = time.perf_counter() - t0
    return {"req_s": len(spoken) / window, "ttft_ms_p50": float(np.median([r["ttft_ms"] for r in results])),
            "latency_ms_p50": float(np.median([r["latency_ms"] for r in results]))}


def cache_figures(url: str, args, out: Path) -> dict:
    from openai import OpenAI

    front = OpenAIFront(url, out / "openai-front.log")
    try:
        client = OpenAI(base_url=front.url, api_key="none", max_retries=0, timeout=1800)
        chat(client, [_user(fresh_clips(1, 1)[0][1], compare.PROMPT)], 4)  # warm-up of the front
        first, again = [], []
        for k in range(args.cache_rounds):
            spoken = fresh_clips(args.burst_clips, 5000 + k)
            first.append(chat_burst(client, spoken, args.max_tokens))
            again.append(chat_burst(client, spoken, args.max_tokens))
            log.info("cache round %d: first %.2f req/s (TTFT p50 %.0f ms), again %.2f req/s (TTFT p50 %.0f ms)", k + 1,
                     first[-1]["req_s"], first[-1]["ttft_ms_p50"], again[-1]["req_s"], again[-1]["ttft_ms_p50"])
        long_clip = clipgen.make_clip(clipgen.ClipSpec("speech", args.long_seconds), seed=7)
        turn1 = chat(client, [_user(long_clip, compare.PROMPT)], args.max_tokens)
        turn2 = chat(client, [_user(long_clip, compare.PROMPT), {"role": "assistant", "content": turn1["text"]},
                              {"role": "user", "content": "Say it again, shorter."}], args.max_tokens)
        log.info("%g-s clip: first turn TTFT %.0f ms, second turn %.0f ms", args.long_seconds, turn1["ttft_ms"],
                 turn2["ttft_ms"])
    finally:
        front.stop()

    def med(rows, key):
        return float(np.median([r[key] for r in rows]))

    return {"tool": "openai client, 8 streamed chat completions at once via `af3trt openai`, base64 FLAC",
            "first_time": {"req_s": med(first, "req_s"), "ttft_ms_p50": med(first, "ttft_ms_p50"), "runs": first},
            "repeated": {"req_s": med(again, "req_s"), "ttft_ms_p50": med(again, "ttft_ms_p50"), "runs": again},
            "long_clip_s": args.long_seconds,
            "long_clip_ttft_ms": {"first_turn": turn1["ttft_ms"], "second_turn": turn2["ttft_ms"]}}


# ------------------------------------------------------------------------------------------------ main

def _plain(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    return str(o)


def _target(key: str) -> float:
    """The ratio's target: against transformers one-at-a-time or batched (`… vs sequential…` / `… vs batched…`)."""
    return compare.TARGET_VS_SEQUENTIAL if key.split(" vs ")[1].startswith("sequential") else compare.TARGET_VS_BATCHED


# engine.md's tables (build/tables.py writes them), over the records of engine.json's "compare" and "cache"
MEASURES = [Column("measure", "name"), Column("median req/s", "median", "{:.2f}"),
            Column("spread (max-min)/median", "spread", lambda v: f"{100 * v:.0f} %"),
            Column("per-round req/s", "req_s", lambda v: " / ".join(f"{x:.2f}" for x in v)),
            Column("CPU s per request (median)", "cpu", "{:.2f}")]
RATIOS = [Column("ratio (medians)", "key"), Column("value", "value", "{:.2f}"),
          Column("target", lambda r: f"≥ {_target(r['key'])} "
                                     f"({'met' if r['value'] >= _target(r['key']) else 'missed'})")]
CPU_RATIOS = [Column("ratio of CPU seconds per request (peer / af3trt, medians)", "key"), *RATIOS[1:]]
BURST_SPLIT = [Column("burst", "name"), *(Column(s, s, "{:.0f}") for s in ("preprocess", "encoder", "fusion")),
               Column("decoder generation", "decoder_generation_ms", "{:.0f}"),
               Column("ensemble", "ensemble_ms", "{:.0f}")]
CACHE = [Column("clips", "clips"), Column("req/s", "req_s", "{:.2f}"), Column("TTFT p50 ms", "ttft_ms_p50", "{:.0f}")]


def render(r: dict) -> str:
    """engine.md of an engine.json record."""
    c = r["compare"]
    lines = [f"# CPU engine: af3trt against transformers ({r['started_utc']})", "",
             f"Checkpoint: synthetic `af3` preset (decoder head_dim 128). {c['rounds']} interleaved rounds, fresh clips "
             f"every round, {r['args']['max_tokens']} tokens; sustained = closed loop at concurrency 8 over "
             f"{8 * r['args']['sustained']} requests. Load average {r['load_average_start']} at start, "
             f"{r['load_average_end']} at end. Variants: "
             + "; ".join(f"`{k}` = {v or 'defaults'}" for k, v in r["variants"].items()) + ".", "",
             *markdown_table(MEASURES, measures(r)), "",
             *markdown_table(RATIOS, [{"key": k, "value": v} for k, v in c["ratios"].items()])]
    lines += _burst_split_lines(c.get("splits") or {})
    if c.get("cpu_ratios"):
        lines += ["", *markdown_table(CPU_RATIOS, [{"key": k, "value": v} for k, v in c["cpu_ratios"].items()])]
    if c.get("load_average_by_round"):
        lines += ["", "Load average (1, 5, 15 min) at the start of each round: "
                  + "; ".join(", ".join(f"{x:.1f}" for x in la) for la in c["load_average_by_round"]) + "."]
    if "cache" in r:
        ca = r["cache"]
        lines += ["", "## Audio cache (OpenAI front, 8 streamed chat completions at once)", "",
                  *markdown_table(CACHE, [{"clips": "never sent", **ca["first_time"]},
                                          {"clips": "sent before", **ca["repeated"]}]), "",
                  f"{ca['long_clip_s']:g}-s clip, streamed TTFT: first turn "
                  f"{ca['long_clip_ttft_ms']['first_turn']:.0f} ms, second turn "
                  f"{ca['long_clip_ttft_ms']['second_turn']:.0f} ms."]
    return "\n".join(lines) + "\n"


def measures(r: dict) -> list[dict]:
    """One record per measure (af3trt variants' burst and sustained, the transformers peers): its name as the
    report says it, median and per-round req/s, spread, median CPU seconds per request (or "-")."""
    c = r["compare"]
    dtypes = list(c.get("peers") or {"float32": {}})
    peers = {}
    for name, (peer, dtype) in zip(peer_names(dtypes), [(p, d) for d in dtypes for p in PEERS]):
        what = "one-at-a-time" if peer == "sequential" else f"batched generate ({r['args']['burst_clips']})"
        peers[name] = f"transformers {dtype} {what}"
    cpu = c.get("cpu_s_per_request") or {}
    return [{"name": peers.get(k, f"af3trt {k}"), "median": c["median_req_s"][k], "spread": c["spread"][k],
             "req_s": c["req_s"][k], "cpu": cpu.get(k, Text("-"))} for k in c["req_s"]]


def _burst_split_lines(splits: dict) -> list[str]:
    """Where a burst request's time goes: per af3trt variant, each stage's queue + compute, means over the rounds."""
    splits = {k: [x for x in v if x] for k, v in splits.items()}
    if not any(splits.values()):
        return []
    rows = [{"name": k, **{s: float(np.mean([x["stages"][s]["queue_ms"] + x["stages"][s]["compute_ms"] for x in v]))
                           for s in ("preprocess", "encoder", "fusion")},
             "decoder_generation_ms": np.mean([x["decoder_generation_ms"] for x in v]),
             "ensemble_ms": np.mean([x["ensemble_ms"] for x in v])} for k, v in splits.items() if v]
    return ["", "Where a burst request's time goes (mean over the rounds, ms: each stage's queue + compute from "
            "Triton's statistics; decoder generation = admission to last token):", "",
            *markdown_table(BURST_SPLIT, rows)]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m af3trt.perf.engine", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, help="checkpoint and build cache (default: bench's)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--burst-clips", type=int, default=8)
    ap.add_argument("--sustained", type=int, default=3, help="bursts' worth of requests in the closed loop")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--baseline-threads", type=int, default=0,
                    help="transformers' torch threads (0: the faster of 1 and all cores, timed at warm-up)")
    ap.add_argument("--peer-dtypes", default="auto,bfloat16",
                    help="transformers peers, by the dtype the whole model is loaded in (auto: transformers' default, "
                         "the checkpoint's dtype; comma-separated)")
    ap.add_argument("--cache-rounds", type=int, default=3, help="0: skip the audio-cache figures")
    ap.add_argument("--long-seconds", type=float, default=600.0)
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=FLAGS",
                    help="another af3trt build served beside the default one, with `af3trt bench` build flags and "
                         "server environment, e.g. 'unbatched=--no-encoder-batching', 'omp1=OMP_NUM_THREADS=1' (repeatable; "
                         "not OMP_WAIT_POLICY=ACTIVE: its idle threads spin for good and slow every other measure)")
    return ap.parse_args(argv)


def serve_variant(name: str, flags: str, args, work: Path, out: Path):
    """Build (cached, as `af3trt bench` does) and start one variant: FLAGS are bench build flags and NAME=VALUE
    environment variables of its server. → (checkpoint, repository, TritonServer)."""
    from af3trt.runtime.serve.server import TritonServer

    env = dict(f.split("=", 1) for f in flags.split() if "=" in f and f.split("=")[0].isupper())
    build_flags = [f for f in flags.split() if f.split("=")[0] not in env]
    bargs = bench.parse_args(["--work", str(work), "--max-tokens", str(args.max_tokens), *build_flags])
    ckpt = bench.prepare_checkpoint(bargs, work)
    repo = bench.prepare_repository(bargs, ckpt, work)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the server's environment, which its stubs inherit
    try:
        server = TritonServer(repo / "model_repository", log_path=out / f"tritonserver-{name}.log",
                              exit_timeout=3).start(timeout=600)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return ckpt, repo, server


def compare_with_peers(urls: dict[str, str], pids: dict[str, int], ckpt: Path, args) -> dict:
    """Warm every variant's stages, load the transformers peers, run the interleaved rounds."""
    from af3trt.perf.baseline import TransformersBaseline

    for url in urls.values():
        run_load(url, compare.items_of(fresh_clips(args.burst_clips, 1)), concurrency=args.burst_clips,
                 requests=args.burst_clips, max_tokens=args.max_tokens, stream=False)
    loaded = [TransformersBaseline(ckpt, threads=args.baseline_threads or None, dtype=None if d == "auto" else d)
              for d in args.peer_dtypes.split(",")]
    refs = {ref.dtype: ref for ref in loaded}  # by the dtype it loaded in (auto: the checkpoint's)
    return run_rounds(urls, refs, args, pids)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    from af3trt.runtime.serve.triton_install import CACHE

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = (args.work or CACHE / "bench").resolve()
    variants = {"default": ""} | dict(v.split("=", 1) for v in args.variant)
    result = {"started_utc": time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()), "args": vars(args) | {"out": str(out)},
              "variants": variants, "machine": machine.describe(bench.REPO_ROOT),
              "load_average_start": machine.load_average()}
    servers = {}
    try:
        for name, flags in variants.items():
            ckpt, repo, servers[name] = serve_variant(name, flags, args, work, out)
            spec = json.loads((repo / "manifest.json").read_text()).get("repository", {}).get("spec", {})
            result.setdefault("repositories", {})[name] = {"path": str(repo), "spec": spec}
        urls = {name: s.grpc_url for name, s in servers.items()}
        result["compare"] = compare_with_peers(urls, {name: s.proc.pid for name, s in servers.items()}, ckpt, args)
        if args.cache_rounds:
            result["cache"] = cache_figures(urls["default"], args, out)
    finally:
        for s in servers.values():
            s.stop()
    result["load_average_end"] = machine.load_average()
    (out / "engine.json").write_text(json.dumps(result, indent=1, default=_plain))
    (out / "engine.md").write_text(render(result))
    print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
