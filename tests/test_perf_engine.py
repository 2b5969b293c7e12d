"""perf/engine.py: fresh clips every round (so the audio cache never flatters af3trt), spreads and the report."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf

from af3trt.perf import engine
from af3trt.runtime.stages import audio_cache


def test_fresh_clips_never_repeat_and_stay_the_same_speech():
    a, b = engine.fresh_clips(2, 1000), engine.fresh_clips(2, 1001)
    digests = {audio_cache.audio_digest([clip]) for _, clip in a + b}
    assert len(digests) == 4  # distinct bytes: no cache hit across rounds or within one
    wa, _ = sf.read(io.BytesIO(a[0][1]), dtype="float32")
    wb, _ = sf.read(io.BytesIO(b[0][1]), dtype="float32")
    assert wa.shape == wb.shape and np.abs(wa - wb).max() < 1e-3  # one sample nudged: the same utterance
    assert 7.0 <= a[0][0] <= a[1][0] <= 10.0


def test_spread_and_report():
    assert engine.spread([1.0, 2.0, 3.0]) == 1.0
    runs = {"default burst": [4.0, 5.0, 6.0], "default sustained": [5.0, 5.0, 5.0], "sequential": [2.0, 2.0, 2.0],
            "batched": [4.0, 4.0, 4.0]}
    med = {k: float(np.median(v)) for k, v in runs.items()}
    result = {"started_utc": "T", "args": {"max_tokens": 32, "sustained": 3, "burst_clips": 8}, "variants": {"default": ""},
              "load_average_start": [1, 1, 1], "load_average_end": [1, 1, 1],
              "compare": {"rounds": 3, "req_s": runs, "median_req_s": med,
                          "spread": {k: engine.spread(v) for k, v in runs.items()},
                          "ratios": {"default burst vs sequential": 2.5, "default burst vs batched": 1.25}}}
    text = engine.render(result)
    assert "| af3trt default burst | 5.00 | 40 % |" in text
    assert "| default burst vs sequential | 2.50 | ≥ 3.0 (missed) |" in text
    assert "| transformers float32 batched generate (8) | 4.00 | 0 % |" in text


class _Peer:
    def __init__(self, dtype, rps):
        self.dtype, self.rps, self.threads = dtype, rps, 2

    process_threads = 0  # torch.set_num_threads is process-wide

    def set_threads(self, n):
        self.threads = _Peer.process_threads = n

    def batched(self, items, n, max_tokens):
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls in (2, 3):  # pick_threads' timing of 1 then 2 threads: float32 faster with 2, bfloat16 with 1
            faster = 2 if self.dtype == "float32" else 1
            return {"seconds": 1.0 if self.threads == faster else 2.0}
        return {"seconds": n / (2 * self.rps)}

    def sequential(self, items, n, max_tokens):
        assert _Peer.process_threads == self.threads  # its own count, whatever the other peer set last
        return {"seconds": [1.0 / self.rps] * n}


def test_rounds_pair_every_af3trt_measure_with_every_peer(monkeypatch):
    """Two af3trt builds and transformers in two dtypes: each af3trt measure gets a ratio to each peer's, and the
    report names the peers by dtype with the target of their kind."""
    import argparse

    speed = {"u1": 6.0, "u2": 12.0}
    monkeypatch.setattr(engine, "af3trt_round", lambda url, args, variant, pid: (
        {"throughput_rps": speed[url], "cpu_s_per_request": 1.0}, {"throughput_rps": speed[url] + 1}))
    monkeypatch.setattr(engine, "fresh_clips", lambda count, variant: [(7.0, b"x")] * count)
    args = argparse.Namespace(burst_clips=2, max_tokens=4, sustained=1, rounds=3, baseline_threads=0)
    refs = {"float32": _Peer("float32", 2.0), "bfloat16": _Peer("bfloat16", 4.0)}
    out = engine.run_rounds({"default": "u1", "bf16": "u2"}, refs, args)
    assert set(out["req_s"]) == {"default burst", "default sustained", "bf16 burst", "bf16 sustained", "sequential",
                                 "batched", "sequential bfloat16", "batched bfloat16"}
    assert out["ratios"]["bf16 burst vs sequential"] == 6.0
    assert out["ratios"]["bf16 burst vs batched bfloat16"] == 1.5
    assert len(out["ratios"]) == 4 * 4 and out["peers"]["bfloat16"]["threads"] == 1
    assert out["peers"]["float32"]["threads"] == 2
    assert set(out["cpu_ratios"]) >= {"bf16 burst vs sequential", "default burst vs batched bfloat16"}
    assert "bf16 sustained vs sequential" not in out["cpu_ratios"]  # no CPU figure, no ratio
    result = {"started_utc": "T", "args": {"max_tokens": 4, "sustained": 1, "burst_clips": 2},
              "variants": {"default": "", "bf16": "--cpu-decoder-precision bf16"}, "load_average_start": [1, 1, 1],
              "load_average_end": [1, 1, 1], "compare": out}
    text = engine.render(result)
    assert "| transformers bfloat16 one-at-a-time | 4.00 | 0 % | 4.00 / 4.00 / 4.00 |" in text
    assert "| af3trt bf16 burst | 12.00 | 0 % | 12.00 / 12.00 / 12.00 | 1.00 |" in text
    assert "ratio of CPU seconds per request" in text
    assert "| bf16 burst vs sequential bfloat16 | 3.00 | ≥ 3.0 (met) |" in text
    assert "| default burst vs batched bfloat16 | 0.75 | ≥ 1.5 (missed) |" in text


@pytest.mark.slow  # a fresh python with torch and transformers
def test_decode_step_runs_the_engine_under_the_isa_cap(lm_dir):
    """perf/decode_step.py: a fresh process per ISA and thread count, torch's kernels capped to AVX2 when asked (the
    emulation); every precision at every batch."""
    import argparse

    from af3trt.perf import decode_step

    args = argparse.Namespace(prompt=8, steps=3, repeats=1, batches=[1, 2])
    rows = decode_step.run_one({"fp32": (str(lm_dir), False), "int8_dyn": (str(lm_dir), True)}, "avx2", 1, args)
    assert {(r["precision"], r["batch"]) for r in rows} == {(p, b) for p in ("fp32", "int8_dyn") for b in (1, 2)}
    assert all(r["torch_capability"] == "AVX2" and r["ms_median"] > 0 for r in rows)
    text = decode_step.render({"started_utc": "T", "preset": "tiny", "prompt": 8, "steps": 3, "repeats": 1,
                               "load_average_start": [1], "load_average_end": [1], "rows": rows})
    assert "| avx2 (emulated) | int8_dyn | 1 | 2 |" in text


def test_tree_cpu_seconds_counts_children():
    import os
    import subprocess
    import sys
    import time

    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\nprint('done', flush=True)\n" \
        "time.sleep(60)"
    before = engine.tree_cpu_seconds(os.getpid()) - time.process_time()
    child = subprocess.Popen([sys.executable, "-c", burn], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "done"  # it has spent 0.3 s of CPU and is still alive
        assert engine.tree_cpu_seconds(os.getpid()) - time.process_time() - before >= 0.25  # the child's, not ours
    finally:
        child.kill()
        child.wait()


def test_report_breaks_a_burst_down_by_stage():
    stage = {"queue_ms": 10.0, "compute_ms": 5.0}
    split = {"ensemble_ms": 900.0, "decoder_generation_ms": 800.0,
             "stages": {"preprocess": stage, "encoder": {"queue_ms": 40.0, "compute_ms": 20.0}, "fusion": stage}}
    runs = {"default burst": [1.0], "sequential": [1.0], "batched": [1.0]}
    result = {"started_utc": "T", "args": {"max_tokens": 4, "sustained": 1, "burst_clips": 2},
              "variants": {"default": ""}, "load_average_start": [1], "load_average_end": [1],
              "compare": {"rounds": 1, "req_s": runs, "median_req_s": {k: 1.0 for k in runs},
                          "spread": {k: 0.0 for k in runs}, "ratios": {}, "splits": {"default burst": [split, None]}}}
    assert "| default burst | 15 | 60 | 15 | 800 | 900 |" in engine.render(result)
