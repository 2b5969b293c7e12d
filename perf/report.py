"""results.json → report.md and PNG plots. `headline` and `render_markdown` are pure (unit-tested on a fake
results dict); `write_report` adds the plots (matplotlib, Agg)."""

from __future__ import annotations

import json
from pathlib import Path

from af3trt.build.tables import BLANK, MISSING, Column, Text, cell, markdown_table
from af3trt.perf import compare, metrics
from af3trt.runtime.stages.contract import STAGES

TARGET_RATIO = 3.0  # throughput at c=8 over transformers one request at a time
TARGET_OVERHEAD_MS = 5.0  # p50 per request of everything but encoder and decoder compute
STAGE_ORDER = STAGES  # the tables list the stages in the ensemble's order


# ------------------------------------------------------------------------------------------------ figures

def point_at(points: list[dict], concurrency: int) -> dict | None:
    exact = [p for p in points if p.get("concurrency") == concurrency]
    return exact[0] if exact else None


def headline(results: dict, level: int = 8) -> dict:
    """The figures the issue asks for, with the tool behind each."""
    out: dict = {"level": level}
    base = results.get("baseline") or {}
    seq = (base.get("sequential") or {}).get("points") or []
    seq_rps = seq[0]["throughput_rps"] if seq else None
    out["baseline_sequential_rps"] = seq_rps
    batched = point_at(base.get("batched") or [], level)
    out["baseline_batched_rps"] = batched["throughput_rps"] if batched else None
    for mode, points in (results.get("sweeps") or {}).items():
        p = point_at(points, level)
        if not p or "throughput_rps" not in p:
            continue
        fig = {"throughput_rps": p["throughput_rps"], "output_tokens_per_s": p.get("output_tokens_per_s"),
               "latency_ms": p.get("latency_ms"), "ttft_ms": p.get("ttft_ms"), "itl_ms": p.get("itl_ms"),
               "tool": p.get("tool")}
        if seq_rps:
            fig["ratio_vs_sequential"] = p["throughput_rps"] / seq_rps
        if batched:
            fig["ratio_vs_batched"] = p["throughput_rps"] / batched["throughput_rps"]
        out[mode] = fig
    ab = results.get("ablation") or {}
    abp = point_at(ab.get("nonstream") or [], level)
    if abp and seq_rps:
        out["ablation"] = {"encoder_precision": ab.get("encoder_precision"), "throughput_rps": abp["throughput_rps"],
                           "ratio_vs_sequential": abp["throughput_rps"] / seq_rps,
                           "agreement_with_transformers": ab.get("agreement_with_transformers")}
    stream = (results.get("sweeps") or {}).get("stream") or []
    out["streaming"] = {f"c{p['concurrency']}": {"ttft_ms": p.get("ttft_ms"), "itl_ms": p.get("itl_ms")}
                        for p in stream if p.get("concurrency") in (1, level)}
    probe = results.get("overhead_probe") or {}
    out["overhead_ms_p50"] = probe.get("overhead_ms_p50")
    out["overhead_without_features_ms_p50"] = probe.get("overhead_without_features_ms_p50")
    nonstream = point_at((results.get("sweeps") or {}).get("nonstream") or [], level)
    if nonstream and nonstream.get("split"):
        out["stage_split_ms"] = stage_rows(nonstream["split"])
    ratio = (out.get("nonstream") or out.get("stream") or {}).get("ratio_vs_sequential")
    out["targets"] = {
        f"throughput at c={level} >= {TARGET_RATIO:g}x transformers sequential":
            None if ratio is None else ratio >= TARGET_RATIO,
        f"overhead p50 <= {TARGET_OVERHEAD_MS:g} ms":
            None if out["overhead_ms_p50"] is None else out["overhead_ms_p50"] <= TARGET_OVERHEAD_MS,
    }
    out["scaling"] = scaling(results)
    return out


def stage_rows(split: dict) -> dict:
    """ms per request on the critical path: queue / compute per stage, the decoder's derived generation."""
    st = split.get("stages", {})
    rows = {}
    for name in STAGE_ORDER:
        if name not in st:
            continue
        r = st[name]
        row = {"queue_ms": r["queue_ms"], "compute_ms": r["compute_ms"], "busy_ms": r["busy_ms"]}
        if name == "decoder":
            row["generation_ms (derived)"] = split.get("decoder_generation_ms")
        if "critical_ms" in r and name == "postprocess":
            row["per_response_ms"] = r["critical_ms"]
            row["responses_per_request"] = r["inferences_per_request"]
        rows[name] = row
    rows["ensemble_ms"] = split.get("ensemble_ms")
    return rows


