"""Live audio without a server: the input formats (runtime/stages/live.py) against libsndfile's reading of the same
bytes, a turn's windows against preprocess's decoding of the turn's clip (the exact reference), the voice-activity
detector and the pace check; the Realtime session (runtime/openai/realtime_session.py) and its events against a
fake ensemble: the requests it sends (answers, transcripts, windows sent ahead) and the error events it answers bad
input with. tests/test_realtime.py drives the same through the `openai` package against the real tritonserver."""

from __future__ import annotations

import asyncio
import base64
import io
import json

import numpy as np
import pytest
import soundfile as sf
from scipy.signal import resample_poly

from af3trt.runtime.openai.common import APIError, Piece, RealtimeOptions
from af3trt.runtime.openai.realtime_events import EventError, parse_event
from af3trt.runtime.openai.realtime_session import RealtimeSession
from af3trt.runtime.openai.triton import EnsembleInfo
from af3trt.runtime.stages import audio, lengths, live
from af3trt.runtime.stages.errors import ErrorCode
from af3trt.runtime.stages.longform import TRANSCRIPTION_PROMPT

from helpers import fading_noise

SR = lengths.SAMPLE_RATE
INFO = EnsembleInfo(inputs=frozenset({"messages", "audio", "thinking"}), models=("af3",), default_max_tokens=16,
                    max_output_len=64, max_audio_seconds=600.0)


def pcm16(wave: np.ndarray) -> bytes:
    return (np.clip(wave, -1, 1 - 2**-15) * 32768).astype("<i2").tobytes()


# ---------------------------------------------------------------------------------------------- formats


@pytest.mark.parametrize("fmt", [live.InputFormat("pcm16", 16000), live.InputFormat("pcm16", 24000),
                                 live.InputFormat("pcmu", 8000), live.InputFormat("pcma", 8000)])
def test_a_format_decodes_as_libsndfile_reads_its_wav(fmt):
    raw = bytes(range(256)) * 4 if fmt.sample_bytes == 1 else \
        np.random.default_rng(0).integers(-32768, 32768, 999).astype("<i2").tobytes()
    wave, rate = sf.read(io.BytesIO(fmt.wav(raw)), dtype="float32")
    assert rate == fmt.rate and np.array_equal(wave, fmt.decode(raw))  # every G.711 code, bit for bit
    assert sf.info(io.BytesIO(fmt.wav(raw))).format == "WAV"  # a container preprocess accepts


def test_parse_format_takes_openai_shapes_and_refuses_others():
    assert live.parse_format({"type": "audio/pcm", "rate": 24000}) == live.InputFormat("pcm16", 24000)
    assert live.parse_format({"type": "audio/pcm", "rate": 16000}) == live.InputFormat("pcm16", 16000)
    assert live.parse_format({"type": "audio/pcmu"}) == live.InputFormat("pcmu", 8000)
    assert live.parse_format("g711_alaw") == live.InputFormat("pcma", 8000)  # the beta API's names
    assert live.parse_format("pcm16") == live.InputFormat("pcm16", 24000)
    for bad in ({"type": "audio/pcm", "rate": 44100}, {"type": "audio/opus"}, "wav", {"type": "audio/pcmu", "x": 1}):
        with pytest.raises(ValueError):
            live.parse_format(bad)
    fmt = live.InputFormat("pcm16", 24000)
    assert live.decode_base64_audio(base64.b64encode(b"\x01\x02").decode(), fmt) == b"\x01\x02"
    with pytest.raises(ValueError, match="base64"):
        live.decode_base64_audio("not base64!", fmt)
    with pytest.raises(ValueError, match="whole number"):
        live.decode_base64_audio(base64.b64encode(b"\x01\x02\x03").decode(), fmt)


# ---------------------------------------------------------------------------------------------- a turn


