"""Long-form transcription: audio of any length cut into pieces of at most one 30-s window, each transcribed as a
request of its own, concurrently, and joined in order.

    spans = split(iter_mono_16k(stream), Chunking.auto())   # pieces, read a block at a time
    async for span, text in ordered(aiter_spans, transcribe_one, concurrency=4): ...

Cutting (`auto`, and OpenAI's `server_vad` object): frames of 10 ms are silent when their RMS is far enough below
the speech level of the window being cut (its 95th-percentile frame), or under an absolute floor. When the pending
audio reaches one window, the cut goes in the middle of the latest pause of at least `silence_ms` (so a piece is as
long as it can be, and never ends inside speech when a pause is near); failing that, in the longest silent run;
failing that, at the quietest frame of the window's second half. `fixed` cuts every `window_s` seconds. Pieces
with no frame above the silence level are left out (there is nothing to transcribe), so segments may leave gaps.

Memory: the decoder's block, at most one window plus one block of pending samples, and the pieces in flight
(concurrency × one window, sent as float32 WAV): bounded whatever the file's length.
"""

from __future__ import annotations

import asyncio
import io
import json
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Iterable, Iterator, TypeVar

import numpy as np
import soundfile as sf

from af3trt.runtime.stages import lengths
from af3trt.runtime.stages.lengths import SAMPLE_RATE, WINDOW_SAMPLES

# AF3's transcription request, as AudioFlamingo3Processor.apply_transcription_request builds it
# (transformers models/audioflamingo3/processing_audioflamingo3.py, default_transcription_prompt); its answer
# "The spoken content of the audio is "…"." is unwrapped by the ensemble's strip_prefix.
TRANSCRIPTION_PROMPT = "Transcribe the input speech."
FRAME = SAMPLE_RATE // 100  # 10-ms frames for the silence detector
SILENT_FLOOR_DB = -60.0  # frames quieter than this (dBFS) are silent whatever the speech level


@dataclass(frozen=True)
class Chunking:
    """How a long clip is cut. kind: "vad" (auto / server_vad) or "fixed"."""

    kind: str = "vad"
    window_s: float = lengths.WINDOW_SECONDS  # longest piece (fixed: every piece but the last)
    threshold: float = 0.5  # OpenAI's server_vad threshold, 0..1: higher needs louder audio to count as speech
    silence_ms: int = 500  # OpenAI's silence_duration_ms: the shortest pause a cut prefers
    prefix_padding_ms: int = 300  # OpenAI's prefix_padding_ms: audio kept before speech that follows a cut

    @property
    def margin_db(self) -> float:
        """A frame is silent below the speech level minus this (threshold 0.5: 20 dB)."""
        return 40.0 * (1.0 - self.threshold)