def scaling(results: dict) -> dict:
    """Growth of encoder, decoder and end-to-end cost with audio windows (speech clips), and with output length."""
    out = {}
    rows = sorted((r for r in results.get("lengths") or [] if r.get("kind") == "speech" and r.get("latency_ms")),
                  key=lambda r: r["windows"])
    if len(rows) >= 2:
        w = [r["windows"] for r in rows]
        for key in ("encoder_ms", "preprocess_ms", "decoder_ms", "latency_ms"):
            y = [r.get(key) for r in rows]
            if None in y:
                continue
            fit = metrics.fit_linear(w, y)
            fit["exponent"] = metrics.growth_exponent(w, y)
            fit["quadratic_share"] = metrics.quadratic_share(w, y)
            fit["verdict"] = verdict(fit, max(w))
            out[f"{key} vs windows"] = {"x": w, "y": y, **fit}
    outs = [r for r in results.get("output_lengths") or [] if r.get("latency_ms") and r.get("tokens")]
    if len(outs) >= 2:
        x, y = [r["tokens"] for r in outs], [r["latency_ms"] for r in outs]
        fit = metrics.fit_linear(x, y)
        fit["exponent"] = None
        fit["verdict"] = "linear" if (fit["r2"] or 0) > 0.98 else "not linear"
        out["latency_ms vs output tokens"] = {"x": x, "y": y, **fit}
    return out


def verdict(fit: dict, top: int) -> str:
    """Linear when a line explains the points and a quadratic term would add under 10 % at the largest size."""
    q, r2 = fit.get("quadratic_share"), fit.get("r2")
    if r2 is None:
        return "—"
    if q is None:
        return "linear" if r2 > 0.98 else "not linear"
    if abs(q) < 0.10 and r2 > 0.98:
        return "linear"
    if q > 0:
        return f"superlinear: a quadratic term is {q:.0%} of the cost at {top} windows"
    return f"sublinear: {-q:.0%} below the line at {top} windows (a fixed cost dominates short clips)"


# ------------------------------------------------------------------------------------------------ markdown

def _f(v, fmt="{:.1f}") -> str:
    return cell(v, fmt)


def _pct(d: dict | None, key: str) -> str:
    return _f((d or {}).get(key), "{:.0f}")


def _cpu(c: dict) -> str:
    """Cores busy on the machine / of which the server's process tree."""
    if not c:
        return MISSING
    return f"{c['machine_busy_cores']:.2f} / {_f(c.get('server_cores'), '{:.2f}')}"


# report.md's tables (build/tables.py writes them), over the records of results.json: a sweep point, a length-study
# row, … The columns several tables share:
C = Column("c", "concurrency", right=True)
RPS = Column("req/s", "throughput_rps", "{:.2f}", right=True)
TOKENS_S = Column("tokens/s", "output_tokens_per_s", "{:.1f}", right=True)


def _num(header: str, value, fmt: str = "{:.0f}") -> Column:
    """A right-aligned number (ms unless the header says otherwise)."""
    return Column(header, value, fmt, right=True)


SWEEP = [Column("mode"), C, RPS, TOKENS_S, _num("latency p50", ("latency_ms", "p50")),
         _num("p90", ("latency_ms", "p90")), _num("p99", ("latency_ms", "p99")), _num("TTFT p50", ("ttft_ms", "p50")),
         _num("p99", ("ttft_ms", "p99")), _num("ITL p50", ("itl_ms", "p50"), "{:.1f}"),
         _num("p99", ("itl_ms", "p99"), "{:.1f}"), Column("n", "requests", right=True), Column("CPU", "cpu", _cpu)]
CLIENT_SWEEP = [C, RPS, TOKENS_S, _num("latency p50", ("latency_ms", "p50")), _num("TTFT p50", ("ttft_ms", "p50")),
                _num("TTFT p99", ("ttft_ms", "p99")), _num("ITL p50", ("itl_ms", "p50"), "{:.1f}"),
                _num("ITL p99", ("itl_ms", "p99"), "{:.1f}"), Column("n", "requests", right=True)]


def _queue_compute(name: str, busy: bool = False) -> Column:
    """A stage's 'queue / compute' ms of a sweep point's split (and its busy ms)."""
    def qc(p):
        r = p["split"]["stages"].get(name)
        if not r:
            return None
        return f"{r['queue_ms']:.1f} / {r['compute_ms']:.1f}" + (f" ({r['busy_ms']:.0f})" if busy else "")
    return Column(f"{name} q/c" + (" (busy)" if busy else ""), qc)