def test_a_turns_windows_are_its_clips_sample_for_sample_and_find_its_keys():
    """24-kHz PCM16 arriving in uneven pieces: the windows a Turn completes are preprocess's windows of turn.clip()
    (resampled there as one clip), so what is sent ahead (turn.prefix) carries the clip's window keys."""
    wave = fading_noise(int(65.3 * 24000))
    raw = pcm16(wave)
    turn = live.Turn(live.InputFormat("pcm16", 24000), max_windows=20)
    rng, at, seen = np.random.default_rng(1), 0, []
    while at < len(raw):
        n = 2 * int(rng.integers(1, 24000))
        turn.append(raw[at: at + n])
        at += n
        seen.append(turn.windows)
    assert seen[-1] == 2 and sorted(seen) == seen and turn.samples * 2 == len(raw)
    clip = audio.decode_audio(turn.clip())  # preprocess's decoding of the clip: resample_poly of all of it
    x = np.frombuffer(raw, "<i2").astype(np.float32) / np.float32(32768)
    assert np.array_equal(clip, resample_poly(x, 2, 3).astype(np.float32))
    assert len(clip) == turn.samples16
    assert np.array_equal(turn.wave(2), clip[: 2 * lengths.WINDOW_SAMPLES])  # final as they arrived
    assert np.array_equal(audio.decode_audio(turn.clip16()), clip)  # what a commit sends: the clip as decoded
    whole, ahead = audio.prepare_clips([turn.clip()]), audio.prepare_clips([turn.prefix(2)])
    assert np.array_equal(whole.keys[:2], ahead.keys) and np.array_equal(whole.features[:2], ahead.features)


def test_a_turn_past_the_limit_keeps_what_fixes_afs_windows_and_equals_the_longer_stream():
    """The buffer holds at most the build's audio (max_windows); the clip it sends gives the ensemble the same
    windows as the whole, longer stream would (the ensemble reads its first max_windows windows)."""
    wave = fading_noise(37 * 24000)
    turn = live.Turn(live.InputFormat("pcm16", 24000), max_windows=1)
    dropped = turn.append(pcm16(wave))
    assert turn.truncated and dropped > 0 and turn.samples < 31 * 24000 and turn.windows == 1
    longer = live.InputFormat("pcm16", 24000).wav(pcm16(wave))
    full = audio.prepare_clips([longer], max_windows=1)
    for clip in (turn.clip(), turn.clip16()):
        kept = audio.prepare_clips([clip], max_windows=1)
        assert np.array_equal(kept.features, full.features) and np.array_equal(kept.keys, full.keys)
    assert full.truncated == [True]
    assert audio.truncation_notice(0, turn.seconds, 30) == \
        "audio clip 0: 37.0 s is longer than the 30 s AF3 reads; only the first 30 s were used"


def test_a_cut_turn_keeps_its_start_and_returns_what_follows():
    fmt = live.InputFormat("pcmu", 8000)
    raw = bytes(np.random.default_rng(2).integers(0, 256, 8000 * 3, dtype=np.uint8))
    turn = live.Turn(fmt, 20)
    turn.append(raw)
    rest = turn.cut(8000 * 2)
    assert bytes(turn.raw) == raw[:16000] and rest == raw[16000:]
    assert np.array_equal(audio.decode_audio(turn.clip16()), audio.decode_audio(turn.clip()))  # the cut as decoded


# ---------------------------------------------------------------------------------------------- voice, pace


def _speech_like(seconds: float, amplitude: float = 0.3, seed: int = 0) -> np.ndarray:
    return (amplitude * np.random.default_rng(seed).standard_normal(int(seconds * SR))).astype(np.float32)


