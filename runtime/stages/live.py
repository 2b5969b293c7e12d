"""Live audio: a stream as it arrives (runtime/openai/realtime.py) — the formats clients stream, one turn's audio with
its 30-s windows as they complete, a voice-activity detector that finds turns, and a pace check.

    fmt = parse_format({"type": "audio/pcm", "rate": 24000})
    turn = Turn(fmt, max_windows=20)
    turn.append(raw)            # the client's bytes; returns the input samples dropped past AF3's limit
    turn.windows                # complete 30-s windows: final, whatever audio follows
    turn.clip()                 # the turn as the client sent it, in a WAV at its own rate: the reference
    turn.clip16()               # the same as preprocess decodes it: 16-kHz float32 WAV, what a commit sends
    turn.prefix(k)              # its first k windows as a 16-kHz float32 WAV: what is encoded ahead

The reference of a turn is the ensemble's request whose clip is `turn.clip()`: the client's bytes in a WAV container,
decoded and resampled by preprocess as every clip is. The 16-kHz samples a Turn computes as audio arrives are the ones
preprocess computes from that clip (the same StreamResampler, whose output does not depend on block sizes,
runtime/stages/resample.py), so clip16() holds exactly the samples preprocess would read from clip() (and a
float32 WAV is decoded without rounding): sending it spares preprocess the resampling of the whole turn at the
commit (1 s for 10 min of 24-kHz audio on these CPUs). Window k of turn.prefix(k + 1) is window k of the clip
sample for sample, so the window keys (runtime/stages/audio_cache.py, by content) of the requests sent ahead are the
clip's. Nothing here decides what an answer is: a window sent ahead that differs from the clip's (a turn cut inside
a window's resampling context) is a cache miss, never a wrong row.
"""

from __future__ import annotations

import base64
import binascii
import copy
import struct
from dataclasses import dataclass

import numpy as np

from af3trt.runtime.stages.lengths import SAMPLE_RATE, WINDOW_SAMPLES
from af3trt.runtime.stages.longform import FRAME, SILENT_FLOOR_DB, wav_bytes
from af3trt.runtime.stages.resample import StreamResampler

PCM_RATES = (16000, 24000)  # OpenAI's Realtime API streams 24-kHz PCM16; 16 kHz is AF3's own rate
G711_RATE = 8000  # telephony (SIP, Twilio): 8-kHz G.711 mu-law or A-law, one byte per sample


# ---------------------------------------------------------------------------------------------- formats


def _g711_table(alaw: bool) -> np.ndarray:
    """ITU-T G.711: code 0..255 → its linear 16-bit value / 32768 as float32 (libsndfile's tables: checked by
    tests/test_realtime_units.py)."""
    codes = np.arange(256)
    if alaw:
        a = codes ^ 0x55
        exp, man = (a >> 4) & 7, a & 0x0F
        mag = np.where(exp == 0, (man << 4) + 8, ((man << 4) + 0x108) << np.maximum(exp - 1, 0))
        lin = np.where(a & 0x80, mag, -mag)
    else:
        u = ~codes & 0xFF
        exp, man = (u >> 4) & 7, u & 0x0F
        mag = (((man << 3) + 0x84) << exp) - 0x84
        lin = np.where(u & 0x80, -mag, mag)
    return (lin / 32768.0).astype(np.float32)


_ULAW, _ALAW = _g711_table(False), _g711_table(True)