def _per_response(p: dict) -> str:
    post = p["split"]["stages"].get("postprocess", {})
    return f"{_f(post.get('critical_ms'))} x {_f(post.get('inferences_per_request'), '{:.0f}')}"


STAGE_SPLIT = [Column("mode"), C, _queue_compute("preprocess"), _queue_compute("encoder", busy=True),
               _queue_compute("fusion"), _queue_compute("decoder"),
               _num("decoder generation (derived)", ("split", "decoder_generation_ms")),
               Column("postprocess per response", _per_response), _num("ensemble", ("split", "ensemble_ms"))]
OVERHEAD = [Column("part"), Column("ms p50", "ms", right=True)]  # cells written by _overhead_lines (formats per row)
LENGTHS = [Column("clip"), Column("windows", right=True), _num("e2e ms", "latency_ms"), _num("TTFT ms", "ttft_ms"),
           _num("preprocess", "preprocess_ms", "{:.1f}"), _num("encoder compute", "encoder_ms"),
           _num("decoder (derived)", "decoder_ms"), _num("tokens", "tokens"),
           _num("transformers e2e ms", "transformers_ms")]
SCALING = [Column("cost", "name"), Column("x"), _num("intercept", "intercept", "{:.1f}"),
           _num("slope", "slope", "{:.2f}"), _num("R²", "r2", "{:.3f}"), _num("exponent", "exponent", "{:.2f}"),
           _num("quadratic share at max", "quadratic_share", "{:.0%}"), Column("verdict")]
WINDOWS = [Column("windows", right=True), _num("encoder ms", "encoder_ms"),
           _num("encoder ms / window", lambda r: r["encoder_ms"] / r["windows"]),
           _num("decoder ms (derived)", "decoder_ms"), _num("e2e ms", "latency_ms")]
OUTPUT_LENGTHS = [Column("max_tokens", right=True), _num("tokens", "tokens"), _num("e2e ms", "latency_ms"),
                  _num("TTFT ms", "ttft_ms"), _num("ITL p50 ms", "itl_ms_p50", "{:.1f}"),
                  _num("decoder (derived)", "decoder_ms")]
THINKING = [Column("mode"), Column("n", "requests", right=True), Column("errors", right=True),
            _num("tokens p50", "tokens"), _num("latency p50", "latency_ms", "{:.1f}"),
            _num("TTFT p50", "ttft_ms", "{:.1f}"), _num("encoder", "encoder_ms", "{:.1f}"),
            _num("decoder", "decoder_ms", "{:.1f}")]
RUN_TIME = [Column("phase"), _num("s", "s")]


def render_markdown(results: dict, plots: list[str] = ()) -> str:
    """report.md of a results.json record: one section after the other, as the report reads."""
    h = results.get("derived") or headline(results)
    lines = [*_title_lines(results), *_headline_section(results, h), *_setup_lines(results), *_sweep_lines(results),
             *_ratio_lines(results), *_ablation_lines(results), *_client_sweep_lines(results),
             *_thinking_lines(results), *_stage_split_lines(results), *_overhead_lines(results),
             *_audio_length_lines(results), *_scaling_lines(results, h), *_output_length_lines(results)]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    if results.get("projection"):
        from af3trt.perf.projection import render_markdown as proj_md

        lines += ["", proj_md(results["projection"])]
    ph = results.get("phase_seconds") or {}
    if ph:
        lines += ["", "## Run time", "", *markdown_table(RUN_TIME, [
            *({"phase": k, "s": v} for k, v in ph.items()),
            {"phase": "**total**", "s": Text(f"**{_f(results.get('total_seconds'), '{:.0f}')}**")}])]
    return "\n".join(lines) + "\n"


def _title_lines(results: dict) -> list[str]:
    m, ck = results.get("machine", {}), results.get("checkpoint", {})
    return ["# af3trt benchmark", "",
            f"Run {results.get('started_utc')} on {m.get('cpu', {}).get('Model name', '?')} "
            f"({m.get('logical_cpus')} logical CPUs, {_f((m.get('ram_bytes') or 0) / 2**30, '{:.0f}')} GiB RAM, "
            f"GPU: {m.get('gpus') or 'none'}); commit {m.get('commit')}. Model: {ck.get('label')} "
            f"({_params(ck)}). Load average at start / end: {results.get('load_average_start')} / "
            f"{results.get('load_average_end')} — other work shares this machine, so figures are medians and "
            f"ratios measured side by side in this one run. Total run time "
            f"{_f(results.get('total_seconds'), '{:.0f}')} s.",
            ""]


def _headline_section(results: dict, h: dict) -> list[str]:
    lines = ["## Headline", ""]
    lines += compare.render(results.get("compare") or {}, results.get("machine", {}).get("cpu", {}).get("isa"))
    if results.get("compare"):
        lines += ["", "### Sweep figures"]
    return lines + _headline_lines(h)


