"""The side-by-side comparison that `af3trt bench` leads with: af3trt against transformers on the same checkpoint, the
same clips, in one run, medians of three interleaved rounds.

    (a) burst   8 distinct spoken clips of 7-10 s (espeak-ng, perf/clips.spoken_clips) sent at once; wall time from
                the first send to the last answer (our own gRPC client, one thread per request)
    (b) steady  closed loop at concurrency 8 over the same clips (perf_analyzer 2.51, profile export)
    each against
        transformers one-at-a-time   the 8 clips through generate one after another: 8 / summed seconds
        transformers batched         one generate call over the 8 clips (its own left-padded batching)

The rounds interleave af3trt and transformers, so a neighbour's load on the shared machine hits both alike. Every
figure carries req/s, output tokens/s and RTFx (seconds of audio processed per wall-clock second, as audio-serving
benchmarks report it: vllm bench serve's openai-audio backend, AIPerf).

Also here: TTFT at concurrency 1 for a 5-s clip (streaming) and encoder milliseconds against clip seconds (Triton's
statistics of the encoder model around requests at concurrency 1), for the cropped build and the full-window
ablation, which is what af3trt did before windows were cropped to their frame bucket.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from af3trt.build.tables import BLANK, Column, Text, markdown_table
from af3trt.perf import clips as clipgen
from af3trt.perf import metrics, stats
from af3trt.perf.loadgen import run_load
from af3trt.perf.measure import probe_requests, sweep_perf_analyzer
from af3trt.runtime.stages import lengths
from af3trt.runtime.stages.contract import ENSEMBLE, STAGES

log = logging.getLogger("af3trt.bench")

PROMPT = "Transcribe the input speech."
TARGET_VS_SEQUENTIAL = 3.0
TARGET_VS_BATCHED = 1.5
ENCODER_SECONDS = (1, 2, 3, 5, 8, 10, 15, 20, 25, 30)  # the encoder-cost curve's clip lengths


def items_of(spoken: list[tuple[float, bytes]]) -> list[tuple[str, bytes]]:
    return [(PROMPT, clip) for _, clip in spoken]


def _point(name: str, seconds: float, requests: int, tokens: int, audio_s: float, tool: str, **extra) -> dict:
    return {"name": name, "seconds": seconds, "requests": requests, "tokens": tokens, "audio_s": audio_s,
            "throughput_rps": requests / seconds, "output_tokens_per_s": tokens / seconds,
            "rtfx": audio_s / seconds, "tool": tool, **extra}


# ------------------------------------------------------------------------------------------------ af3trt

def burst(url: str, spoken: list[tuple[float, bytes]], max_tokens: int) -> dict:
    """All clips at once (one client thread each); the window runs from the first send to the last answer."""
    before = stats.snapshot(url)
    records, _ = run_load(url, items_of(spoken), concurrency=len(spoken), requests=len(spoken),
                          max_tokens=max_tokens, stream=False)
    split = stats.stage_split(stats.diff(before, stats.snapshot(url)), ensemble=ENSEMBLE, stages=STAGES)
    ok = [r for r in records if r.ok]
    if len(ok) != len(records):
        raise RuntimeError(f"burst: {len(records) - len(ok)} of {len(records)} requests failed: "
                           f"{next(r.error for r in records if not r.ok)}")
    window = max(r.end_s for r in ok) - min(r.start_s for r in ok)
    return _point("burst", window, len(ok), sum(r.tokens for r in ok), sum(s for s, _ in spoken),
                  "af3trt client (gRPC, one thread per request, all sent at once)",
                  latency_ms=metrics.summarize(ok)["latency_ms"], split=split)


def steady(url: str, spoken: list[tuple[float, bytes]], max_tokens: int, concurrency: int, out: Path,
           requests: int, server_pid: int | None) -> dict:
    """perf_analyzer at one concurrency level over the clips (measure.sweep_perf_analyzer at that level)."""
    (p,) = sweep_perf_analyzer(url, items_of(spoken), out, "nonstream", server_pid, concurrency=[concurrency],
                               max_tokens=max_tokens, requests_per_level=requests,
                               rounds_per_level=max(1, requests // concurrency))
    if p.get("errors") or "throughput_rps" not in p:
        raise RuntimeError(f"steady c={concurrency}: {p.get('errors')} errors")
    mean_audio = float(np.mean([s for s, _ in spoken]))  # perf_analyzer cycles over the clips
    rps = p["throughput_rps"]
    return {"name": f"steady c={concurrency}", "seconds": p["window_s"], "requests": p["requests"],
            "throughput_rps": rps, "output_tokens_per_s": p["output_tokens_per_s"], "rtfx": rps * mean_audio,
            "latency_ms": p["latency_ms"], "tool": p["tool"], "split": p["split"]}


def ttft_c1(url: str, clip: bytes, requests: int, max_tokens: int) -> dict:
    """Streaming requests one at a time on one open stream: TTFT and the Triton stage split of each."""
    probes = probe_requests(url, [(PROMPT, clip)] * requests, max_tokens=max_tokens, stream=True)
    ok = [p for p in probes if p["ttft_ms"] is not None]
    enc, pre = _stage_ms(ok, "encoder", "compute_infer_ms"), _stage_ms(ok, "preprocess", "critical_ms")
    return {"requests": len(probes), "errors": len(probes) - len(ok),
            "ttft_ms": metrics.percentiles([p["ttft_ms"] for p in ok]),
            "encoder_ms_p50": float(np.median(enc)) if enc else None,
            "preprocess_ms_p50": float(np.median(pre)) if pre else None,
            "tool": "one open gRPC stream, streaming, c=1, Triton statistics around each request"}


def _stage_ms(probes: list[dict], stage: str, key: str) -> list[float]:
    """One stage's figure from each probe whose statistics caught its request (a snapshot taken as the response
    arrives can miss it: that probe's split is empty)."""
    return [p["split"]["stages"][stage][key] for p in probes if stage in (p["split"] or {}).get("stages", {})]


