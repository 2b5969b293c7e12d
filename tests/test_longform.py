"""Long-form transcription's cutting and ordering (runtime/stages/longform.py): pieces of at most one window, cut in
pauses, covering the audio in order; the concurrent runner's order; the chunking_strategy parser."""

from __future__ import annotations

import asyncio
import io
import random

import numpy as np
import pytest
import soundfile as sf

from af3trt.perf.clips import talk
from af3trt.runtime.stages import longform
from af3trt.runtime.stages.audio import decode_audio, iter_mono_16k, open_audio
from af3trt.runtime.stages.lengths import SAMPLE_RATE, WINDOW_SAMPLES

SR = SAMPLE_RATE


@pytest.fixture(scope="module")
def speech():
    """~95 s of espeak-ng sentences with 0.4-1.6 s pauses, and where each sentence is."""
    return talk(95.0, seed=3)


def _blocks(wave: np.ndarray, n: int):
    for i in range(0, len(wave), n):
        yield wave[i:i + n]


def test_auto_cuts_in_pauses_and_covers_the_audio(speech):
    wave, sentences = speech
    spans = list(longform.split(_blocks(wave, 7777), longform.Chunking()))
    assert len(spans) >= 4
    assert [s.index for s in spans] == list(range(len(spans)))
    for s in spans:
        assert 0 < len(s.wave) <= WINDOW_SAMPLES
        np.testing.assert_array_equal(s.wave, wave[s.start:s.end])  # the audio's own samples, in place
    for a, b in zip(spans, spans[1:]):
        assert a.end <= b.start  # in order; a gap only where silence was left out
        assert not wave[a.end:b.start].any() or a.end == b.start
    cuts = [s.end for s in spans[:-1]]
    for cut in cuts:  # no cut inside a sentence: each is in a pause
        assert not any(a < cut < b for a, b in sentences), cut
    assert spans[0].start <= sentences[0][0] and spans[-1].end >= sentences[-1][1]


def test_a_cut_goes_inside_speech_only_when_there_is_no_pause():
    rng = np.random.default_rng(0)
    loud = (rng.standard_normal(45 * SR) * 0.3).astype(np.float32)  # 45 s of sound, no pause at all
    spans = list(longform.split([loud], longform.Chunking()))
    assert [len(s.wave) for s in spans][0] <= WINDOW_SAMPLES and sum(len(s.wave) for s in spans) == len(loud)
    with_pause = loud.copy()
    with_pause[20 * SR:21 * SR] = 0  # one pause, 20-21 s
    first = next(longform.split([with_pause], longform.Chunking()))
    assert 20 * SR <= first.end <= 21 * SR


def test_fixed_windows_and_silence_left_out():
    rng = np.random.default_rng(1)
    wave = (rng.standard_normal(70 * SR) * 0.1).astype(np.float32)
    wave[30 * SR:40 * SR] = 0.0  # 10 s of digital silence: its piece has nothing to say
    spans = list(longform.split([wave], longform.parse_chunking({"type": "fixed", "window_seconds": 10})))
    assert [s.start for s in spans] == [i * 10 * SR for i in range(7) if i != 3]
    assert all(len(s.wave) == 10 * SR for s in spans)


def test_blocks_read_from_a_file_equal_the_whole_decode(speech):
    wave, _ = speech
    buf = io.BytesIO()
    sf.write(buf, np.round(wave[:40 * SR] * 20000) / 20000, 22050 // 2 * 2, format="FLAC")  # 22050 Hz claimed
    data = buf.getvalue()
    with open_audio(io.BytesIO(data)) as stream:
        joined = np.concatenate(list(iter_mono_16k(stream)))
    np.testing.assert_array_equal(joined, decode_audio(data))


def test_the_total_length_limit_is_checked():
    buf = io.BytesIO()
    sf.write(buf, np.zeros(10 * SR, np.float32), SR, format="WAV")
    with pytest.raises(Exception, match="limit is 5"):
        open_audio(io.BytesIO(buf.getvalue()), max_seconds=5)


def test_ordered_yields_in_order_while_running_concurrently():
    spans = [longform.Span(i, i, np.zeros(1, np.float32)) for i in range(12)]
    running, peak = 0, 0

    async def run(span):
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        for k in range(3):
            await asyncio.sleep(random.random() / 200)
            yield f"{span.index}.{k}"
        running -= 1

    async def aiter():
        for s in spans:
            yield s

    async def main():
        return [(s.index, x) async for s, x in longform.ordered(aiter(), run, 4)]

    out = asyncio.run(main())
    expect = [(i, x) for i in range(12) for x in (f"{i}.0", f"{i}.1", f"{i}.2", None)]
    assert out == expect
    assert 1 < peak <= 4


def test_ordered_raises_a_pieces_error_and_cancels_the_rest():
    async def run(span):
        if span.index == 2:
            raise ValueError("bad piece")
        await asyncio.sleep(0)
        yield "ok"

    async def aiter():
        for i in range(6):
            yield longform.Span(i, i, np.zeros(1, np.float32))

    async def main():
        return [x async for _, x in longform.ordered(aiter(), run, 3)]

    with pytest.raises(ValueError, match="bad piece"):
        asyncio.run(main())


def test_joiner_deltas_add_up_to_the_text():
    j = longform.Joiner()
    out = []
    for piece in (["  Hello", " world ", " "], [], ["", " next", " one.  "], ["Last"]):
        j.next_piece()
        out += [j.feed(d) for d in piece]
    assert "".join(out) == j.text == "Hello world next one. Last"


@pytest.mark.parametrize("value, kind", [("auto", "vad"), ('{"type": "server_vad", "threshold": 0.7}', "vad"),
                                         ({"type": "fixed", "window_seconds": 15}, "fixed")])
def test_parse_chunking(value, kind):
    assert longform.parse_chunking(value).kind == kind
    assert longform.parse_chunking(None) is None


@pytest.mark.parametrize("value", ["sometimes", {"type": "fixed", "window_seconds": 45}, {"type": "other"},
                                   {"type": "server_vad", "threshold": 2}, {"type": "server_vad", "x": 1}])
def test_parse_chunking_refuses(value):
    with pytest.raises(ValueError, match="chunking_strategy"):
        longform.parse_chunking(value)


def test_a_cancelled_thread_iterator_returns_only_after_its_step_ends():
    """aiter_thread cancelled while its worker thread is in a step (reading the upload): the cancellation completes
    only once that step has ended, so the caller's `finally: audio.close()` never closes the SoundFile under a read.
    Before, it returned at once and the OpenAI front died of SIGSEGV in libsndfile (seen under the chaos soak)."""
    import threading

    reading, release, order = threading.Event(), threading.Event(), []

    def blocks():
        yield 1
        reading.set()
        release.wait(10)  # a read in progress
        order.append("step ended")
        yield 2

    async def main():
        async def consume():
            async for _ in longform.aiter_thread(blocks()):
                pass

        task = asyncio.ensure_future(consume())
        await asyncio.to_thread(reading.wait, 10)
        task.cancel()
        asyncio.get_running_loop().call_later(0.3, release.set)
        with pytest.raises(asyncio.CancelledError):
            await task
        order.append("cancelled")  # where the front closes the file

    asyncio.run(main())
    assert order == ["step ended", "cancelled"]
