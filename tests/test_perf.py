"""The benchmark's pure parts: perf_analyzer export parsing, Triton statistics diffing and stage split, figures,
baseline bookkeeping, clips, GPU projection arithmetic, report rendering. No server, no model."""

from __future__ import annotations

import base64
import json
import os
import struct

import numpy as np
import pytest

from af3trt.perf import analyzer, baseline, clips, compare, machine, metrics, projection, report, stats
from af3trt.runtime.stages import lengths
from af3trt.perf.metrics import RequestRecord

# ------------------------------------------------------------------------------------------------ metrics


def rec(start, times, tokens=None):
    return RequestRecord(start_s=start, response_s=list(times), response_tokens=tokens or [1] * len(times))


def test_record_ttft_itl_latency():
    r = rec(10.0, [0.5, 0.6, 0.8], [0, 1, 2])  # an empty first response, then 1 token, then 2 at once
    assert r.ttft_s == 0.6 and r.latency_s == 0.8 and r.end_s == 10.8 and r.tokens == 3
    assert r.inter_token_s() == pytest.approx([0.2, 0.0])
    assert not RequestRecord(start_s=0.0).ok and not RequestRecord(start_s=0, response_s=[1], error="x").ok


def test_summarize_throughput_and_percentiles():
    records = [rec(float(i), [0.1 * (i + 1), 0.1 * (i + 1) + 0.01]) for i in range(10)]
    records.append(RequestRecord(start_s=0.0, error="boom"))
    s = metrics.summarize(records)
    assert s["requests"] == 11 and s["errors"] == 1
    window = (9 + 1.01) - 0.0
    assert s["window_s"] == pytest.approx(window)
    assert s["throughput_rps"] == pytest.approx(10 / window)
    assert s["output_tokens_per_s"] == pytest.approx(20 / window)
    lat = [1e3 * (0.1 * (i + 1) + 0.01) for i in range(10)]
    assert s["latency_ms"]["p50"] == pytest.approx(np.percentile(lat, 50))
    assert s["ttft_ms"]["p99"] == pytest.approx(np.percentile([100.0 * (i + 1) for i in range(10)], 99))
    assert s["itl_ms"]["p50"] == pytest.approx(10.0)
    assert metrics.summarize(records, window_s=20.0)["throughput_rps"] == pytest.approx(0.5)


def test_summarize_non_streaming_has_no_itl_and_empty_is_safe():
    s = metrics.summarize([rec(0.0, [1.0], [32]), rec(0.5, [1.5], [32])])
    assert "itl_ms" not in s and s["ttft_ms"]["p50"] == s["latency_ms"]["p50"]
    assert metrics.summarize([]) == {"requests": 0, "errors": 0}
    assert metrics.percentiles([]) == {"p50": None, "p90": None, "p99": None}


def test_linear_fit_and_growth_exponent():
    x = [1, 2, 4, 10, 20]
    fit = metrics.fit_linear(x, [5 + 3 * v for v in x])
    assert fit["slope"] == pytest.approx(3) and fit["intercept"] == pytest.approx(5) and fit["r2"] == pytest.approx(1)
    assert metrics.growth_exponent(x, [2 * v for v in x]) == pytest.approx(1.0)
    assert metrics.growth_exponent(x, [v * v for v in x]) == pytest.approx(2.0)
    assert metrics.fit_linear([1], [1])["slope"] is None and metrics.growth_exponent([1], [1]) is None


# ------------------------------------------------------------------------------------------------ perf_analyzer


def test_parse_profile_export():
    t0 = 1_000_000_000_000
    doc = {"version": "2.51.0", "experiments": [{
        "experiment": {"mode": "concurrency", "value": 2},
        "window_boundaries": [t0, t0 + 4_000_000_000],
        "requests": [
            {"timestamp": t0, "request_inputs": {"audio": "@@AUDIO@@"},
             "response_timestamps": [t0 + 100_000_000, t0 + 150_000_000, t0 + 160_000_000],
             "response_outputs": [{"output_ids": 5, "text_output": "a"}, {"output_ids": [6, 7]}, {"output_ids": []}]},
            {"timestamp": t0 + 10, "response_timestamps": [], "response_outputs": []},
        ]}]}
    raw = json.dumps(doc).encode().replace(b"@@AUDIO@@", b"fLaC\xe8\xff")  # echoed audio: not UTF-8
    records, window = analyzer.parse_profile_export(raw)
    assert window == pytest.approx(4.0)
    a, b = records
    assert a.response_s == pytest.approx([0.1, 0.15, 0.16]) and a.response_tokens == [1, 2, 0] and a.ok
    assert not b.ok and b.error == "no response"


def test_level_requests_and_input_data(tmp_path):
    assert analyzer.level_requests(1, 12) == 12 and analyzer.level_requests(64, 12) == 128
    assert analyzer.level_requests(8, 12, rounds_per_level=3) == 24
    path = analyzer.write_input_data(tmp_path / "in.json", [("hi", b"\x00\x01audio"), ("text only", None)],
                                     max_tokens=7, stream=True)
    data = json.loads(path.read_text())["data"]
    blob = base64.b64decode(data[0]["audio"]["b64"])
    assert struct.unpack("<I", blob[:4])[0] == 7 and blob[4:] == b"\x00\x01audio"
    assert data[0]["max_tokens"] == {"content": [7], "shape": [1]} and data[0]["stream"]["content"] == [True]
    assert "audio" not in data[1]