def test_server_vad_finds_speech_between_pauses_and_follows_the_threshold():
    silence = np.zeros(SR, np.float32)
    stream = np.concatenate([silence, _speech_like(2.0), silence])
    vad = live.ServerVad(live.VadConfig(silence_duration_ms=500))
    events = []
    for at in range(0, len(stream), 1234):  # any block sizes
        events += vad.feed(stream[at: at + 1234])
    assert events == [("started", SR), ("stopped", 3 * SR + SR // 2)]  # the 500-ms pause is in the turn
    quiet = np.concatenate([silence, _speech_like(2.0, amplitude=0.005), silence])  # -46 dBFS
    assert live.ServerVad(live.VadConfig(threshold=0.5)).feed(quiet) == []  # under -40 dBFS: not speech
    assert live.ServerVad(live.VadConfig(threshold=0.2)).feed(quiet)[0] == ("started", SR)


def test_pace_admits_audio_up_to_its_speed_after_an_allowance():
    pace = live.Pace(speed=1.0, burst_s=2.0, now=100.0)
    assert pace.admit(2.0, 100.0)  # the allowance
    assert not pace.admit(0.5, 100.1)  # faster than real time: refused, not counted
    assert pace.admit(0.5, 100.6) and pace.seconds == 2.5
    assert live.Pace(speed=0, burst_s=0, now=0).admit(1e6, 0)  # no limit


# ---------------------------------------------------------------------------------------------- the session


class Fake:
    """The ensemble as the session sees it: records each request; answers with `answer` (text pieces, 1 id each)."""

    def __init__(self, answer=("Hello", " there")):
        self.jobs, self.answer, self.error, self.closed = [], list(answer), None, []
        self.gate: asyncio.Event | None = None

    async def generate(self, job, rid):
        self.jobs.append((rid, job))
        try:
            if self.error:
                raise self.error
            for i, text in enumerate(self.answer[: job.max_tokens or None]):
                if self.gate is not None:
                    await self.gate.wait()
                yield Piece(text=text, ids=[100 + i], notices=[], prompt_tokens=42)
        finally:
            self.closed.append(rid)


def run(coro):
    return asyncio.run(coro)


async def _session(fake=None, kind="realtime", info=INFO, **limits):
    fake = fake or Fake()
    events = []

    async def send(ev):
        events.append(ev)

    s = RealtimeSession(generate=fake.generate, info=info, model_id="af3", send=send, kind=kind,
                        limits=RealtimeOptions(**{"max_speed": 0, **limits}))
    await s.start()
    return s, fake, events


async def _send(s, ev: dict):
    kind, eid, parsed = parse_event(json.dumps(ev))
    await s.handle(kind, eid, parsed)


async def _settle(s):
    for _ in range(100):
        busy = [t for t in (s.response, *s.tasks) if t is not None and not t.done()]
        if not busy:
            return
        await asyncio.wait(busy, timeout=5)


def _types(events):
    return [e["type"] for e in events]


def _append(raw: bytes, eid=None):
    return {"type": "input_audio_buffer.append", "audio": base64.b64encode(raw).decode(),
            **({"event_id": eid} if eid else {})}


MANUAL_16K = {"type": "session.update", "session": {"type": "realtime", "instructions": "Be brief.",
              "audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000}, "turn_detection": None}}}}


def test_a_committed_turn_is_answered_with_the_conversations_request_and_its_windows_are_sent_ahead():
    async def go():
        s, fake, events = await _session()
        await _send(s, MANUAL_16K)
        raw = pcm16(fading_noise(65 * SR))
        for at in range(0, len(raw), 64000):
            await _send(s, _append(raw[at: at + 64000]))
            await asyncio.sleep(0)
        await _settle(s)
        ahead = [job for rid, job in fake.jobs if rid.startswith("ahead_")]
        await _send(s, {"type": "input_audio_buffer.commit"})
        await _send(s, {"type": "response.create", "response": {"max_output_tokens": 8}})
        await _settle(s)
        return s, fake, events, ahead, raw

    s, fake, events, ahead, raw = run(go())
    assert _types(events)[:2] == ["session.created", "session.updated"]
    assert _types(events)[2:] == [
        "input_audio_buffer.committed", "conversation.item.added", "conversation.item.done", "response.created",
        "response.output_item.added", "conversation.item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta", "response.output_text.done",
        "response.content_part.done", "response.output_item.done", "conversation.item.done", "response.done"]
    rid, job = fake.jobs[-1]
    clip = live.InputFormat("pcm16", 16000).wav(raw)
    assert np.array_equal(audio.decode_audio(job.audio[0]), audio.decode_audio(clip))  # the turn, as decoded
    assert len(job.audio) == 1 and job.max_tokens == 8 and job.stream
    assert job.messages == [{"role": "system", "content": "Be brief."},
                            {"role": "user", "content": [{"type": "audio", "audio_index": 0}]}]
    done = events[-1]["response"]
    assert done["status"] == "completed" and done["output"][0]["content"] == [{"type": "output_text",
                                                                               "text": "Hello there"}]
    assert done["usage"]["output_tokens"] == 2 and done["usage"]["input_tokens"] == 42
    assert done["usage"]["input_token_details"]["audio_tokens"] == lengths.audio_tokens_for_samples(65 * SR)
    assert list(s.answers) == [(rid, [100, 101])]
    # windows 1 and 2 went ahead: the same conversation, the turn so far, one token; their keys are the clip's
    assert [len(j.audio) for j in ahead] and all(j.max_tokens == 1 and j.messages == job.messages for j in ahead)
    assert np.array_equal(audio.decode_audio(ahead[-1].audio[0]), np.frombuffer(raw, "<i2")[:2 * lengths.WINDOW_SAMPLES]
                          .astype(np.float32) / np.float32(32768))  # the turn's first two windows
    keys = audio.prepare_clips([clip]).keys
    assert np.array_equal(audio.prepare_clips(ahead[-1].audio).keys, keys[:2])


def test_without_encode_ahead_nothing_is_sent_before_the_commit():
    async def go():
        s, fake, _ = await _session(encode_ahead=False)
        await _send(s, MANUAL_16K)
        await _send(s, _append(pcm16(fading_noise(65 * SR))))
        await _settle(s)
        return fake

    assert run(go()).jobs == []


def test_voice_activity_commits_a_turn_from_its_padding_to_its_pause_and_answers_it():
    fmt = live.InputFormat("pcmu", 8000)
    stream16 = np.concatenate([np.zeros(SR, np.float32), _speech_like(2.0), np.zeros(SR, np.float32)])
    codes = np.searchsorted(np.sort(fmt.decode(bytes(range(256)))), resample_poly(stream16, 1, 2)).clip(0, 255)
    order = np.argsort(fmt.decode(bytes(range(256))))
    raw = bytes(order[codes].astype(np.uint8))  # the stream as mu-law codes

    async def go():
        s, fake, events = await _session()
        await _send(s, {"type": "session.update", "session": {"audio": {"input": {
            "format": {"type": "audio/pcmu"}, "turn_detection": {"type": "server_vad", "silence_duration_ms": 500,
                                                                 "prefix_padding_ms": 300}}}}})
        for at in range(0, len(raw), 800):
            await _send(s, _append(raw[at: at + 800]))
        await _settle(s)
        return s, fake, events

    s, fake, events = run(go())
    kinds = _types(events)
    assert kinds[2:6] == ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                          "input_audio_buffer.committed", "conversation.item.added"]
    started, stopped = events[2], events[3]
    assert abs(started["audio_start_ms"] - 700) <= 20 and abs(stopped["audio_end_ms"] - 3500) <= 20
    assert started["item_id"] == stopped["item_id"] == events[4]["item_id"]
    assert "response.done" in kinds  # create_response: answered without a response.create
    job = fake.jobs[-1][1]
    a, b = started["audio_start_ms"] * 8, stopped["audio_end_ms"] * 8
    # the turn: from its padding to the end of its pause
    assert len(job.audio) == 1
    assert np.array_equal(audio.decode_audio(job.audio[0]), audio.decode_audio(fmt.wav(raw[a:b])))


def test_a_transcription_session_transcribes_each_committed_turn():
    async def go():
        s, fake, events = await _session(Fake(["It ", "rains."]), kind="transcription")
        await _send(s, {"type": "session.update", "session": {"type": "transcription", "audio": {"input": {
            "format": {"type": "audio/pcm", "rate": 16000}, "turn_detection": None,
            "transcription": {"model": "af3"}}}}})
        await _send(s, _append(pcm16(fading_noise(2 * SR))))
        await _send(s, {"type": "input_audio_buffer.commit"})
        await _settle(s)
        await _send(s, {"type": "response.create"})
        return fake, events

    fake, events = run(go())
    kinds = _types(events)
    assert kinds[1:] == ["session.updated", "input_audio_buffer.committed", "conversation.item.added",
                         "conversation.item.done", "conversation.item.input_audio_transcription.delta",
                         "conversation.item.input_audio_transcription.delta",
                         "conversation.item.input_audio_transcription.completed", "error"]
    done = events[-2]
    assert done["transcript"] == "It rains." and done["usage"]["output_tokens"] == 2
    job = fake.jobs[-1][1]
    assert job.prompt == TRANSCRIPTION_PROMPT and job.strip_prefix and job.max_tokens == INFO.max_output_len
    assert "transcription session" in events[-1]["error"]["message"]  # no responses in a transcription session


def _errors(events):
    return [(e["error"]["code"], e["error"]["event_id"]) for e in events if e["type"] == "error"]


def test_bad_input_gets_error_events_and_the_session_goes_on():
    async def go():
        s, fake, events = await _session(info=EnsembleInfo(**{**INFO.__dict__, "max_audio_seconds": 30.0}))
        await _send(s, MANUAL_16K)
        for ev in ({"type": "input_audio_buffer.commit", "event_id": "e1"},  # nothing to commit
                   {"type": "response.cancel", "event_id": "e2"},  # nothing to cancel
                   {"type": "response.create", "event_id": "e3"},  # nothing to answer
                   {"type": "session.update", "event_id": "e4", "session": {"output_modalities": ["audio"]}},
                   {"type": "session.update", "event_id": "e5",
                    "session": {"audio": {"input": {"format": {"type": "audio/pcm", "rate": 44100}}}}},
                   {"type": "session.update", "event_id": "e6", "session": {"tools": [{"type": "function"}]}},
                   {"type": "input_audio_buffer.append", "event_id": "e7", "audio": "%%%"},
                   _append(b"\x01\x02\x03", "e8"),
                   {"type": "conversation.item.create", "event_id": "e9",
                    "item": {"type": "function_call", "name": "f"}},
                   {"type": "conversation.item.delete", "event_id": "e10", "item_id": "nope"},
                   {"type": "session.update", "event_id": "e11", "session": {"type": "transcription"}}):
            await _send(s, ev)
        # over the build's audio (30 s here): the ensemble's notice once, the rest dropped
        await _send(s, _append(pcm16(fading_noise(20 * SR))))
        await _send(s, _append(pcm16(fading_noise(20 * SR, seed=1)), "e12"))
        await _send(s, _append(pcm16(fading_noise(5 * SR, seed=2)), "e13"))
        await _send(s, {"type": "input_audio_buffer.commit"})
        # a second response while one runs
        fake.gate = asyncio.Event()
        await _send(s, {"type": "response.create"})
        await _send(s, {"type": "response.create", "event_id": "e14"})
        fake.gate.set()
        await _settle(s)
        return events

    events = run(go())
    assert _errors(events) == [
        ("input_audio_buffer_commit_empty", "e1"), ("response_cancel_not_active", "e2"),
        ("conversation_not_ready", "e3"), (None, "e4"), ("invalid_audio_format", "e5"), (None, "e6"),
        ("invalid_audio", "e7"), ("invalid_audio", "e8"), ("unknown_parameter", "e9"), ("item_not_found", "e10"),
        (None, "e11"),
        ("audio_too_long", None), ("conversation_already_has_active_response", "e14")]
    notice = next(e for e in events if e["type"] == "error" and e["error"]["code"] == "audio_too_long")
    assert notice["error"]["message"].startswith("audio clip 0: 40.0 s is longer than the 30 s AF3 reads")
    assert events[-1]["type"] == "response.done" and events[-1]["response"]["status"] == "completed"


def test_malformed_messages_are_error_events():
    for message, code in (("not json", "invalid_json"), ("[1]", "invalid_event"), (b"\x00", "invalid_event"),
                          ('{"type": "nope"}', "invalid_event"),
                          ('{"type": "input_audio_buffer.commit", "extra": 1}', "unknown_parameter"),
                          ('{"type": "conversation.item.truncate"}', "unsupported_event")):
        with pytest.raises(EventError) as e:
            parse_event(message)
        assert e.value.code == code, message
        body = e.value.event("evt_1")
        assert body["type"] == "error" and set(body["error"]) == {"type", "code", "message", "param", "event_id"}


def test_audio_faster_than_real_time_is_refused_and_not_kept():
    clock = [0.0]

    async def go():
        events = []

        async def send(ev):
            events.append(ev)

        s = RealtimeSession(generate=Fake().generate, info=INFO, model_id="af3", send=send,
                            limits=RealtimeOptions(max_speed=1.0, burst_s=2.0), clock=lambda: clock[0])
        await _send(s, MANUAL_16K)
        await _send(s, _append(pcm16(fading_noise(2 * SR))))  # the allowance
        await _send(s, _append(pcm16(fading_noise(SR)), "fast"))  # 1 s more at once: refused
        clock[0] = 1.5
        await _send(s, _append(pcm16(fading_noise(SR))))  # 3 s in 1.5 s: within 2 + 1.5
        return s, events

    s, events = run(go())
    assert _errors(events) == [("rate_limit_exceeded", "fast")]
    assert s.turn.samples == 3 * SR


def test_cancelling_a_response_closes_its_request_and_the_answer_stays_incomplete():
    async def go():
        fake = Fake(["a"] * 50)
        s, _, events = await _session(fake)
        await _send(s, MANUAL_16K)
        await _send(s, _append(pcm16(fading_noise(SR))))
        await _send(s, {"type": "input_audio_buffer.commit"})
        fake.gate = asyncio.Event()
        await _send(s, {"type": "response.create"})
        await asyncio.sleep(0)
        await _send(s, {"type": "response.cancel"})
        return s, fake, events

    s, fake, events = run(go())
    done = events[-1]["response"]
    assert done["status"] == "cancelled" and done["status_details"]["reason"] == "client_cancelled"
    assert fake.closed == [fake.jobs[-1][0]]  # the request's generator was closed: Triton cancels it


def test_an_ensemble_error_fails_the_response_with_its_message():
    async def go():
        fake = Fake()
        fake.error = APIError.of(ErrorCode.INVALID_ARGUMENT, "prompt too long")
        s, _, events = await _session(fake)
        await _send(s, MANUAL_16K)
        await _send(s, {"type": "conversation.item.create",
                        "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]}})
        await _send(s, {"type": "response.create"})
        await _settle(s)
        return events

    events = run(go())
    assert [e["error"]["message"] for e in events if e["type"] == "error"] == ["prompt too long"]
    assert events[-1]["response"]["status"] == "failed"


def test_items_merge_by_role_and_system_items_join_the_instructions():
    async def go():
        s, fake, _ = await _session()
        await _send(s, MANUAL_16K)
        for role, kind, text in (("system", "input_text", "Use French."), ("user", "input_text", "Hi"),
                                 ("user", "input_text", "again"), ("assistant", "output_text", "Bonjour"),
                                 ("user", "input_text", "Why?")):
            await _send(s, {"type": "conversation.item.create", "item": {
                "type": "message", "role": role, "content": [{"type": kind, "text": text}]}})
        await _send(s, {"type": "response.create", "response": {"instructions": "Be terse."}})
        await _settle(s)
        return fake

    job = run(go()).jobs[-1][1]
    assert job.messages == [{"role": "system", "content": "Be terse.\nUse French."},
                            {"role": "user", "content": [{"type": "text", "text": "Hi"},
                                                         {"type": "text", "text": "again"}]},
                            {"role": "assistant", "content": [{"type": "text", "text": "Bonjour"}]},
                            {"role": "user", "content": [{"type": "text", "text": "Why?"}]}]