def _setup_lines(results: dict) -> list[str]:
    m, repo = results.get("machine", {}), results.get("repository", {})
    lines = ["", "## Setup", "",
             f"- Repository: `{Path(repo['path']).name if repo.get('path') else None}` (target {repo.get('target')}); "
             f"precisions "
             f"`{json.dumps(repo.get('precisions'))}`; serving settings `{json.dumps(repo.get('spec'))}`.",
             f"- Sweep inputs: {len(results.get('inputs') or [])} (clip, prompt) pairs "
             f"({', '.join(sorted({i['clip'] for i in results.get('inputs') or []}))}), "
             f"max_tokens {results.get('args', {}).get('max_tokens')}, greedy.",
             f"- Versions: `{json.dumps(m.get('versions'))}`.",
             f"- CPU: `{json.dumps(m.get('cpu'))}`.", ""]
    enc_val = (repo.get("validation") or {}).get("encoder_int8")
    if enc_val:
        lines += [f"- INT8 encoder accuracy (build validation against the fp32 ONNX on 3 windows): cosine "
                  f"{enc_val.get('cosine'):.5f}, worst row cosine {enc_val.get('min_row_cosine'):.5f}, max abs diff "
                  f"{enc_val.get('max_abs_diff'):.3g} (of max {enc_val.get('max_abs_ref'):.3g}).", ""]
    agree = (results.get("baseline") or {}).get("agreement")
    if agree:
        lines += [f"- Output agreement with transformers (same inputs, greedy): {agree['pairs']} requests, "
                  f"identical ids {agree['exact']:.0%}, mean shared prefix {agree['prefix']:.0%}.", ""]
    return lines


def _sweep_lines(results: dict) -> list[str]:
    """perf_analyzer's points of every mode, then transformers' (sequential, batched) in the same columns."""
    base = results.get("baseline") or {}
    points = [{**p, "mode": mode} for mode, pts in (results.get("sweeps") or {}).items() for p in pts]
    lines = ["## Throughput and latency vs concurrency", "",
             "Tool: perf_analyzer 2.51 (C++, gRPC streaming, fixed request count per level); every figure from its "
             "per-request profile export (latency to the last response, TTFT to the first token-bearing one). "
             "Baseline rows: transformers in this process.", "",
             "CPU: cores busy on the whole machine during the level / of which the tritonserver process tree "
             "(anything above the second figure is other work on this shared machine).", "",
             *markdown_table(SWEEP, points + _baseline_rows(base))]
    if base:
        lines += ["", f"Baseline: torch threads {base.get('threads')} (the faster of "
                      f"{', '.join(base.get('thread_calibration_s', {}))} on a warm request: "
                      f"{json.dumps({k: round(v, 2) for k, v in base.get('thread_calibration_s', {}).items()})} s). "
                      "Sequential: one request at a time; its throughput does not depend on concurrency and its "
                      "latency at c > 1 is derived as c x service time. Batched: one generate call over c requests "
                      "(processor padding), all finishing together."]
    return lines


def _baseline_rows(base: dict) -> list[dict]:
    """transformers' points as sweep rows: what it does not measure left blank."""
    unmeasured = {"ttft_ms": BLANK, "itl_ms": BLANK, "requests": BLANK, "cpu": BLANK}
    rows = [{**p, **unmeasured, "mode": "transformers sequential" + (" (latency derived)" if p.get("derived") else "")}
            for p in (base.get("sequential") or {}).get("points") or []]
    rows += [{**p, **unmeasured, "mode": "transformers batched generate", "requests": Text("1 batch"),
              "latency_ms": {"p50": p["latency_ms"]["p50"], "p90": BLANK, "p99": BLANK}}
             for p in base.get("batched") or []]
    return rows


def _client_sweep_lines(results: dict) -> list[str]:
    cs = results.get("client_sweep") or []
    if not cs:
        return []
    return ["", "### Cross-check with our own streaming client", "",
            f"Tool: {cs[0]['tool']}; it opens a gRPC stream per request.", "", *markdown_table(CLIENT_SWEEP, cs)]


def _stage_split_lines(results: dict) -> list[str]:
    points = [{**p, "mode": mode} for mode, pts in (results.get("sweeps") or {}).items() for p in pts
              if (p.get("split") or {}).get("stages")]
    return ["", "## Per-stage split", "",
            "Tool: Triton statistics API (gRPC `get_inference_statistics`), diffed before/after each point; ms per "
            "ensemble request. queue / compute: the stage's share of a request's latency (a batch's compute is "
            "charged to each request in it); busy: the stage's execution time per request (bounds throughput). "
            "The decoder is decoupled: its counters hold only the hand-over to the in-flight batcher, so its "
            "generation time is derived (ensemble request time minus the other stages). postprocess runs once per "
            "response.", "", *markdown_table(STAGE_SPLIT, points)]