# ------------------------------------------------------------------------------------------------ statistics


def model_stats(name, n, execs, queue, cin, infer, cout, success=None, batch=None):
    ns = lambda v: {"count": str(n), "ns": str(v)}  # noqa: E731 — int64s arrive as strings
    m = {"name": name, "version": "1", "inference_count": str(n), "execution_count": str(execs),
         "inference_stats": {"success": ns(success if success is not None else queue + cin + infer + cout),
                             "fail": {}, "queue": ns(queue), "compute_input": ns(cin), "compute_infer": ns(infer),
                             "compute_output": ns(cout)}}
    if batch:
        m["batch_stats"] = [{"batch_size": "1", **{k: {"count": str(execs), "ns": str(v)} for k, v in batch.items()}}]
    return m


def test_parse_sums_versions_and_tolerates_missing_fields():
    a = model_stats("encoder", 2, 1, 10, 1, 100, 2)
    b = dict(model_stats("encoder", 1, 1, 5, 0, 50, 0), version="2")
    got = stats.parse({"model_stats": [a, b, {"name": "idle", "version": "1", "inference_stats": {}}]})
    assert got["encoder"]["success_count"] == 3 and got["encoder"]["compute_infer_ns"] == 150
    assert got["encoder"]["executions"] == 2 and got["idle"]["success_count"] == 0


def test_diff_and_stage_split():
    ms = 1_000_000
    before = stats.parse({"model_stats": [model_stats("af3", 1, 1, 0, 0, 0, 0, success=500 * ms)]})
    # 4 requests; encoder ran them in 2 executions of 2 (each request charged its batch's 100 ms)
    after = stats.parse({"model_stats": [
        model_stats("af3", 5, 5, 0, 0, 0, 0, success=500 * ms + 4 * 1000 * ms),
        model_stats("preprocess", 4, 4, 4 * ms, 0, 40 * ms, 0),
        model_stats("encoder", 4, 2, 20 * ms, 0, 400 * ms, 0, batch={"compute_infer": 200 * ms}),
        model_stats("fusion", 4, 4, 0, 0, 8 * ms, 0),
        model_stats("decoder", 4, 4, 0, 0, 4 * ms, 0),
        model_stats("postprocess", 128, 128, 0, 0, 128 * ms, 0),  # 32 responses per request, 1 ms each
    ]})
    split = stats.stage_split(stats.diff(before, after), ensemble="af3",
                              stages=("preprocess", "encoder", "fusion", "decoder", "postprocess"))
    st = split["stages"]
    assert split["requests"] == 4 and split["ensemble_ms"] == pytest.approx(1000)
    assert st["encoder"]["compute_ms"] == pytest.approx(100) and st["encoder"]["busy_ms"] == pytest.approx(50)
    assert st["encoder"]["queue_ms"] == pytest.approx(5) and st["encoder"]["executions_per_request"] == 0.5
    assert st["postprocess"]["critical_ms"] == pytest.approx(1.0) and st["postprocess"]["compute_ms"] == 32
    on_path = 11 + 105 + 2 + 1 + 1
    assert split["decoder_generation_ms"] == pytest.approx(1000 - on_path)
    ov = stats.overhead(split, client_latency_ms=1003.0)
    assert ov["parts_ms"]["encoder"] == pytest.approx(5)  # its queue: compute_infer is the encoder's compute
    assert ov["server_ms"] == pytest.approx(11 + 5 + 2 + 1 + 1)
    assert ov["transport_ms"] == pytest.approx(3) and ov["total_ms"] == pytest.approx(23)
    assert ov["features_ms"] == pytest.approx(10) and ov["without_features_ms"] == pytest.approx(13)


def test_stage_split_without_requests_is_empty():
    s = stats.parse({"model_stats": [model_stats("af3", 3, 3, 0, 0, 0, 0)]})
    assert stats.stage_split(stats.diff(s, s), ensemble="af3", stages=("encoder",)) == {}
    assert stats.overhead({}, client_latency_ms=1.0) == {}


# ------------------------------------------------------------------------------------------------ baseline


def test_baseline_bookkeeping():
    assert baseline.strip_end([5, 6, 9, 9, 9], 9) == [5, 6] and baseline.strip_end([5, 6], 9) == [5, 6]
    a = baseline.agreement([[1, 2, 3], [1, 2]], [[1, 2, 3], [1, 5]])
    assert a == {"pairs": 2, "exact": 0.5, "prefix": pytest.approx(0.75)}
    p = baseline.sequential_point([1.0, 1.0, 2.0], [32, 32, 32], 4)
    assert p["throughput_rps"] == pytest.approx(0.75) and p["derived"]
    assert p["latency_ms"]["p50"] == pytest.approx(4000) and p["output_tokens_per_s"] == pytest.approx(24)
    b = baseline.batched_point({"batch_size": 8, "seconds": 2.0, "tokens": [32] * 8})
    assert b["throughput_rps"] == 4.0 and b["output_tokens_per_s"] == 128.0 and not b["derived"]


# ------------------------------------------------------------------------------------------------ clips, machine