def parse_chunking(value) -> Chunking | None:
    """OpenAI's `chunking_strategy`: "auto", {"type": "server_vad", "threshold", "silence_duration_ms",
    "prefix_padding_ms"} (given as JSON text in a form, or already parsed), or this server's {"type": "fixed",
    "window_seconds": s} (s <= 30). None or "" → None (no chunking). ValueError says what is wrong."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        if value == "auto":
            return Chunking()
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError(f"chunking_strategy must be 'auto' or an object, got {value!r}") from None
    if not isinstance(value, dict):
        raise ValueError(f"chunking_strategy must be 'auto' or an object, got {value!r}")
    kind, rest = value.get("type"), {k: v for k, v in value.items() if k != "type"}
    try:
        if kind == "server_vad":
            unknown = set(rest) - {"threshold", "silence_duration_ms", "prefix_padding_ms"}
            if unknown:
                raise ValueError(f"unknown server_vad field(s): {', '.join(sorted(unknown))}")
            c = Chunking(threshold=float(rest.get("threshold", 0.5)),
                         silence_ms=int(rest.get("silence_duration_ms", 500)),
                         prefix_padding_ms=int(rest.get("prefix_padding_ms", 300)))
            if not 0.0 <= c.threshold <= 1.0 or c.silence_ms < 0 or c.prefix_padding_ms < 0:
                raise ValueError("threshold must be in 0..1, durations >= 0")
            return c
        if kind == "fixed":
            if set(rest) - {"window_seconds"}:
                raise ValueError("a fixed chunking_strategy takes only window_seconds")
            window = float(rest.get("window_seconds", lengths.WINDOW_SECONDS))
            if not 1.0 <= window <= lengths.WINDOW_SECONDS:
                raise ValueError(f"window_seconds must be in 1..{lengths.WINDOW_SECONDS}, got {window:g}")
            return Chunking(kind="fixed", window_s=window)
    except (TypeError, ValueError) as e:
        raise ValueError(f"chunking_strategy: {e}") from None
    raise ValueError(f"chunking_strategy type must be 'server_vad' or 'fixed', got {kind!r}")


# ---------------------------------------------------------------------------------------------- cutting


@dataclass
class Span:
    """One piece: its index among the pieces sent, where it starts (16-kHz samples) and its samples."""

    index: int
    start: int
    wave: np.ndarray  # [n] float32, n <= one window

    @property
    def end(self) -> int:
        return self.start + len(self.wave)


def frame_db(wave: np.ndarray) -> np.ndarray:
    """RMS of each whole 10-ms frame in dBFS: [len(wave) // FRAME]."""
    n = len(wave) // FRAME
    frames = wave[: n * FRAME].reshape(n, FRAME).astype(np.float64)  # [n, 160]
    return 10.0 * np.log10(np.mean(frames * frames, axis=1) + 1e-12)


def silent_frames(wave: np.ndarray, c: Chunking) -> np.ndarray:
    """[len(wave) // FRAME] bool: frames below the window's speech level minus the margin, or below the floor."""
    db = frame_db(wave)
    if len(db) == 0:
        return np.zeros(0, bool)
    level = np.percentile(db, 95)
    return db < max(level - c.margin_db, SILENT_FLOOR_DB)


def _runs(flags: np.ndarray) -> list[tuple[int, int]]:
    """[(start, end)) of the runs of True in flags."""
    edges = np.diff(np.concatenate(([0], flags.astype(np.int8), [0])))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()))