def _overhead_lines(results: dict) -> list[str]:
    probe = results.get("overhead_probe") or {}
    if not probe:
        return []
    rows = [{"part": f"{k}{' (audio decode + log-mel + I/O)' if k == 'preprocess' else ''}", "ms": f"{v:.2f}"}
            for k, v in (probe.get("parts_ms_p50") or {}).items()]
    rows += [{"part": "transport", "ms": _f(probe.get("transport_ms_p50"), "{:.2f}")},
             {"part": "**total**", "ms": f"**{_f(probe.get('overhead_ms_p50'), '{:.2f}')}**"},
             {"part": "total without log-mel/decoding compute",
              "ms": _f(probe.get("overhead_without_features_ms_p50"), "{:.2f}")},
             {"part": "(encoder compute_infer)", "ms": _f(probe.get("encoder_ms_p50"))},
             {"part": "(decoder generation, derived)", "ms": _f(probe.get("decoder_ms_p50"))},
             {"part": "(client latency)", "ms": _f(probe.get("latency_ms_p50"))}]
    lines = ["", "## Overhead outside encoder and decoder compute (c=1)", "",
             f"Tool: {probe.get('tool')}; {probe.get('requests')} non-streaming requests. Per request: every "
             "stage's queue and compute except the encoder's compute_infer and the decoder's generation, plus "
             "transport (client latency minus the ensemble's request time: gRPC, serialization, our client's "
             "stream set-up). Medians:", "", *markdown_table(OVERHEAD, rows)]
    pa = point_at((results.get("sweeps") or {}).get("nonstream") or [], 1)
    ov = (pa or {}).get("overhead_mean") or {}
    if ov:
        lines += ["", f"Cross-check with perf_analyzer at c=1 (non-streaming, means over the level): total "
                      f"{_f(ov.get('total_ms'), '{:.2f}')} ms, of which transport "
                      f"{_f(ov.get('transport_ms'), '{:.2f}')} ms and audio decoding + log-mel "
                      f"{_f(ov.get('features_ms'), '{:.2f}')} ms."]
    return lines


def _audio_length_lines(results: dict) -> list[str]:
    rows = results.get("lengths") or []
    if not rows:
        return []
    base = {r["clip"]: r for r in ((results.get("baseline") or {}).get("lengths") or [])}
    return ["", "## Latency vs audio length (c=1, streaming)", "",
            f"Tool: {rows[0]['tool']}; medians of {results.get('args', {}).get('length_repeats')} requests "
            "per clip up to 2 min, 1 above. Baseline: transformers, one request.", "",
            *markdown_table(LENGTHS, [{**r, "transformers_ms": base.get(r["clip"], {}).get("latency_ms")}
                                      for r in rows])]


def _scaling_lines(results: dict, h: dict) -> list[str]:
    sc = h.get("scaling") or {}
    if not sc:
        return []
    lines = ["", "## Scaling", "",
             "Least-squares line, log-log growth exponent (1 = linear, 2 = quadratic; a fixed cost pulls it "
             "below 1) and the share of a fitted quadratic term at the largest size, over the measured range "
             "(speech clips for windows).", "", *markdown_table(SCALING, [{"name": k, **f} for k, f in sc.items()])]
    speech = sorted((r for r in results.get("lengths") or [] if r.get("kind") == "speech" and r.get("encoder_ms")),
                    key=lambda r: r["windows"])
    if speech:
        lines += ["", *markdown_table(WINDOWS, speech)]
    return lines + [
        "", "What to expect: the encoder computes each 30-s window on its own (a batch dimension), so its "
        "cost should be linear in windows; per-window cost that rises with the window count comes from "
        "running many windows in one ONNX Runtime call (attention buffers of 1500 x 1500 per head and "
        "window fall out of cache) or from other load during that request. The decoder's prefill attends "
        "over every audio token (750 per window), so its attention cost grows with the square of the audio "
        "length and dominates long clips; each decode step also reads a KV cache proportional to the audio "
        "length. Output length adds one decode step per token: linear. Single requests on a shared "
        "machine: read the verdicts with the noise in mind."]


def _output_length_lines(results: dict) -> list[str]:
    outs = results.get("output_lengths") or []
    if not outs:
        return []
    return ["", "### Output length (c=1, streaming, one clip)", "", *markdown_table(OUTPUT_LENGTHS, outs)]