def test_clip_specs_and_waves():
    assert clips.ClipSpec.parse("speech:600").name == "speech-10min"
    assert clips.ClipSpec.parse("nonspeech:5").name == "nonspeech-5s"
    with pytest.raises(ValueError):
        clips.ClipSpec.parse("music:5")
    for kind in clips.KINDS:
        w = clips.make_wave(clips.ClipSpec(kind, 3.0), seed=1)
        assert w.dtype == np.float32 and len(w) == 48000 and np.isfinite(w).all() and np.abs(w).max() > 0.01
        assert np.array_equal(w, clips.make_wave(clips.ClipSpec(kind, 3.0), seed=1))
    from af3trt.runtime.stages.audio import decode_audio

    wave = decode_audio(clips.make_clip(clips.ClipSpec("speech", 2.0)))
    assert len(wave) == 32000


def test_machine_parsers():
    text = "Architecture: x86_64\nCPU(s): 2\nModel name: AMD EPYC\nFlags: fpu avx2 avx512f avx512_vnni\nBogus: 1\n"
    got = machine.parse_lscpu(text)
    assert got == {"Architecture": "x86_64", "CPU(s)": "2", "Model name": "AMD EPYC", "isa": "avx2 avx512f avx512_vnni"}
    assert machine.meminfo_bytes("MemTotal:       24000000 kB\nMemFree: 1 kB\n") == 24000000 * 1024


# ------------------------------------------------------------------------------------------------ projection

SMALL = {"text_config": {"vocab_size": 1000, "hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
                         "num_key_value_heads": 2, "intermediate_size": 512},
         "audio_config": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                          "intermediate_size": 128, "num_mel_bins": 128, "max_source_positions": 1500}}


def test_decode_step_is_weights_plus_kv_over_bandwidth():
    from af3trt.build import sizing

    d, _ = sizing.dims_from_config(SMALL)
    gpu = projection.GPUS["H100"]
    r = projection.decode_step(d, gpu, "bf16", "auto", batch=4, context=100)
    weights = sizing.decoder_weight_bytes(d, "bf16") - 1000 * 256 * 2  # the embedding table is not streamed
    kv = 4 * 100 * 2 * 2 * 2 * 64 * 2  # B x T x (K,V) x layers x kv_heads x head_dim x 2 bytes
    assert r["bytes"] == weights + kv
    assert r["memory_s"] == pytest.approx((weights + kv) / 3.35e12) and r["bound"] == "memory"
    assert r["tokens_per_s"] == pytest.approx(4 / r["step_s"])


def test_encoder_window_flops_formula():
    from af3trt.build import sizing

    _, e = sizing.dims_from_config(SMALL)
    h, f, s = 64, 128, 1500
    want = (2 * 3000 * 128 * 3 * h + 2 * s * h * 3 * h + 2 * (2 * s * 4 * h * h + 2 * s * 2 * h * f + 4 * s * s * h)
            + 2 * 750 * (h * 256 + 256 * 256))
    assert projection.encoder_window_flops(e) == want


def test_encoder_flops_follow_the_valid_audio():
    """Encoder FLOPs per window at T frames (S = T/2 positions, T/4 projector rows); a request's windows at the frame
    count preprocess crops them to (runtime/audio.request_frames): a 5-s clip (500 valid frames) runs on 600 frames,
    a 70-s clip on 3 x 3000 (its 10-s window is padded to its full neighbours)."""
    from af3trt.build import sizing
    from af3trt.runtime.stages import audio, lengths

    _, e = sizing.dims_from_config(SMALL)
    h, f = 64, 128
    assert projection.encoder_window_flops(e, 3000) == projection.encoder_window_flops(e)
    s = 300
    want = (2 * 600 * 128 * 3 * h + 2 * s * h * 3 * h + 2 * (2 * s * 4 * h * h + 2 * s * 2 * h * f + 4 * s * s * h)
            + 2 * 150 * (h * 256 + 256 * 256))
    assert projection.encoder_window_flops(e, 600) == want
    five = projection.clip_encoder_flops(e, 5)
    assert (five["windows"], five["frames"], five["frames_full"]) == (1, lengths.frame_bucket(500), 3000) == (1, 600, 3000)
    assert five["cropped"] == want and five["full"] == projection.encoder_window_flops(e)
    long = projection.clip_encoder_flops(e, 70)
    assert long["frames"] == long["frames_full"] == 3 * 3000 and long["cropped"] == long["full"]
    for sec in (5, 29.5, 70):  # the projection's T is the one preprocess crops to
        chunks, _ = audio.split_windows(np.zeros(int(sec * lengths.SAMPLE_RATE), np.float32))
        c = projection.clip_encoder_flops(e, sec)
        assert c["frames"] == c["windows"] * audio.request_frames(chunks)
    d, _ = sizing.dims_from_config(SMALL)
    mix = projection.clip_mix(d, e, projection.GPUS["H100"], text_tokens=64)
    assert [r["audio_s"] for r in mix] == [5, 30, 120, 600, 755] and mix[-1]["label"] == "mix"
    assert mix[-1]["cropped"] == sum(r["cropped"] for r in mix[:-1])
    assert mix[0]["encoder_speedup"] > 1 and all(r["encoder_speedup"] == 1 for r in mix[1:4])
    assert mix[0]["first_token_s"] == pytest.approx(mix[0]["encoder_s"] + mix[0]["prefill_s"])