def encoder_curve(url: str, seconds: tuple[float, ...], requests: int) -> list[dict]:
    """Encoder compute ms (Triton statistics) of one request at c=1 per clip length (speech, 1 token); the first
    request of each length is a warm-up (ONNX Runtime plans its buffers on a new input shape) and not counted."""
    rows = []
    for s in seconds:
        clip = clipgen.make_clip(clipgen.ClipSpec("speech", float(s)), seed=int(s))
        probes = probe_requests(url, [(PROMPT, clip)] * (requests + 1), max_tokens=1, stream=False)[1:]
        enc = _stage_ms([p for p in probes if p["latency_ms"] is not None], "encoder", "compute_infer_ms")
        frames = lengths.encoded_frames_for_samples(int(s * lengths.SAMPLE_RATE))
        rows.append({"seconds": float(s), "encoded_frames": frames,
                     "encoder_ms": float(np.median(enc)) if enc else None, "requests": len(enc)})
        log.info("encoder %g s clip (%s frames): %.1f ms", s, frames, rows[-1]["encoder_ms"] or float("nan"))
    return rows


# ------------------------------------------------------------------------------------------------ transformers

def baseline_round(ref, spoken: list[tuple[float, bytes]], max_tokens: int) -> dict:
    """transformers one-at-a-time over the clips, then one batched generate over all of them."""
    items = items_of(spoken)
    audio_s = sum(s for s, _ in spoken)
    seq = ref.sequential(items, len(items), max_tokens)
    seq_s = float(sum(seq["seconds"]))
    batched = ref.batched(items, len(items), max_tokens)
    tool = f"transformers generate in the bench process ({ref.threads} torch threads)"
    return {"sequential": _point("transformers one-at-a-time", seq_s, len(items), sum(seq["tokens"]), audio_s,
                                 tool, ids=seq["ids"]),
            "batched": _point(f"transformers batched generate ({len(items)})", batched["seconds"], len(items),
                              sum(batched["tokens"]), audio_s, tool)}


# ------------------------------------------------------------------------------------------------ rounds

def run_rounds(url: str, ref, spoken: list[tuple[float, bytes]], *, rounds: int, max_tokens: int,
               concurrency: int, steady_requests: int, out: Path, server_pid: int | None) -> dict:
    """`rounds` interleaved rounds of (a) burst, (b) steady, transformers sequential and batched."""
    runs: dict[str, list[dict]] = {"burst": [], "steady": [], "sequential": [], "batched": []}
    baseline_round(ref, spoken, max_tokens)  # warm-up, not counted: af3trt's warm-up also ran every clip
    for i in range(rounds):
        runs["burst"].append(burst(url, spoken, max_tokens))
        runs["steady"].append(steady(url, spoken, max_tokens, concurrency, out / f"steady-{i}", steady_requests,
                                     server_pid))
        base = baseline_round(ref, spoken, max_tokens)
        runs["sequential"].append(base["sequential"])
        runs["batched"].append(base["batched"])
        log.info("round %d: burst %.2f req/s, steady %.2f req/s; transformers one-at-a-time %.2f, batched %.2f", i + 1,
                 *(runs[k][-1]["throughput_rps"] for k in ("burst", "steady", "sequential", "batched")))
    return {"rounds": rounds, "runs": runs, "medians": medians(runs), "clips_s": [s for s, _ in spoken],
            "max_tokens": max_tokens, "concurrency": concurrency}