def _ablation_lines(results: dict) -> list[str]:
    ab = results.get("ablation")
    if not ab:
        return []
    main = (results.get("sweeps") or {}).get("nonstream") or []
    seq = ((results.get("baseline") or {}).get("sequential") or {}).get("points") or []
    seq_rps = seq[0]["throughput_rps"] if seq else None
    main_prec = ((results.get("repository") or {}).get("precisions") or {}).get("encoder")
    a_main, a_tf = ab.get("agreement_with_main") or {}, ab.get("agreement_with_transformers") or {}
    prec = ab["encoder_precision"]
    rows = []
    for p in ab.get("nonstream") or []:
        rps, mrps = p.get("throughput_rps"), (point_at(main, p["concurrency"]) or {}).get("throughput_rps")
        rows.append({**p, "main_rps": mrps, "vs_main": rps / mrps if rps and mrps else None,
                     "vs_sequential": rps / seq_rps if rps and seq_rps else None})
    columns = [C, Column(f"{prec} req/s", "throughput_rps", "{:.2f}", right=True),
               Column("main req/s", "main_rps", "{:.2f}", right=True),
               Column("ratio", "vs_main", "{:.2f}x", right=True),
               Column(f"{prec} / transformers sequential", "vs_sequential", "{:.2f}x", right=True),
               _num("latency p50", ("latency_ms", "p50")), Column("CPU", "cpu", _cpu)]
    return ["", f"### Ablation: {prec} encoder (main build: {main_prec})", "",
            f"Same inputs, non-streaming, perf_analyzer. Greedy ids identical to the main build's for "
            f"{_f(a_main.get('exact'), '{:.0%}')} of requests (shared prefix {_f(a_main.get('prefix'), '{:.0%}')}), "
            f"to transformers' for {_f(a_tf.get('exact'), '{:.0%}')} (prefix {_f(a_tf.get('prefix'), '{:.0%}')}): "
            "the synthetic model's random weights make greedy decoding fragile, a small change of the audio "
            "embeddings flips a token and the answer diverges from there.", "", *markdown_table(columns, rows)]


def _ratio_lines(results: dict) -> list[str]:
    """af3trt throughput over transformers' at each concurrency level measured by both."""
    base = results.get("baseline") or {}
    seq = {p["concurrency"]: p["throughput_rps"] for p in (base.get("sequential") or {}).get("points") or []}
    bat = {p["concurrency"]: p["throughput_rps"] for p in base.get("batched") or []}
    sweeps = results.get("sweeps") or {}
    if not (seq and sweeps):
        return []

    def ratio(mode: str, peer: dict):
        def of(c):
            rps = (point_at(sweeps[mode], c) or {}).get("throughput_rps")
            return rps / peer[c] if rps and c in peer else None
        return of

    columns = [Column("c", lambda c: c, right=True)]
    for m in sweeps:
        columns += [Column(f"{m} / sequential", ratio(m, seq), "{:.2f}x", right=True),
                    Column(f"{m} / batched", ratio(m, bat), "{:.2f}x", right=True)]
    levels = sorted({p["concurrency"] for pts in sweeps.values() for p in pts})
    return ["", "### Throughput ratios, af3trt / transformers (same run, same checkpoint and inputs)", "",
            *markdown_table(columns, levels)]


def _thinking_lines(results: dict) -> list[str]:
    """Base and thinking requests to the same server (perf/bench.py thinking_study; docs/thinking.md)."""
    t = results.get("thinking")
    if not t:
        return []
    if "skipped" in t:
        return ["", "### Thinking mode", "", f"Skipped: {t['skipped']}."]
    return ["", "### Thinking mode (AF-Think) and base, one deployment", "",
            f"Tool: {t['tool']}; the same inputs in both modes, max_tokens {t['max_tokens']}.", "",
            *markdown_table(THINKING, [{**t.get(mode, {}), "mode": mode} for mode in ("base", "thinking")])]


def _params(ck: dict) -> str:
    p = ck.get("params")
    if not p:
        return "parameters unknown"
    return f"decoder {p['decoder'] / 1e6:.1f} M + encoder/projector {p['encoder'] / 1e6:.1f} M parameters"