@dataclass(frozen=True)
class InputFormat:
    """How the client's audio bytes are encoded: "pcm16" (little-endian, mono) at 16 or 24 kHz, or G.711 "pcmu" /
    "pcma" at 8 kHz."""

    encoding: str
    rate: int

    @property
    def sample_bytes(self) -> int:
        return 2 if self.encoding == "pcm16" else 1

    def describe(self) -> dict:
        """OpenAI's format object."""
        if self.encoding == "pcm16":
            return {"type": "audio/pcm", "rate": self.rate}
        return {"type": f"audio/{self.encoding}"}

    def decode(self, data: bytes) -> np.ndarray:
        """float32 [n] in [-1, 1): what soundfile reads from the same bytes in a WAV (tests/test_realtime_units.py)."""
        if self.encoding == "pcm16":
            return np.frombuffer(data, "<i2").astype(np.float32) / 32768.0
        return (_ULAW if self.encoding == "pcmu" else _ALAW)[np.frombuffer(data, np.uint8)]

    def wav(self, raw: bytes) -> bytes:
        """The bytes as a mono WAV file (RIFF: PCM, or WAVE_FORMAT_MULAW / _ALAW with its fact chunk)."""
        code = {"pcm16": 1, "pcma": 6, "pcmu": 7}[self.encoding]
        bits = 8 * self.sample_bytes
        fmt = struct.pack("<HHIIHH", code, 1, self.rate, self.rate * self.sample_bytes, self.sample_bytes, bits)
        chunks = b"fmt " + struct.pack("<I", len(fmt)) + fmt
        if code != 1:
            fmt += struct.pack("<H", 0)  # cbSize: a non-PCM fmt chunk has 18 bytes
            chunks = b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"fact" + struct.pack("<II", 4, len(raw))
        chunks += b"data" + struct.pack("<I", len(raw)) + raw + (b"\0" if len(raw) % 2 else b"")
        return b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WAVE" + chunks


def parse_format(value) -> InputFormat:
    """OpenAI's input audio format: {"type": "audio/pcm", "rate": 24000 | 16000}, {"type": "audio/pcmu"},
    {"type": "audio/pcma"}, or the beta API's "pcm16" (24 kHz), "g711_ulaw", "g711_alaw". ValueError says why not."""
    beta = {"pcm16": InputFormat("pcm16", 24000), "g711_ulaw": InputFormat("pcmu", G711_RATE),
            "g711_alaw": InputFormat("pcma", G711_RATE)}
    if isinstance(value, str) and value in beta:
        return beta[value]
    kinds = ("audio/pcm", "audio/pcmu", "audio/pcma")
    if not isinstance(value, dict) or value.get("type") not in kinds:
        raise ValueError(f"audio format {value!r}: give {{'type': 'audio/pcm', 'rate': 24000 or 16000}}, "
                         f"{{'type': 'audio/pcmu'}} or {{'type': 'audio/pcma'}}")
    extra = set(value) - {"type", "rate"}
    if extra:
        raise ValueError(f"audio format: unknown field(s) {', '.join(sorted(extra))}")
    if value["type"] == "audio/pcm":
        rate = value.get("rate", 24000)
        if rate not in PCM_RATES:
            raise ValueError(f"audio/pcm rate {rate!r}: this server takes {' or '.join(map(str, PCM_RATES))} Hz")
        return InputFormat("pcm16", int(rate))
    if value.get("rate", G711_RATE) != G711_RATE:
        raise ValueError(f"{value['type']} is {G711_RATE} Hz, got rate {value['rate']!r}")
    return InputFormat(value["type"][len("audio/"):], G711_RATE)


def decode_base64_audio(data: str, fmt: InputFormat) -> bytes:
    """The bytes of an append (or an input_audio part); ValueError for bad base64 or a partial sample."""
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError, TypeError) as e:
        raise ValueError(f"audio is not valid base64 ({e})") from None
    if len(raw) % fmt.sample_bytes:
        raise ValueError(f"{len(raw)} bytes of {fmt.encoding}: not a whole number of {fmt.sample_bytes}-byte samples")
    return raw


# ---------------------------------------------------------------------------------------------- a turn


