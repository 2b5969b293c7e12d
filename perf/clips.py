"""Benchmark clips: speech (the bundled 5-s clip repeated with variations) and non-speech (tones and noise), any
length, as 16-kHz mono FLAC bytes — what a client sends. Deterministic for a given (kind, seconds, seed).

    speech     the bundled clip again and again, each time at another speed (0.9-1.1x, polyphase resampling) and
               gain, separated by short pauses, over a faint noise floor
    nonspeech  alternating segments of notes (a fundamental with two harmonics and a decay) and noise bursts
               (white, or integrated "brown" noise), with short silences
    spoken     distinct sentences spoken by espeak-ng (Debian's `espeak-ng`), resampled to 16 kHz and padded with
               silence to a given length: the burst of 8 distinct 7-10 s clips of `af3trt bench` (spoken_clips)
"""

from __future__ import annotations

import io
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
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
    from af3trt.runtime.stages.audio import decode_audio

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


# Eight distinct sentences, each 6-9 s when spoken by espeak-ng at 150-200 words per minute.
SENTENCES = (
    "The quick brown fox jumps over the lazy dog while the birds are singing in the garden behind the old house.",
    "Please remind me to call the dentist tomorrow morning at nine, and to buy fresh bread on the way back home.",
    "A train arrives at the station; people talk, a door closes, and the engine hums quietly in the background.",
    "The weather will be sunny tomorrow, with a light wind from the west and warm afternoons until the weekend.",
    "Our meeting moved to Thursday afternoon, so the report has to be finished and reviewed before Wednesday.",
    "She played the piano for an hour, then walked to the harbour to watch the fishing boats come in at dusk.",
    "Turn left at the second traffic light, continue for two kilometres, and the museum is on your right side.",
    "In the evening the children read stories aloud, and everyone laughed when the dog tried to join the game.",
)
ESPEAK_SPEEDS = (150, 165, 180, 200, 225)  # words per minute, tried in turn until the sentence fits


class EspeakError(RuntimeError):
    """espeak-ng is missing or failed."""


def espeak(text: str, *, words_per_minute: int = 165, voice: str = "en-us") -> np.ndarray:
    """`text` spoken by espeak-ng: float32 [n] mono at 16 kHz (espeak-ng writes 22050 Hz; polyphase resampled)."""
    import soundfile as sf
    from scipy.signal import resample_poly

    exe = shutil.which("espeak-ng")
    if exe is None:
        raise EspeakError("espeak-ng is not installed (Debian: apt-get install espeak-ng; scripts/setup.sh does it)")
    with tempfile.TemporaryDirectory(prefix="af3trt-espeak-") as tmp:
        wav = Path(tmp) / "speech.wav"
        run = subprocess.run([exe, "-v", voice, "-s", str(words_per_minute), "-w", str(wav), text],
                             capture_output=True, text=True, timeout=60)
        if run.returncode != 0 or not wav.exists():
            raise EspeakError(f"espeak-ng failed ({run.returncode}): {run.stderr.strip()}")
        wave, rate = sf.read(wav, dtype="float32", always_2d=True)
    wave = wave.mean(axis=1)
    if rate != SR:
        from math import gcd

        g = gcd(SR, rate)
        wave = resample_poly(wave, SR // g, rate // g).astype(np.float32)
    return wave


def spoken(text: str, seconds: float) -> np.ndarray:
    """`text` spoken at the slowest espeak-ng speed that fits in `seconds`, padded with silence to exactly that."""
    n = int(round(seconds * SR))
    for wpm in ESPEAK_SPEEDS:
        wave = espeak(text, words_per_minute=wpm)
        if len(wave) <= n:
            return np.concatenate([wave, np.zeros(n - len(wave), np.float32)])
    raise EspeakError(f"{text!r} does not fit in {seconds:g} s even at {ESPEAK_SPEEDS[-1]} words per minute")


def spoken_clips(count: int = 8, min_seconds: float = 7.0, max_seconds: float = 10.0) -> list[tuple[float, bytes]]:
    """`count` distinct spoken clips (SENTENCES in turn) of lengths spread evenly over [min, max] seconds, as
    (seconds, 16-kHz FLAC bytes)."""
    if not 1 <= count <= len(SENTENCES):
        raise ValueError(f"count must be in 1..{len(SENTENCES)}, got {count}")
    secs = np.linspace(min_seconds, max_seconds, count) if count > 1 else np.array([min_seconds])
    return [(float(s), flac_bytes(spoken(SENTENCES[i], float(s)))) for i, s in enumerate(secs)]


def talk(seconds: float, seed: int = 0, pauses: tuple[float, float] = (0.4, 1.6)) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """A long talk for long-form transcription: SENTENCES spoken by espeak-ng (each synthesized once, at two
    speeds), in a seeded random order, separated by pauses drawn from `pauses` seconds, until `seconds`.
    Returns (wave float32 [n] at 16 kHz, [(start, end)) of each spoken sentence in samples)."""
    rng = np.random.default_rng(seed)
    voices = [espeak(s, words_per_minute=w) for s in SENTENCES for w in (165, 200)]
    n = int(seconds * SR)
    wave = np.zeros(n, np.float32)
    spans, at = [], int(rng.uniform(*pauses) * SR)
    while True:
        v = voices[int(rng.integers(len(voices)))]
        if at + len(v) > n:
            break
        wave[at:at + len(v)] = v
        spans.append((at, at + len(v)))
        at += len(v) + int(rng.uniform(*pauses) * SR)
    return wave, spans