def _headline_lines(h: dict) -> list[str]:
    lvl = h["level"]
    lines = []
    for mode in ("nonstream", "stream"):
        f = h.get(mode)
        if not f:
            continue
        lines.append(f"- **c={lvl}, {mode}** ({f.get('tool')}): {f['throughput_rps']:.2f} req/s, "
                     f"{_f(f.get('output_tokens_per_s'))} tokens/s; "
                     f"**{_f(f.get('ratio_vs_sequential'), '{:.2f}')}x** transformers one-at-a-time "
                     f"({_f(h.get('baseline_sequential_rps'), '{:.2f}')} req/s), "
                     f"{_f(f.get('ratio_vs_batched'), '{:.2f}')}x transformers batched generate at c={lvl} "
                     f"({_f(h.get('baseline_batched_rps'), '{:.2f}')} req/s); latency p50 "
                     f"{_pct(f.get('latency_ms'), 'p50')} ms.")
    ab = h.get("ablation")
    if ab:
        agree = (ab.get("agreement_with_transformers") or {}).get("exact")
        lines.append(f"- Ablation, {ab['encoder_precision']} encoder, c={lvl} non-streaming: "
                     f"{ab['throughput_rps']:.2f} req/s, **{ab['ratio_vs_sequential']:.2f}x** transformers "
                     f"one-at-a-time (greedy ids identical to transformers' for {_f(agree, '{:.0%}')} of requests).")
    for key, s in (h.get("streaming") or {}).items():
        lines.append(f"- Streaming {key.replace('c', 'c=')}: TTFT p50 {_pct(s.get('ttft_ms'), 'p50')} ms "
                     f"(p99 {_pct(s.get('ttft_ms'), 'p99')}), ITL p50 {_f((s.get('itl_ms') or {}).get('p50'))} ms "
                     f"(p99 {_f((s.get('itl_ms') or {}).get('p99'))}) — perf_analyzer profile export.")
    lines.append(f"- Overhead outside encoder/decoder compute, p50 per request at c=1: "
                 f"**{_f(h.get('overhead_ms_p50'), '{:.1f}')} ms** "
                 f"({_f(h.get('overhead_without_features_ms_p50'), '{:.1f}')} ms without audio decoding and log-mel).")
    split = h.get("stage_split_ms") or {}
    if split:
        parts = []
        for name in STAGE_ORDER:
            r = split.get(name)
            if not r:
                continue
            if name == "decoder":
                parts.append(f"decoder generation {_f(r.get('generation_ms (derived)'), '{:.0f}')} (derived)")
            elif name == "postprocess":
                parts.append(f"postprocess {_f(r.get('per_response_ms'))}/response")
            else:
                parts.append(f"{name} {r['queue_ms']:.0f} queue + {r['compute_ms']:.0f} compute")
        lines.append(f"- Stage split at c={lvl} (non-streaming, ms per request, Triton statistics): " + "; ".join(parts)
                     + f"; ensemble {_f(split.get('ensemble_ms'), '{:.0f}')}.")
    for name, met in (h.get("targets") or {}).items():
        lines.append(f"- Target {name}: {'met' if met else 'NOT met' if met is not None else 'not measured'}.")
    return lines


# ------------------------------------------------------------------------------------------------ plots

def write_plots(results: dict, out: Path) -> list[str]:
    """The PNGs of PLOTS that the results have data for, in `out`; their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for name, draw in PLOTS:
        fig = draw(results, plt)
        if fig is None:
            continue
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(name)
    return written


def _baselines(results: dict) -> tuple[list[dict], list[dict]]:
    """transformers' sequential and batched points."""
    base = results.get("baseline") or {}
    return (base.get("sequential") or {}).get("points") or [], base.get("batched") or []


def _plot_throughput(results: dict, plt):
    """Requests/s and output tokens/s against concurrency: af3trt's sweeps, our client's, transformers'."""
    sweeps, cs = results.get("sweeps") or {}, results.get("client_sweep") or []
    if not sweeps:
        return None
    seq, bat = _baselines(results)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (key, label) in zip(axes, (("throughput_rps", "requests/s"), ("output_tokens_per_s", "output tokens/s"))):
        for mode, pts in sweeps.items():
            ax.plot([p["concurrency"] for p in pts], [p.get(key) for p in pts], "o-", label=f"af3trt {mode} (PA)")
        if cs:
            ax.plot([p["concurrency"] for p in cs], [p.get(key) for p in cs], "x--", label="af3trt stream (client)")
        if seq:
            ax.plot([p["concurrency"] for p in seq], [p[key] for p in seq], "k:", label="transformers sequential")
        if bat:
            ax.plot([p["concurrency"] for p in bat], [p[key] for p in bat], "s-.", label="transformers batched")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return fig