def find_cut(wave: np.ndarray, c: Chunking) -> int:
    """Where to end the piece that starts wave (len(wave) >= one window): a sample index in 1..window."""
    limit = int(c.window_s * SAMPLE_RATE)
    if c.kind == "fixed":
        return limit
    silent = silent_frames(wave[:limit], c)
    runs = _runs(silent)
    pauses = [r for r in runs if (r[1] - r[0]) * FRAME >= c.silence_ms * SAMPLE_RATE // 1000]
    if pauses:
        a, b = pauses[-1]  # the latest pause: the longest piece that ends in one
    elif runs:
        a, b = max(runs, key=lambda r: (r[1] - r[0], r[0]))  # the longest silent run
    else:  # speech throughout: the quietest frame of the second half
        db = frame_db(wave[:limit])
        half = len(db) // 2
        q = half + int(np.argmin(db[half:]))
        return max(1, min(limit, q * FRAME + FRAME // 2))
    if b * FRAME >= limit and a > 0:  # a pause running to the window's end: cut a padding before the speech
        return max(1, min(limit, max(a * FRAME, limit - c.prefix_padding_ms * SAMPLE_RATE // 1000)))
    return max(1, min(limit, (a + b) * FRAME // 2))  # the middle of the pause


def _has_speech(wave: np.ndarray) -> bool:
    if len(wave) < lengths.min_samples_with_tokens():
        return False
    return bool(frame_db(wave).max(initial=-np.inf) >= SILENT_FLOOR_DB)


def split(blocks: Iterable[np.ndarray], c: Chunking) -> Iterator[Span]:
    """Cut a stream of mono 16-kHz blocks into pieces of at most one window (window_s); the pieces' samples, with
    those of the pieces left out for silence, are the stream's samples in order."""
    limit = int(c.window_s * SAMPLE_RATE)
    assert limit <= WINDOW_SAMPLES
    pending = np.zeros(0, np.float32)  # [<= limit + block]
    start, index = 0, 0
    for block in blocks:
        pending = np.concatenate([pending, block.astype(np.float32, copy=False)])
        while len(pending) >= limit:
            cut = find_cut(pending, c)
            piece, pending = pending[:cut], pending[cut:]
            if _has_speech(piece):
                yield Span(index, start, piece)
                index += 1
            start += cut
    if len(pending) and _has_speech(pending):
        yield Span(index, start, pending)


def wav_bytes(wave: np.ndarray) -> bytes:
    """A piece as a 16-kHz float32 WAV: the ensemble decodes exactly these samples (no requantization)."""
    buf = io.BytesIO()
    sf.write(buf, wave, SAMPLE_RATE, format="WAV", subtype="FLOAT")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------- running

T = TypeVar("T")
_END = object()


async def aiter_thread(it: Iterator[T]) -> AsyncIterator[T]:
    """An iterator whose steps block (decoding, cutting) stepped in a worker thread, one item at a time.

    Cancelled while a step runs (the request failed or its client left), it returns only once that step has ended: a
    thread cannot be stopped, and the caller then closes what the step reads. Before, the OpenAI front closed the
    upload's SoundFile under a read still in progress and libsndfile crashed the whole front (SIGSEGV in
    soundfile's _cdata_io; 20 times in a 43-minute chaos soak, perf/chaos.py)."""
    loop = asyncio.get_running_loop()
    while True:
        step = loop.run_in_executor(None, next, it, _END)
        try:
            item = await asyncio.shield(step)
        except asyncio.CancelledError:
            while not step.done():  # one block's read at most
                try:
                    await asyncio.wait({step})
                except asyncio.CancelledError:
                    continue
            if not step.cancelled():
                step.exception()  # retrieved: nobody waits for this step's item or error now
            raise
        if item is _END:
            return
        yield item


async def ordered(spans: AsyncIterator[Span], run: Callable[[Span], AsyncIterator[T]],
                  concurrency: int) -> AsyncIterator[tuple[Span, T | None]]:
    """Run `run(span)` for up to `concurrency` spans at once and yield (span, item) for each of its items, spans in
    order and items in order; (span, None) when a span's items are over. A later span's items wait (buffered) until
    every earlier span is over. An error in a span or in `spans` ends everything: the others are cancelled."""
    slots = asyncio.Semaphore(concurrency)
    lanes: asyncio.Queue = asyncio.Queue()  # (span, its queue) in order; an exception; or _END
    tasks: set[asyncio.Task] = set()

    async def one(span: Span, q: asyncio.Queue) -> None:
        try:
            async for item in run(span):
                q.put_nowait(item)
            q.put_nowait(_END)
        except Exception as e:  # noqa: BLE001 - handed to the consumer, which raises it in order
            q.put_nowait(e)
        finally:
            slots.release()

    async def feed() -> None:
        try:
            async for span in spans:
                await slots.acquire()
                q: asyncio.Queue = asyncio.Queue()
                t = asyncio.ensure_future(one(span, q))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
                lanes.put_nowait((span, q))
            lanes.put_nowait(_END)
        except Exception as e:  # noqa: BLE001
            lanes.put_nowait(e)

    feeder = asyncio.ensure_future(feed())
    try:
        while (lane := await lanes.get()) is not _END:
            if isinstance(lane, Exception):
                raise lane
            span, q = lane
            while (item := await q.get()) is not _END:
                if isinstance(item, Exception):
                    raise item
                yield span, item
            yield span, None
    finally:
        feeder.cancel()
        for t in list(tasks):
            t.cancel()
        await asyncio.gather(feeder, *tasks, return_exceptions=True)


class Joiner:
    """The pieces' texts as one transcript, fed delta by delta: each piece stripped, one space between non-empty
    pieces. feed() returns what may be sent now (a piece's trailing whitespace is held until more text follows),
    so the deltas sent add up to `text` exactly."""

    def __init__(self):
        self.text, self.held, self.in_piece = "", "", False

    def next_piece(self) -> None:
        self.held, self.in_piece = "", False

    def feed(self, delta: str) -> str:
        if not self.in_piece:
            delta = delta.lstrip()
            if not delta:
                return ""
            lead, self.in_piece = (" " if self.text else ""), True
        else:
            lead = self.held
        body = delta.rstrip()
        if not body:
            self.held += delta
            return ""
        self.held = delta[len(body):]
        out = lead + body
        self.text += out
        return out


def clock(seconds: float) -> str:
    h, rest = divmod(seconds, 3600)
    m, sec = divmod(rest, 60)
    return f"{int(h)}:{int(m):02d}:{sec:05.2f}"