class Turn:
    """One turn's audio as it arrives: the client's bytes (at most what fixes AF3's first max_windows windows) and
    their 16-kHz samples, final so far."""

    def __init__(self, fmt: InputFormat, max_windows: int):
        self.fmt, self.max_windows = fmt, max_windows
        self.keep16 = max_windows * WINDOW_SAMPLES  # 16-kHz samples AF3 reads
        self._resampler = StreamResampler(fmt.rate, SAMPLE_RATE) if fmt.rate != SAMPLE_RATE else None
        # input samples kept: those that fix the first keep16 outputs (preprocess decodes a longer clip that far)
        self.keep_in = self._resampler.inputs_needed(self.keep16) if self._resampler else self.keep16
        self.raw = bytearray()
        self.dropped = 0  # input samples past keep_in, not kept
        self._cut = False  # cut() kept fewer inputs than the resampler has seen
        self._wave = np.zeros(0, np.float32)  # 16-kHz samples, final; capacity grows by doubling
        self.n16 = 0

    @property
    def samples(self) -> int:
        """Input samples kept."""
        return len(self.raw) // self.fmt.sample_bytes

    @property
    def seconds(self) -> float:
        """Seconds received (kept or not)."""
        return (self.samples + self.dropped) / self.fmt.rate

    @property
    def truncated(self) -> bool:
        """More audio arrived than AF3 reads (the ensemble reads the first max_windows windows of the clip)."""
        return (self.samples + self.dropped) * SAMPLE_RATE > self.keep16 * self.fmt.rate

    @property
    def samples16(self) -> int:
        """16-kHz samples of the whole clip (what preprocess decodes from clip())."""
        return self._resampler.outputs_for(self.samples) if self._resampler else self.samples

    @property
    def windows(self) -> int:
        """Complete 30-s windows, final whatever follows."""
        return min(self.n16 // WINDOW_SAMPLES, self.max_windows)

    def append(self, raw: bytes) -> int:
        """Add whole samples; returns how many input samples were dropped (past keep_in)."""
        room = max(0, self.keep_in - self.samples) * self.fmt.sample_bytes
        kept = raw[:room]
        dropped = (len(raw) - len(kept)) // self.fmt.sample_bytes
        self.dropped += dropped
        if kept:
            self.raw += kept
            x = self.fmt.decode(kept)
            self._push(self._resampler.feed(x) if self._resampler else x)
        return dropped

    def _push(self, out: np.ndarray) -> None:
        out = out[: self.keep16 - self.n16]
        need = self.n16 + len(out)
        if need > len(self._wave):
            grown = np.zeros(min(self.keep16, max(need, 2 * len(self._wave))), np.float32)
            grown[: self.n16] = self._wave[: self.n16]
            self._wave = grown
        self._wave[self.n16: need] = out
        self.n16 = need

    def cut(self, samples: int) -> bytes:
        """Keep the first `samples` input samples (a turn that voice activity ended there); return the bytes after
        them (the start of what follows). Windows past the cut are no longer complete."""
        at = min(samples, self.samples) * self.fmt.sample_bytes
        rest = bytes(self.raw[at:])
        del self.raw[at:]
        self._cut = self._cut or bool(rest)
        final = samples * SAMPLE_RATE // self.fmt.rate  # at most these outputs stay as they were
        self.n16 = min(self.n16, final)
        return rest

    def clip(self) -> bytes:
        """The turn as the client sent it (the kept bytes), in a WAV at its own rate."""
        return self.fmt.wav(bytes(self.raw))

    def clip16(self) -> bytes:
        """The turn as preprocess decodes clip(): its first max_windows windows at 16 kHz, as a float32 WAV."""
        if self._resampler is None:
            wave = self._wave[: self.n16]
        elif not self._cut:  # the samples so far and the filter's tail (the input ends here)
            wave = np.concatenate([self._wave[: self.n16], copy.deepcopy(self._resampler).finish()])
        else:  # cut by voice activity: the resampler has seen inputs past the cut
            again = StreamResampler(self.fmt.rate, SAMPLE_RATE)
            x = self.fmt.decode(bytes(self.raw))
            wave = np.concatenate([again.feed(x), again.finish()])
        return wav_bytes(wave[: self.keep16])

    def wave(self, k: int) -> np.ndarray:
        """float32 [k * 480000]: the first k complete windows at 16 kHz."""
        if not 0 <= k <= self.windows:
            raise ValueError(f"{k} windows asked, {self.windows} complete")
        return self._wave[: k * WINDOW_SAMPLES]

    def prefix(self, k: int) -> bytes:
        """The first k complete windows as a 16-kHz float32 WAV (decoded exactly: no requantization)."""
        return wav_bytes(self.wave(k))


# ---------------------------------------------------------------------------------------------- turns by voice


@dataclass(frozen=True)
class VadConfig:
    """OpenAI's server_vad: threshold 0..1 (higher needs louder audio), audio kept before speech, the pause that ends
    a turn, and what happens then."""

    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 500
    create_response: bool = True
    interrupt_response: bool = True

    @property
    def margin_db(self) -> float:
        """A frame is speech this far above the noise floor (threshold 0.5: 20 dB; the floor at least -60 dBFS)."""
        return 40.0 * self.threshold


MIN_SPEECH_MS = 30  # speech this long (3 frames) starts a turn: a click does not
FLOOR_RISE_DB = 0.01  # per 10-ms frame: the noise floor follows a louder background at 1 dB/s


class ServerVad:
    """Voice activity on a 16-kHz stream, 10-ms frames by RMS: feed(samples) → [("started", sample), ("stopped",
    sample)], sample indices counted from the stream's start. "started" gives the first frame of speech; "stopped"
    the end of the pause of silence_duration_ms that ended it (OpenAI's audio_end_ms: the pause is in the turn)."""

    def __init__(self, config: VadConfig):
        self.config = config
        self._pending = np.zeros(0, np.float32)
        self.frames = 0  # frames seen
        self.floor = SILENT_FLOOR_DB
        self.speaking = False
        self._run = 0  # consecutive speech frames (idle) or silent frames (speaking)

    def reset(self) -> None:
        """Forget the turn being heard (a commit or clear ended it); frames keep their count."""
        self.speaking, self._run = False, 0

    def feed(self, wave: np.ndarray) -> list[tuple[str, int]]:
        buf = np.concatenate([self._pending, np.asarray(wave, np.float32)])
        n = len(buf) // FRAME
        self._pending = buf[n * FRAME:]
        if n == 0:
            return []
        frames = buf[: n * FRAME].reshape(n, FRAME).astype(np.float64)  # [n, 160]
        db = 10.0 * np.log10(np.mean(frames * frames, axis=1) + 1e-12)
        events = []
        start_run = max(1, MIN_SPEECH_MS * SAMPLE_RATE // 1000 // FRAME)
        stop_run = max(1, self.config.silence_duration_ms * SAMPLE_RATE // 1000 // FRAME)
        for d in db:
            speech = d > max(self.floor, SILENT_FLOOR_DB) + self.config.margin_db
            if not speech:
                self.floor = min(d, self.floor + FLOOR_RISE_DB)
            self.frames += 1
            if not self.speaking:
                self._run = self._run + 1 if speech else 0
                if self._run >= start_run:
                    self.speaking, self._run = True, 0
                    events.append(("started", (self.frames - start_run) * FRAME))
            else:
                self._run = 0 if speech else self._run + 1
                if self._run >= stop_run:
                    self.speaking, self._run = False, 0
                    events.append(("stopped", self.frames * FRAME))
        return events


# ---------------------------------------------------------------------------------------------- pace


class Pace:
    """Audio may arrive at most `speed` times faster than real time, after an allowance of `burst_s` seconds:
    audio seconds received <= burst_s + speed * seconds since the start. speed 0: no limit."""

    def __init__(self, speed: float, burst_s: float, now: float):
        self.speed, self.burst_s, self.start, self.seconds = speed, burst_s, now, 0.0

    def admit(self, seconds: float, now: float) -> bool:
        """Count `seconds` of audio arriving at `now` if the pace allows them; False (not counted) otherwise."""
        if self.speed > 0 and self.seconds + seconds > self.burst_s + self.speed * (now - self.start):
            return False
        self.seconds += seconds
        return True