def medians(runs: dict[str, list[dict]]) -> dict:
    """Per measurement: the median of each rate over the rounds; per af3trt scenario, its ratios to transformers."""
    med = {k: {m: float(np.median([r[m] for r in v])) for m in ("throughput_rps", "output_tokens_per_s", "rtfx")}
           for k, v in runs.items() if v}
    for k in ("burst", "steady"):
        if k in med and "sequential" in med and "batched" in med:
            med[k]["vs_sequential"] = med[k]["throughput_rps"] / med["sequential"]["throughput_rps"]
            med[k]["vs_batched"] = med[k]["throughput_rps"] / med["batched"]["throughput_rps"]
    return med


def targets(compare: dict) -> dict[str, bool | None]:
    """The issue's targets, each True / False / None (not measured)."""
    med = (compare.get("rounds") or {}).get("medians") or {}
    out = {}
    for k, label in (("burst", "(a) burst of 8"), ("steady", "(b) steady c=8")):
        m = med.get(k) or {}
        out[f"{label} >= {TARGET_VS_SEQUENTIAL:g}x transformers one-at-a-time"] = \
            None if "vs_sequential" not in m else m["vs_sequential"] >= TARGET_VS_SEQUENTIAL
        out[f"{label} >= {TARGET_VS_BATCHED:g}x transformers batched"] = \
            None if "vs_batched" not in m else m["vs_batched"] >= TARGET_VS_BATCHED
    now, before = ((compare.get("ttft") or {}).get("p50_ms"), (compare.get("full_window") or {}).get("ttft_p50_ms"))
    out["TTFT p50 at c=1, 5-s clip <= half of full windows"] = None if now is None or before is None \
        else now <= 0.5 * before
    return out


# ------------------------------------------------------------------------------------------------ report

def _f(v, fmt="{:.2f}") -> str:
    return "—" if v is None else fmt.format(v)


HEADLINE = [Column("", "label"), Column("req/s", "throughput_rps", "{:.2f}", right=True),
            Column("tokens/s", "output_tokens_per_s", "{:.1f}", right=True),
            Column("RTFx", "rtfx", "{:.1f}", right=True),
            Column("vs transformers one-at-a-time", "vs_sequential", "**{:.2f}x**", right=True),
            Column("vs transformers batched", "vs_batched", "**{:.2f}x**", right=True),
            Column("runs (req/s)", lambda m: ", ".join(f"{x['throughput_rps']:.2f}" for x in m["runs"]))]
BATCHING = [Column("", "label"), Column("burst req/s", ("burst", "throughput_rps"), "{:.2f}", right=True),
            Column("burst encoder", lambda r: _stage(r["burst"].get("split"), "encoder")),
            Column("steady c=8 req/s", ("steady", "throughput_rps"), "{:.2f}", right=True),
            Column("steady encoder", lambda r: _stage(r["steady"].get("split"), "encoder"))]


def render(compare: dict, isa: str | None) -> list[str]:
    """Markdown lines for the top of report.md."""
    r = compare.get("rounds") or {}
    med, runs = r.get("medians") or {}, r.get("runs") or {}
    if not med:
        return []
    clips = r.get("clips_s") or []
    lines = [f"### af3trt vs transformers, same run (medians of {r.get('rounds')} interleaved rounds)", "",
             f"{len(clips)} distinct spoken clips (espeak-ng) of {min(clips):.0f}-{max(clips):.0f} s, "
             f"{r.get('max_tokens')} output tokens, greedy; CPU ISA: **{isa or 'unknown'}**. RTFx = seconds of audio "
             "processed per wall-clock second.", "",
             *markdown_table(HEADLINE, [{**med[k], "label": label, "runs": runs.get(k, [])}
                                        for k, label in _labels(r).items() if med.get(k)])]
    t, fw = compare.get("ttft") or {}, compare.get("full_window") or {}
    lines += ["", f"- TTFT p50 at c=1, 5-s clip, streaming: **{_f(t.get('p50_ms'), '{:.0f}')} ms** (encoder "
                  f"{_f(t.get('encoder_ms_p50'), '{:.1f}')} ms); with full 30-s windows (the ablation build, as "
                  f"before this change): {_f(fw.get('ttft_p50_ms'), '{:.0f}')} ms (encoder "
                  f"{_f(fw.get('encoder_ms_p50'), '{:.1f}')} ms)."]
    for name, met in targets(compare).items():
        lines.append(f"- Target {name}: {'met' if met else 'NOT met' if met is not None else 'not measured'}.")
    for key, what in (("full_window", "full-window"), ("batching", "encoder-batching")):
        if (compare.get(key) or {}).get("error"):
            lines.append(f"- The {what} ablation failed: {compare[key]['error']} (see {compare[key].get('server_log')}).")
    lines += _batching_lines(compare)
    curve = compare.get("encoder_curve") or []
    if curve:
        lines += ["", "Encoder compute per request at c=1 (Triton statistics) against clip length:", "",
                  *_encoder_curve_table(curve, fw.get("encoder_curve") or [])]
    return lines