def test_projection_markdown_is_labelled_and_skips_fp8_on_a100():
    md = projection.render_markdown([projection.project(projection.AF3_REFERENCE_CONFIG, label="AF3")])
    assert "PROJECTION" in md and "n/a: no FP8 on A100" in md
    assert "| H100 | 30 s | fp8 |" in md and "| A100 | 30 s | bf16 |" in md
    assert "Encoder cost following the valid audio" in md and "| mix (5 s + 30 s + 2 min + 10 min) | 26 |" in md


# ------------------------------------------------------------------------------------------------ report


def fake_results():
    split = {"requests": 16, "ensemble_ms": 3000.0, "decoder_generation_ms": 2000.0, "stages": {
        name: {"queue_ms": 10.0, "compute_ms": 100.0 if name == "encoder" else 2.0, "compute_infer_ms": 90.0,
               "busy_ms": 50.0, "critical_ms": 12.0, "inferences_per_request": 1.0, "executions_per_request": 1.0}
        for name in report.STAGE_ORDER}}
    point = lambda c, mode: {"concurrency": c, "mode": mode, "tool": "perf_analyzer", "requests": 16,  # noqa: E731
                             "throughput_rps": 0.5 * c if c < 8 else 4.0, "output_tokens_per_s": 100.0,
                             "latency_ms": {"p50": 1000.0, "p90": 1500.0, "p99": 2000.0},
                             "ttft_ms": {"p50": 300.0, "p90": 400.0, "p99": 500.0},
                             "itl_ms": {"p50": 10.0, "p90": 20.0, "p99": 30.0} if mode == "stream" else None,
                             "split": split, "overhead_mean": {"total_ms": 12.0, "transport_ms": 0.5,
                                                               "features_ms": 8.0}}
    return {
        "started_utc": "X", "machine": {"cpu": {"Model name": "CPU"}, "logical_cpus": 2, "ram_bytes": 2**34},
        "checkpoint": {"label": "synthetic 'small' preset", "params": {"decoder": 25e6, "encoder": 8e6}},
        "sweeps": {m: [point(c, m) for c in (1, 8)] for m in ("nonstream", "stream")},
        "baseline": {"threads": 2, "thread_calibration_s": {"1": 1.0, "2": 0.8},
                     "sequential": {"points": [baseline.sequential_point([1.0], [32], c) for c in (1, 8)]},
                     "batched": [baseline.batched_point({"batch_size": 8, "seconds": 4.0, "tokens": [32] * 8})],
                     "agreement": {"pairs": 4, "exact": 1.0, "prefix": 1.0}, "lengths": []},
        "overhead_probe": {"tool": "probe", "requests": 6, "overhead_ms_p50": 16.0,
                           "overhead_without_features_ms_p50": 6.0, "parts_ms_p50": {"preprocess": 10.0}},
        "lengths": [{"clip": f"speech-{w * 30}s", "kind": "speech", "seconds": w * 30.0, "windows": w,
                     "latency_ms": 500.0 + 10 * w * w, "encoder_ms": 100.0 * w, "decoder_ms": 300.0 + 10 * w * w,
                     "preprocess_ms": 10.0 * w, "ttft_ms": 200.0, "tokens": 32, "tool": "client"}
                    for w in (1, 2, 4, 10, 20)],
        "output_lengths": [{"max_tokens": n, "tokens": n, "latency_ms": 300.0 + 10 * n} for n in (1, 8, 32)],
    }


def test_headline_ratios_targets_and_scaling():
    h = report.headline(fake_results())
    assert h["nonstream"]["ratio_vs_sequential"] == pytest.approx(4.0)
    assert h["nonstream"]["ratio_vs_batched"] == pytest.approx(2.0)
    assert list(h["targets"].values()) == [True, False]  # 4x >= 3x; 16 ms > 5 ms
    assert h["streaming"]["c8"]["itl_ms"]["p50"] == 10.0
    sc = h["scaling"]
    assert sc["encoder_ms vs windows"]["verdict"] == "linear"
    assert sc["decoder_ms vs windows"]["verdict"].startswith("superlinear")
    assert metrics.quadratic_share([1, 2, 4, 10, 20], [3 + 2 * w for w in (1, 2, 4, 10, 20)]) == pytest.approx(0, abs=1e-9)
    assert sc["latency_ms vs output tokens"]["slope"] == pytest.approx(10.0)
    assert h["stage_split_ms"]["decoder"]["generation_ms (derived)"] == 2000.0


