"""Measurements with Triton's statistics around them, shared by `af3trt bench` (perf/bench.py) and its headline
comparison (perf/compare.py):

    probe_requests       requests one at a time on one open gRPC stream; each request's stage split and overhead
    sweep_perf_analyzer  perf_analyzer at each concurrency level; each level's summary, stage split and server CPU
"""

from __future__ import annotations

import logging
from pathlib import Path

from af3trt.perf import machine, metrics, stats
from af3trt.perf.analyzer import find_perf_analyzer, run_perf_analyzer, write_input_data
from af3trt.perf.loadgen import PersistentStream
from af3trt.runtime.stages.contract import ENSEMBLE, STAGES

log = logging.getLogger("af3trt.bench")


def probe_requests(url: str, items: list[tuple[str, bytes]], *, max_tokens: int, stream: bool,
                   thinking: bool | None = None) -> list[dict]:
    """Requests one at a time on one open gRPC stream (PersistentStream), Triton statistics snapshotted around
    each: per-request stage split and overhead. thinking: AF3's thinking mode for every request (docs/thinking.md)."""
    out = []
    with PersistentStream(url) as conn:
        for prompt, clip in items:
            before = stats.snapshot(url)
            rec, ids = conn.request(prompt, clip, max_tokens=max_tokens, stream=stream, thinking=thinking)
            after = stats.snapshot(url)
            split = stats.stage_split(stats.diff(before, after), ensemble=ENSEMBLE, stages=STAGES)
            lat = 1e3 * rec.latency_s if rec.ok else None
            out.append({"record": rec.to_dict(), "ids": ids, "latency_ms": lat,
                        "ttft_ms": 1e3 * rec.ttft_s if rec.ok and rec.ttft_s is not None else None,
                        "split": split, "overhead": stats.overhead(split, client_latency_ms=lat)})
    return out


def sweep_perf_analyzer(url: str, inputs: list[tuple[str, bytes | None]], out: Path, mode: str,
                        server_pid: int | None, *, concurrency: list[int], max_tokens: int, requests_per_level: int,
                        rounds_per_level: int) -> list[dict]:
    """perf_analyzer at each concurrency level over `inputs` (mode "stream" or "nonstream"), Triton statistics and
    the server's CPU time around each level: one point per level (perf/metrics.py summary + stage split)."""
    stream = mode == "stream"
    out.mkdir(parents=True, exist_ok=True)
    data = write_input_data(out / f"inputs_{mode}.json", inputs, max_tokens=max_tokens, stream=stream)
    snaps = {}

    def on_level(c, phase):
        snaps[(c, phase)] = stats.snapshot(url)
        snaps[(c, phase, "cpu")] = machine.cpu_sample(server_pid)

    rows = run_perf_analyzer(find_perf_analyzer(), url, data, concurrency=concurrency, streaming=True,
                             requests_per_level=requests_per_level, rounds_per_level=rounds_per_level,
                             out_dir=out / "perf_analyzer", profile_export=True, on_level=on_level, tag=mode)
    data.unlink()  # the clips as base64: large and reproducible
    points = []
    for row in rows:
        c = row["concurrency"]
        # perf_analyzer's own window (and CSV throughput) is in whole seconds: use the requests' span instead
        summary = metrics.summarize(row["records"])
        split = stats.stage_split(stats.diff(snaps[(c, "before")], snaps[(c, "after")]), ensemble=ENSEMBLE,
                                  stages=STAGES)
        lat = summary.get("latency_mean_ms")
        points.append({"concurrency": c, "mode": mode, "tool": "perf_analyzer 2.51 (profile export)",
                       **summary, "split": split,
                       "cpu": machine.busy_cores(snaps[(c, "before", "cpu")], snaps[(c, "after", "cpu")]),
                       "overhead_mean": stats.overhead(split, client_latency_ms=lat),
                       "perf_analyzer_csv": {k: v for k, v in row.items() if k not in ("records", "raw")}})
        points[-1]["perf_analyzer_csv"]["window_s"] = row.get("window_s")
        log.info("%s c=%d: %.2f req/s, %.1f tok/s, p50 %.0f ms, TTFT p50 %.0f ms", mode, c,
                 summary.get("throughput_rps", 0), summary.get("output_tokens_per_s", 0),
                 (summary.get("latency_ms") or {}).get("p50") or 0, (summary.get("ttft_ms") or {}).get("p50") or 0)
    return points