def _labels(rounds: dict) -> dict[str, str]:
    return {"burst": "(a) af3trt, burst of 8",
            "steady": f"(b) af3trt, steady c={rounds.get('concurrency')} (perf_analyzer)",
            "sequential": "transformers one-at-a-time", "batched": "transformers batched generate (8)"}


def _encoder_curve_table(curve: list[dict], full: list[dict]) -> list[str]:
    """Clip lengths across, one row per figure: frames encoded, encoder ms (and with full windows, when measured)."""
    rows = [{"what": "frames encoded", "cells": [Text("+".join(map(str, c["encoded_frames"]))) for c in curve]},
            {"what": "encoder ms", "cells": [c.get("encoder_ms") for c in curve]}]
    if full:
        rows.append({"what": "encoder ms, full windows", "cells": [c.get("encoder_ms") for c in full]})
    return markdown_table([Column("clip s", "what")] + [
        Column(f"{c['seconds']:g}", lambda r, i=i: r["cells"][i] if i < len(r["cells"]) else BLANK, "{:.1f}",
               right=True)
        for i, c in enumerate(curve)], rows)


def _stage(split: dict, name: str) -> str:
    st = (split or {}).get("stages", {}).get(name)
    return "—" if not st else f"{st['queue_ms']:.0f} queue + {st['compute_ms']:.0f} compute"


def _batching_lines(compare: dict) -> list[str]:
    """The encoder-batching ablation beside the main build's median round (one run each)."""
    b = compare.get("batching")
    runs = (compare.get("rounds") or {}).get("runs") or {}
    if not b or b.get("error") or not runs.get("burst"):
        return []
    main_on = not b["encoder_batching"]

    def mid(k):
        xs = sorted(runs.get(k) or [], key=lambda r: r["throughput_rps"])
        return xs[len(xs) // 2] if xs else None

    rows = [{"label": label, "burst": bu, "steady": st} for label, bu, st in (
        (f"batching {'on' if main_on else 'off'} (main, median round)", mid("burst"), mid("steady")),
        (f"batching {'on' if b['encoder_batching'] else 'off'} (ablation, one run)", b.get("burst"), b.get("steady")))
        if bu and st]
    return ["", f"Encoder dynamic batching across requests (Triton batches only equal [128, T], so per frame bucket): "
                f"main build {'on' if main_on else 'off'}, ablation build {'on' if b['encoder_batching'] else 'off'}"
                f" (queue delay {b['queue_delay_us']} us). Encoder ms per request (Triton statistics):", "",
            *markdown_table(BATCHING, rows)]


def plot_encoder_curve(compare: dict, out: Path) -> str | None:
    curve = [c for c in compare.get("encoder_curve") or [] if c.get("encoder_ms") is not None]
    if not curve:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    x, y = [c["seconds"] for c in curve], [c["encoder_ms"] for c in curve]
    ax.plot(x, y, "o-", label="cropped to the frame bucket (this build)")
    full = [c for c in (compare.get("full_window") or {}).get("encoder_curve") or [] if c.get("encoder_ms")]
    if full:
        ax.plot([c["seconds"] for c in full], [c["encoder_ms"] for c in full], "s--", label="full 30-s windows")
    ax.set_xlabel("clip seconds")
    ax.set_ylabel("encoder ms per request (c=1)")
    ax.set_title("Encoder cost follows the valid audio")
    ax.set_xlim(0, max(x) + 1)
    ax.set_ylim(0, None)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    name = "encoder_ms_vs_clip_seconds.png"
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name