@pytest.mark.slow
def test_render_markdown_and_plots(tmp_path):
    results = fake_results()
    results["repository"] = {"precisions": {"encoder": "fp32"}}
    results["ablation"] = {"encoder_precision": "int8", "agreement_with_main": {"exact": 0.5, "prefix": 0.6},
                           "agreement_with_transformers": {"exact": 0.5, "prefix": 0.6},
                           "nonstream": [dict(results["sweeps"]["nonstream"][1], throughput_rps=5.0)]}
    results["derived"] = report.headline(results)
    md = report.render_markdown(results, ["throughput_vs_concurrency.png"])
    assert "### Ablation: int8 encoder (main build: fp32)" in md and "| 8 | 5.00 | 4.00 | 1.25x | 5.00x |" in md
    assert "**5.00x** transformers one-at-a-time (greedy ids identical to transformers' for 50%" in md
    assert "## Headline" in md and "**4.00x** transformers one-at-a-time" in md
    assert "| nonstream | 8 | 4.00 |" in md and "transformers batched generate | 8 | 2.00" in md
    assert "NOT met" in md and "![throughput_vs_concurrency.png]" in md
    path = report.write_report(results, tmp_path)
    assert path.read_text().startswith("# af3trt benchmark")
    for name in ("throughput_vs_concurrency.png", "latency_vs_concurrency.png", "stage_breakdown.png",
                 "latency_vs_audio_length.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_stage_series_stacks_every_part():
    series = report.stage_series(fake_results()["sweeps"]["nonstream"])
    assert list(series) == ["preprocess", "encoder queue", "encoder compute", "fusion", "decoder (derived)",
                            "postprocess (last)"]
    assert series["decoder (derived)"] == [2012.0, 2012.0]


def test_markdown_table_writes_declared_columns_over_records():
    """build/tables.py, the one table writer: a column's field (nested, or a function), its format (a pattern or a
    function), its alignment; None as the missing mark, a Text as it is whatever the format, a blank cell as '| |'."""
    from dataclasses import dataclass

    from af3trt.build.tables import BLANK, MISSING, Column, Text, markdown_table

    @dataclass
    class Point:
        concurrency: int
        latency_ms: dict

    columns = [Column("c", "concurrency", right=True), Column("p50", ("latency_ms", "p50"), "{:.1f}", right=True),
               Column("x2", lambda r: 2 * r.concurrency, lambda v: f"{v} req"), Column("", lambda r: BLANK)]
    rows = [Point(1, {"p50": 12.345}), Point(8, {}), Point(16, Text("n/a"))]
    assert markdown_table(columns, rows) == ["| c | p50 | x2 | |", "|---:|---:|---|---|", "| 1 | 12.3 | 2 req | |",
                                             f"| 8 | {MISSING} | 16 req | |", "| 16 | n/a | 32 req | |"]
    assert markdown_table([Column("name")], []) == ["| name |", "|---|"]  # the header alone: no records
    assert markdown_table([Column("op", "op", "`{}`")], [{"op": "GET /v1/models"}])[-1] == "| `GET /v1/models` |"


def test_bench_cli_defaults(tmp_path):
    from af3trt.perf import bench

    args = bench.parse_args([])
    assert args.preset == "af3" and args.main_clips == "spoken"  # AF3's compute split, the burst's spoken clips
    assert (args.compare_rounds, args.burst_clips, args.steady_concurrency) == (3, 8, 8) and args.full_window_ablation
    # encoder batching: the CPU target's default (off), the batching ablation measures it on
    assert not args.build.encoder_batching and args.build.encoder_queue_delay_us == 2000 and args.batching_ablation
    assert bench.parse_args(["--encoder-batching"]).build.encoder_batching
    assert bench.parse_args(["--no-encoder-batching"]).build.encoder_batching is False
    assert bench.ints(args.concurrency) == [1, 4, 8, 16, 32]
    assert args.max_tokens == 32 and args.main_seconds == 10.0 and args.ablation_levels == ""
    assert args.build.encoder_precision == "fp32"
    assert bench.parse_args(["--preset", "small"]).preset == "small"  # the old presets stay options
    assert [clips.ClipSpec.parse(s).seconds for s in args.length_clips.split(",")] == [5, 30, 120, 600] * 2
    # the benchmark's build: its own defaults over the build's, the served default = --max-tokens, a thread per CPU
    opts = bench.build_options(bench.parse_args(["--max-tokens", "24"]), tmp_path / "ckpt", tmp_path / "out")
    s = opts.serving
    assert (s.max_batch_size, s.max_text_len, s.max_output_len, s.default_max_tokens) == (16, 512, 256, 24)
    assert s.cpu_threads == os.cpu_count() and opts.encoder_precision == "fp32" and s.crop_frames
    assert not bench.build_options(args, tmp_path, tmp_path, crop_frames=False).serving.crop_frames  # the ablation's


def _build_flags(argv: list[str], tmp_path):
    """The BuildOptions `af3trt build` makes of argv (on the checkpoint and output bench_options gets)."""
    from af3trt.build import build_engines

    return build_engines.options_from_args(build_engines.parser().parse_args(
        [*argv, "--hf-model", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out"), "--force"]))


def test_bench_declares_no_build_flag_of_its_own():
    """Every flag of the benchmark's CPU build is af3trt build's own (its parser: the generated ServingConfig flags,
    the precisions from the registry): the benchmark declares none, so none can drift (its old hand-made
    --cpu-decoder-precision took any word and its help left int8_dyn out)."""
    from af3trt.build import build_engines
    from af3trt.perf import bench

    ours = set(bench.parser()._option_string_actions)
    theirs = set(build_engines.parser()._option_string_actions)
    assert ours & theirs == {"-h", "--help", "--hf-model", "--out"}  # the checkpoint; --out: bench's results


def test_bench_builds_what_af3trt_build_builds_from_the_same_flags(tmp_path):
    from af3trt.perf import bench
    from af3trt.registry import CPU_DECODER_PRECISIONS, CPU_ENCODER_PRECISIONS

    pinned = ["--encoder-precision", "fp32", "--max-batch-size", "16", "--max-text-len", "512", "--max-output-len",
              "256", "--default-max-tokens", "32", "--cpu-threads", str(os.cpu_count())]  # the bench's defaults
    samples = [[*pinned, "--cpu-decoder-precision", p] for p in CPU_DECODER_PRECISIONS]
    samples += [[*pinned, "--encoder-precision", p] for p in CPU_ENCODER_PRECISIONS]
    samples.append([*pinned, "--max-queue-size", "7", "--queue-timeout-ms", "5", "--max-audio-seconds", "60",
                    "--preprocess-instances", "2", "--encoder-instances", "3", "--encoder-queue-delay-us", "9",
                    "--no-encoder-batching", "--no-crop-frames", "--encoder-threads", "3", "--decoder-threads", "2",
                    "--preprocess-threads", "2", "--encoder-windows-per-run", "4", "--stream-interval-ms", "20",
                    "--decoder-instances", "2", "--no-think"])
    for argv in samples:
        assert bench.build_options(bench.parse_args(argv), tmp_path / "ckpt", tmp_path / "out") \
            == _build_flags(argv, tmp_path), argv
    for bad in (["--cpu-decoder-precision", "int9"], ["--max-queue-size", "-1"], ["--target", "gpu"]):
        with pytest.raises((SystemExit, ValueError)):
            bench.build_options(bench.parse_args(bad), tmp_path / "ckpt", tmp_path / "out")


def test_the_report_names_the_repository_by_its_folder_not_a_machine_path():
    results = fake_results()
    results["repository"] = {"path": "/tmp/w10/work/repo-af3-fp32", "target": "cpu"}
    md = report.render_markdown(results)
    assert "- Repository: `repo-af3-fp32` (target cpu)" in md and "/tmp/w10" not in md


def test_busy_cores_from_samples(monkeypatch):
    monkeypatch.setattr(machine.os, "cpu_count", lambda: 2)
    a = {"t": 0.0, "total": 1000, "idle": 600, "tree_s": 1.0}
    b = {"t": 2.0, "total": 1400, "idle": 700, "tree_s": 3.0}
    got = machine.busy_cores(a, b)
    assert got["machine_busy_cores"] == pytest.approx(1.5) and got["server_cores"] == pytest.approx(1.0)
    assert machine.busy_cores({"t": None}, b) == {}


def test_committed_gpu_projection_doc_is_what_the_code_computes():
    from pathlib import Path

    from af3trt.perf import projection

    from af3trt.registry import af3_reference_config

    docs = Path(__file__).resolve().parent.parent / "docs"
    text = projection.render_markdown([projection.project(af3_reference_config(), label="AF3 (af3trt/reference)")])
    assert text in (docs / "gpu_projection.md").read_text(encoding="utf-8")
    assert "PROJECTION" in text


# ------------------------------------------------------------------------------------------------ headline comparison


def test_spoken_clips_are_distinct_and_in_range():
    from af3trt.runtime.stages.audio import decode_audio

    spoken = clips.spoken_clips(8)
    assert [round(sec, 2) for sec, _ in spoken] == [7.0, 7.43, 7.86, 8.29, 8.71, 9.14, 9.57, 10.0]
    waves = [decode_audio(b) for _, b in spoken]
    assert [len(w) for w in waves] == [int(round(sec * 16000)) for sec, _ in spoken]
    assert len({b for _, b in spoken}) == 8 and all(np.abs(w).max() > 0.05 for w in waves)  # speech, not silence
    with pytest.raises(ValueError):
        clips.spoken_clips(9)
    with pytest.raises(clips.EspeakError, match="does not fit"):
        clips.spoken(clips.SENTENCES[0], 1.0)


def fake_compare() -> dict:
    def pt(name, rps):
        return {"name": name, "throughput_rps": rps, "output_tokens_per_s": 32 * rps, "rtfx": 8.5 * rps}

    runs = {"burst": [pt("burst", r) for r in (3.0, 3.3, 2.9)], "steady": [pt("steady", r) for r in (2.8, 2.7, 3.1)],
            "sequential": [pt("seq", r) for r in (1.0, 1.1, 0.9)], "batched": [pt("bat", r) for r in (2.0, 2.1, 1.9)]}
    return {"rounds": {"rounds": 3, "runs": runs, "medians": compare.medians(runs), "clips_s": [7.0, 10.0],
                       "max_tokens": 32, "concurrency": 8},
            "ttft": {"p50_ms": 90.0, "encoder_ms_p50": 10.0},
            "encoder_curve": [{"seconds": s, "encoded_frames": [lengths.frame_bucket(100 * s)], "encoder_ms": 2.0 * s}
                              for s in (1, 5, 10, 30)],
            "full_window": {"ttft_p50_ms": 200.0, "encoder_ms_p50": 60.0,
                            "encoder_curve": [{"seconds": s, "encoder_ms": 60.0} for s in (1, 5, 10, 30)]}}


@pytest.mark.slow
def test_compare_medians_ratios_and_targets(tmp_path):
    cmp = fake_compare()
    med = cmp["rounds"]["medians"]
    assert med["burst"]["throughput_rps"] == 3.0 and med["steady"]["throughput_rps"] == 2.8
    assert med["burst"]["vs_sequential"] == pytest.approx(3.0) and med["burst"]["vs_batched"] == pytest.approx(1.5)
    assert med["steady"]["vs_sequential"] == pytest.approx(2.8) and med["burst"]["rtfx"] == pytest.approx(25.5)
    t = compare.targets(cmp)
    assert list(t.values()) == [True, True, False, False, True]  # steady 2.8x < 3x, 1.4x < 1.5x; TTFT 90 <= 100
    assert compare.targets({}) == dict.fromkeys(t, None)
    md = "\n".join(compare.render(cmp, "avx2 avx512f"))
    assert "CPU ISA: **avx2 avx512f**" in md and "| (a) af3trt, burst of 8 | 3.00 | 96.0 | 25.5 | **3.00x** | **1.50x** |" in md
    assert "NOT met" in md and "TTFT p50 at c=1, 5-s clip, streaming: **90 ms**" in md and "200 ms" in md
    assert "| encoder ms, full windows | 60.0 |" in md
    split = {"stages": {"encoder": {"queue_ms": 5.0, "compute_ms": 40.0}}}
    cmp["batching"] = {"encoder_batching": True, "queue_delay_us": 2000,
                       "burst": {"throughput_rps": 2.5, "split": split}, "steady": {"throughput_rps": 2.4, "split": split}}
    for k in ("burst", "steady"):
        for r in cmp["rounds"]["runs"][k]:
            r["split"] = split
    md = "\n".join(compare.render(cmp, None))
    assert "| batching on (ablation, one run) | 2.50 | 5 queue + 40 compute | 2.40 |" in md
    assert "| batching off (main, median round) | 3.00 |" in md
    cmp["full_window"] = {"error": "RuntimeError: boom", "server_log": "x.log"}
    assert "- The full-window ablation failed: RuntimeError: boom (see x.log)." in compare.render(cmp, None)
    assert compare.plot_encoder_curve(cmp, tmp_path) == "encoder_ms_vs_clip_seconds.png"
    assert (tmp_path / "encoder_ms_vs_clip_seconds.png").read_bytes()[:4] == b"\x89PNG"
    results = fake_results()
    results["compare"] = cmp
    results["machine"]["cpu"]["isa"] = "avx2"
    assert "CPU ISA: **avx2**" in report.render_markdown(results)


def test_soak_bytes_per_request_fits_after_warm_up():
    """`af3trt soak` tells a leak from warm-up: a 50-MB step in the first 1000 requests, then 3 KB per request for
    the leaking process and nothing for the flat one; the slope is fitted after the warm-up only."""
    from af3trt.perf.soak import bytes_per_request

    series = []
    for n in range(0, 10001, 500):
        warm = 50.0 * min(n, 1000) / 1000  # MB
        leak = warm + max(0, n - 1000) * 3000 / 2**20
        series.append({"requests": n, "total_mb": 100 + leak + 40 + warm,
                       "processes_mb": {"tritonserver": 100 + leak, "decoder": 40 + warm}})
    fit = bytes_per_request(series, warmup_requests=2000)
    assert fit["from_requests"] == 2000 and fit["to_requests"] == 10000 and fit["samples"] == 17
    assert fit["per_process"]["tritonserver"]["bytes_per_request"] == pytest.approx(3000, abs=1)
    assert fit["per_process"]["decoder"]["bytes_per_request"] == pytest.approx(0, abs=1)
    assert bytes_per_request(series, warmup_requests=0)["per_process"]["decoder"]["bytes_per_request"] > 1000
    assert "note" in bytes_per_request(series[:2], warmup_requests=0)



def test_soak_clip_seconds_and_second_half_fit():
    """`--clip-seconds LO-HI` draws clips in that range (the light mix that gets 100,000 requests done sooner);
    a bad range is refused; the report's second-half fit tells a leak (slope stays) from warm-up that lasts."""
    from af3trt.perf import clips
    from af3trt.perf.soak import bytes_per_request, make_clips, parse_seconds

    assert parse_seconds("0.5-1") == (0.5, 1.0) and parse_seconds("2") == (2.0, 2.0)
    for bad in ("1-0.5", "0-1", "-1"):
        with pytest.raises(ValueError):
            parse_seconds(bad)
    import io

    import soundfile as sf

    lengths = [sf.info(io.BytesIO(b)).frames / clips.SR for b in make_clips(4, seconds=(0.5, 1.0))]
    assert all(0.5 <= s <= 1.0 for s in lengths), lengths
    # warm-up that lasts: 2 KB per request over the first half, flat after it
    series = [{"requests": n, "total_mb": 0.0,
               "processes_mb": {"tritonserver": 50 + min(n, 5000) * 2000 / 2**20}} for n in range(0, 10001, 500)]
    whole = bytes_per_request(series, warmup_requests=2000)["per_process"]["tritonserver"]["bytes_per_request"]
    half = bytes_per_request(series, warmup_requests=5000)["per_process"]["tritonserver"]["bytes_per_request"]
    assert whole > 500 and half == pytest.approx(0, abs=1)


def test_soak_report_thins_the_sample_table():
    """soak.md lists at most max_rows evenly spaced samples (first and last included) of a long run, all of them
    stay in soak.json; the per-process table has the second-half column."""
    from af3trt.perf.soak import bytes_per_request, report_md, thin

    series = [{"t_s": 10.0 * k, "requests": 30 * k, "errors": 0, "total_mb": 100.0 + k * 1e-3,
               "processes_mb": {"tritonserver": 40.0 + k * 1e-3}} for k in range(1000)]
    rows = thin(series, 25)
    assert len(rows) == 25 and rows[0] is series[0] and rows[-1] is series[-1]
    assert thin(series[:5], 25) == series[:5]
    res = {"summary": {"requests": 29970, "errors": 0, "latency_ms": {}}, "rss_growth": {}, "client_mode": "reused",
           "concurrency": 8, "max_tokens": 1, "clip_seconds": "0.5-1", "rss_series": series,
           "bytes_per_request": bytes_per_request(series, 6000),
           "bytes_per_request_second_half": bytes_per_request(series, 15000)}
    md = report_md(res, max_rows=25)
    assert "RSS samples (25 of 1000" in md
    assert sum(1 for line in md.splitlines() if line.startswith("| ") and line[2].isdigit()) == 25
    assert "| tritonserver | 35 | 35 |" in md  # 1e-3 MB per 30 requests = 35 B, in both fits


def test_soak_leaves_a_stuck_worker_behind():
    """A client call that never returns (grpc/grpc#20026: a Python channel's close() can deadlock) must not hold
    the soak forever once every request was issued; a worker still busy but not stuck is waited for."""
    import threading
    import time as _time

    from af3trt.perf.soak import wait_workers

    hang, slow_done = threading.Event(), threading.Event()
    busy = {0: _time.monotonic() - 1000, 1: _time.monotonic()}  # worker 0 stuck for 1000 s, worker 1 just began
    threads = [threading.Thread(target=hang.wait, daemon=True),
               threading.Thread(target=lambda: slow_done.wait(0.5), daemon=True)]
    for t in threads:
        t.start()
    t0 = _time.monotonic()
    assert wait_workers(threads, busy, lambda: True, stuck_s=120) == [0]
    assert not threads[1].is_alive() and _time.monotonic() - t0 < 60  # waited for the slow one, not the stuck one
    hang.set()
    threads[0].join()
    assert wait_workers(threads, busy, lambda: True, stuck_s=120) == []
    # while requests are still to be issued, a busy worker is never left behind
    again = threading.Event()
    threads = [threading.Thread(target=again.wait, daemon=True)]
    threads[0].start()
    issuing = iter([False, False, True])
    assert wait_workers(threads, {0: _time.monotonic() - 1000}, lambda: next(issuing), stuck_s=120) == [0]
    again.set()


def test_heal_and_realtime_reports_render_their_records_through_the_table_writer():
    """perf/heal.py and perf/realtime.py write their tables with build/tables.py: each record's cells, in order."""
    from af3trt.perf import heal, realtime

    res = {"rounds": 1, "repo": "r", "start": {"seconds_to_healthy": 9.5, "load": 1.0, "launcher": [], "cpu_s": {}},
           "summary": {"decoder": {"n": 2, "median_s": 8.25, "max_s": 9.0, "load_median": 1.5, "unload_s": 0.5,
                                   "load_s": 6.0},
                       "fusion": {"n": 1, "median_s": 2.0, "max_s": 2.0, "load_median": 0.5, "kill_s": 0.01,
                                  "start_s": 1.5, "model_loads_s": {"fusion": 1.25}}}}
    md = heal.report_md(res)
    assert "| decoder | 2 | 8.2 (9.0) | 1.5 | 0.5 / 6.0 | — | — |" in md
    assert "| fusion | 1 | 2.0 (2.0) | 0.5 | — | 0.01 / 1.5 | fusion 1.2 |" in md
    rt = {"machine": {"cpu": {}, "logical_cpus": 2, "ram_bytes": 2**30}, "load_average": 1.0, "note": "", "speed": 4.0,
          "repository": "r", "ttft": {"with": [{"seconds": 120, "ttft_s": 0.5, "decoder_ms": 40, "prompt_tokens": 9,
                                               "stage_ms": {"preprocess": 3, "encoder": 20, "fusion": 1}}],
                                      "without": []},
          "concurrency": {"session_seconds": 30, "turn_seconds": 10, "ttft_limit_s": 2, "max_sessions_held": 2,
                          "levels": [{"sessions": 2, "turns": 6, "ttft_p50_s": 0.4, "ttft_p95_s": 0.9,
                                      "ttft_max_s": 1.1, "error_count": 0, "holds": True}]}}
    md = realtime.report(rt)
    assert "| 2 min | on | 0.500 | 3 | 20 | 1 | 40 | 9 |" in md
    assert "| 2 | 6 | 0.4 | 0.9 | 1.1 | 0 | yes |" in md


def test_heal_time_is_the_first_answer_not_a_probe_stuck_on_the_dead_stub():
    """A probe sent to a dead python stub fails only after about a second; polled one probe at a time, that second
    was counted into every heal (fusion back after 0.3 s read 1.4 s). Probes overlap, and the first answer counts."""
    import time

    from af3trt.perf import heal

    t0 = time.monotonic()

    class Stage:  # dead for 0.3 s; a probe sent meanwhile hangs 3 s, then fails
        def healthy(self, probe_deadline_s: float) -> bool:
            if time.monotonic() - t0 < 0.3:
                time.sleep(3.0)
                return False
            return True

    seconds = heal.first_answer(Stage(), t0, timeout=30.0)
    assert seconds is not None and 0.3 <= seconds < 2.5, seconds
