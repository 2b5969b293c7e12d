"""Benchmark clips: speech (the bundled 5-s clip repeated with variations) and non-speech (tones and noise), any
length, as 16-kHz mono FLAC bytes — what a client sends. Deterministic for a given (kind, seconds, seed).

    speech     the bundled clip again and again, each time at another speed (0.9-1.1x, polyphase resampling) and
               gain, separated by short pauses, over a faint noise floor
    nonspeech  alternating segments of notes (a fundamental with two harmonics and a decay) and noise bursts
               (white, or integrated "brown" noise), with short silences
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

SR = 16000
KINDS = ("speech", "nonspeech")
SPEEDS = ((10, 9), (20, 19), (1, 1), (20, 21), (10, 11))  # resample_poly (up, down): 1.11x … 0.91x length


@dataclass(frozen=True)
class ClipSpec:
    kind: str
    seconds: float

    @property
    def name(self) -> str:
        s = self.seconds
        label = f"{s / 60:g}min" if s >= 60 and s % 60 == 0 else f"{s:g}s"
        return f"{self.kind}-{label}"

    @classmethod
    def parse(cls, text: str) -> "ClipSpec":
        """"speech:10" or "nonspeech:600" (seconds)."""
        kind, _, secs = text.partition(":")
        if kind not in KINDS or not secs:
            raise ValueError(f"clip spec {text!r}: expected KIND:SECONDS with KIND in {KINDS}")
        return cls(kind, float(secs))


@lru_cache(maxsize=1)
def bundled_speech() -> np.ndarray:
    from af3trt.runtime import assets
    from af3trt.runtime.audio import decode_audio

    return decode_audio(assets.speech_path().read_bytes())  # float32 [n] at 16 kHz


def speech(seconds: float, seed: int = 0) -> np.ndarray:
    from scipy.signal import resample_poly

    rng = np.random.default_rng(seed)
    base = bundled_speech()
    n = int(round(seconds * SR))
    parts, total = [], 0
    while total < n:
        up, down = SPEEDS[rng.integers(len(SPEEDS))]
        seg = resample_poly(base, up, down).astype(np.float32) if up != down else base.copy()
        seg *= rng.uniform(0.5, 1.0)
        gap = np.zeros(int(rng.uniform(0.1, 0.6) * SR), np.float32)
        parts += [seg, gap]
        total += len(seg) + len(gap)
    wave = np.concatenate(parts)[:n]
    return (wave + 0.002 * rng.standard_normal(n)).astype(np.float32)


def nonspeech(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed + 1000)
    n = int(round(seconds * SR))
    parts, total, k = [], 0, 0
    while total < n:
        dur = int(rng.uniform(0.25, 1.2) * SR)
        t = np.arange(dur) / SR
        if k % 3 != 2:  # notes
            f0 = 110.0 * 2 ** (rng.integers(0, 36) / 12)
            note = sum(a * np.sin(2 * np.pi * f0 * h * t) for h, a in ((1, 1.0), (2, 0.4), (3, 0.2)))
            seg = 0.3 * note * np.exp(-t * rng.uniform(1.0, 5.0))
        else:  # noise burst
            white = rng.standard_normal(dur)
            seg = 0.1 * (white if rng.random() < 0.5 else np.cumsum(white) / np.sqrt(np.arange(1, dur + 1)))
        gap = np.zeros(int(rng.uniform(0.0, 0.3) * SR))
        parts += [seg, gap]
        total += dur + len(gap)
        k += 1
    return np.concatenate(parts)[:n].astype(np.float32)


def make_wave(spec: ClipSpec, seed: int = 0) -> np.ndarray:
    return speech(spec.seconds, seed) if spec.kind == "speech" else nonspeech(spec.seconds, seed)


def flac_bytes(wave: np.ndarray) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.clip(wave, -1.0, 1.0), SR, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def make_clip(spec: ClipSpec, seed: int = 0) -> bytes:
    return flac_bytes(make_wave(spec, seed))