def _plot_latency(results: dict, plt):
    """Latency (TTFT when streaming) percentiles against concurrency, transformers' p50 beside them."""
    sweeps = results.get("sweeps") or {}
    if not sweeps:
        return None
    seq, bat = _baselines(results)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for mode, pts in sweeps.items():
        c = [p["concurrency"] for p in pts]
        what = "ttft_ms" if mode == "stream" else "latency_ms"
        for q, style in (("p50", "o-"), ("p90", "^--"), ("p99", "v:")):
            ax.plot(c, [(p.get(what) or {}).get(q) for p in pts], style,
                    label=f"{mode} {'TTFT' if what == 'ttft_ms' else 'latency'} {q}")
    if seq:
        ax.plot([p["concurrency"] for p in seq], [p["latency_ms"]["p50"] for p in seq], "k:",
                label="transformers sequential p50 (derived)")
    if bat:
        ax.plot([p["concurrency"] for p in bat], [p["latency_ms"]["p50"] for p in bat], "s-.",
                label="transformers batched")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("concurrency")
    ax.set_ylabel("ms")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def _plot_stages(results: dict, plt):
    """The stage split of the non-streaming sweep (else the first), stacked per concurrency level."""
    sweeps = results.get("sweeps") or {}
    if not sweeps:
        return None
    pts = [p for p in sweeps.get("nonstream") or next(iter(sweeps.values())) if (p.get("split") or {}).get("stages")]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    bottom = [0.0] * len(pts)
    x = [str(p["concurrency"]) for p in pts]
    for name, vals in stage_series(pts).items():
        ax.bar(x, vals, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_xlabel("concurrency")
    ax.set_ylabel("ms per request (latency share)")
    ax.set_title("stage split (Triton statistics; decoder derived)")
    ax.legend(fontsize=7)
    return fig


def _plot_audio_length(results: dict, plt):
    """End-to-end latency and TTFT against audio seconds; encoder and decoder time against 30-s windows."""
    rows = results.get("lengths") or []
    if not rows:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for kind, style in (("speech", "o-"), ("nonspeech", "s--")):
        r = sorted((x for x in rows if x["kind"] == kind and x.get("latency_ms")), key=lambda x: x["seconds"])
        if not r:
            continue
        s = [x["seconds"] for x in r]
        axes[0].plot(s, [x["latency_ms"] for x in r], style, label=f"{kind} e2e")
        axes[0].plot(s, [x.get("ttft_ms") for x in r], style, alpha=0.5, label=f"{kind} TTFT")
        axes[1].plot([x["windows"] for x in r], [x.get("encoder_ms") for x in r], style, label=f"{kind} encoder")
        axes[1].plot([x["windows"] for x in r], [x.get("decoder_ms") for x in r], style, alpha=0.5,
                     label=f"{kind} decoder (derived)")
    bl = sorted((results.get("baseline") or {}).get("lengths") or [], key=lambda x: x["seconds"])
    if bl:
        axes[0].plot([x["seconds"] for x in bl], [x["latency_ms"] for x in bl], "k:", label="transformers e2e")
    axes[0].set_xscale("log")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("audio seconds")
    axes[0].set_ylabel("ms")
    axes[1].set_xlabel("30-s windows")
    axes[1].set_ylabel("ms")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return fig


# report.md's plots, in its order: file name → drawing function (the results → a Figure, or None without data)
PLOTS = (("throughput_vs_concurrency.png", _plot_throughput), ("latency_vs_concurrency.png", _plot_latency),
         ("stage_breakdown.png", _plot_stages), ("latency_vs_audio_length.png", _plot_audio_length))


def stage_series(points: list[dict]) -> dict[str, list[float]]:
    """Stacked parts per point: each stage's queue + compute, the encoder split in queue and compute, the
    decoder's derived generation, postprocess's final response."""
    series: dict[str, list[float]] = {}

    def add(name, v):
        series.setdefault(name, []).append(max(v or 0.0, 0.0))

    for p in points:
        sp = p["split"]
        st = sp["stages"]
        add("preprocess", st.get("preprocess", {}).get("critical_ms"))
        enc = st.get("encoder", {})
        add("encoder queue", enc.get("queue_ms"))
        add("encoder compute", enc.get("compute_ms"))
        add("fusion", st.get("fusion", {}).get("critical_ms"))
        add("decoder (derived)", (sp.get("decoder_generation_ms") or 0) + st.get("decoder", {}).get("critical_ms", 0))
        add("postprocess (last)", st.get("postprocess", {}).get("critical_ms"))
    return series


def write_report(results: dict, out: Path) -> Path:
    plots = write_plots(results, out)
    encoder_plot = compare.plot_encoder_curve(results.get("compare") or {}, out)
    if encoder_plot:
        plots.insert(0, encoder_plot)
    path = out / "report.md"
    path.write_text(render_markdown(results, plots))
    return path
