"""perf/engine.py: fresh clips every round (so the audio cache never flatters af3trt), spreads and the report."""

from __future__ import annotations

import io

import numpy as np
import soundfile as sf

from af3trt.perf import engine
from af3trt.runtime import audio_cache


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
    assert "| transformers batched generate (8) | 4.00 | 0 % |" in text
