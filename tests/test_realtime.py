"""WS /v1/realtime (runtime/openai/realtime.py) driven by the `openai` package's realtime client (and the websockets
library it uses) against the session's real tritonserver (conftest: the tiny ensemble).

Every answer equals its one-request reference: the same conversation sent as one ordinary request over gRPC
(AF3Client, streamed and whole), whose clips are the turns' audio as the client sent it in a WAV at its own rate,
and transformers' generate on the same conversation (tests/reference.py, its own decoding and resampling): token ids
(the session's, runtime/openai/realtime_session.py `answers`) and text. The first turn is 65 s of 24-kHz PCM16, so two
complete windows were sent ahead before its commit (the test waits until they were); the last is G.711 mu-law turned
by voice activity. Bad input gets error events: the API key, the session limit, the idle timeout, malformed events;
a client that leaves mid-answer stops the decoder.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf
from reference import MAX_TOKENS, mono16k
from scipy.signal import resample_poly
from websockets.exceptions import ConnectionClosed

from af3trt.runtime.openai.common import RealtimeOptions, Settings
from af3trt.runtime.stages.longform import TRANSCRIPTION_PROMPT

from helpers import openai_front

openai = pytest.importorskip("openai")  # a declared test dependency (pyproject [test]: openai[realtime])

pytestmark = pytest.mark.integration

KEY = "af3trt-realtime-key"
SR = 16000
WAIT_S = 120  # bounds every wait for an event (a hang fails instead of blocking the suite)


@pytest.fixture(scope="module")
def front(server):
    with openai_front(Settings(triton_url=server.grpc_url, api_key=KEY, realtime=RealtimeOptions(max_speed=0))) as f:
        yield f


def connect(url: str, key: str = KEY):
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=key, max_retries=0)
    return client.realtime.connect(model="af3")


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def pcm16(wave: np.ndarray) -> bytes:
    return (np.clip(wave, -1, 1 - 2**-15) * 32768).astype("<i2").tobytes()


def wav(raw_wave: np.ndarray, rate: int, subtype: str) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, raw_wave, rate, format="WAV", subtype=subtype)
    return buf.getvalue()


async def until(conn, kind: str) -> list:
    """Events up to and including the next one of this type."""
    seen = []
    while True:
        ev = await asyncio.wait_for(conn.recv(), WAIT_S)
        seen.append(ev)
        if ev.type == kind:
            return seen


def the_session(app):
    (session,) = app.state.realtime_sessions
    return session


def settle_ahead(session) -> None:
    """Wait (on the server's loop) until every complete window of the turn was sent ahead and answered."""
    async def settled():
        while session.ahead is not None and not session.ahead.done():
            await asyncio.wait({session.ahead})
            await asyncio.sleep(0)  # the done callback sends the next windows, if any

    if session.ahead is not None:
        asyncio.run_coroutine_threadsafe(settled(), session.ahead.get_loop()).result(WAIT_S)


def text_of(events) -> str:
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    (done,) = [e.text for e in events if e.type == "response.output_text.done"]
    assert deltas == done  # streamed = whole
    return done


def test_a_voice_conversation_equals_its_one_request_reference(front, client, ref, speech_bytes):
    url, app = front
    speech = mono16k(speech_bytes)
    turn1 = pcm16(resample_poly(np.tile(speech, 14)[: 65 * SR], 3, 2))  # 65 s at 24 kHz: two windows go ahead
    quiet = np.zeros(8000 * 6 // 10, np.float32)
    stream8 = np.concatenate([quiet, resample_poly(speech, 1, 2).astype(np.float32), quiet, quiet])
    buf = io.BytesIO()
    sf.write(buf, stream8, 8000, format="RAW", subtype="ULAW")
    turn3 = buf.getvalue()  # mu-law codes, one byte a sample
    question = "What else do you hear?"

    async def go():
        answers, events, ahead = [], [], None
        async with connect(url) as conn:
            await conn.session.update(session={
                "type": "realtime", "instructions": "Answer briefly.", "max_output_tokens": MAX_TOKENS,
                "audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000}, "turn_detection": None}}})
            await until(conn, "session.updated")
            for at in range(0, len(turn1), 24000):  # 0.5-s appends
                await conn.input_audio_buffer.append(audio=b64(turn1[at: at + 24000]))
            await conn.session.update(session={"instructions": "Answer briefly."})  # every append before it is heard
            await until(conn, "session.updated")
            session = the_session(app)
            settle_ahead(session)
            ahead = session.ahead_windows
            await conn.input_audio_buffer.commit()
            await conn.response.create()
            events.append(await until(conn, "response.done"))
            answers.append(session.answers[-1][1])

            await conn.conversation.item.create(item={"type": "message", "role": "user",
                                                      "content": [{"type": "input_text", "text": question}]})
            await conn.response.create()
            events.append(await until(conn, "response.done"))
            answers.append(session.answers[-1][1])

            await conn.session.update(session={"audio": {"input": {
                "format": {"type": "audio/pcmu"},
                "turn_detection": {"type": "server_vad", "silence_duration_ms": 500}}}})
            await until(conn, "session.updated")
            for at in range(0, len(turn3), 800):  # 0.1-s appends; the detector commits and answers by itself
                await conn.input_audio_buffer.append(audio=b64(turn3[at: at + 800]))
            events.append(await until(conn, "response.done"))
            answers.append(session.answers[-1][1])
        return answers, events, ahead

    answers, events, ahead = asyncio.run(go())
    assert ahead == 2  # the turn's two complete windows were encoded ahead of its commit
    texts = [text_of(e) for e in events]
    started = next(e for e in events[2] if e.type == "input_audio_buffer.speech_started")
    stopped = next(e for e in events[2] if e.type == "input_audio_buffer.speech_stopped")
    assert [e.type for e in events[2]][:3] == ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                                               "input_audio_buffer.committed"]
    base = 65_000  # the session's audio ms before the mu-law turn
    a, b = (started.audio_start_ms - base) * 8, (stopped.audio_end_ms - base) * 8
    assert 0 < a < b <= len(turn3)
    clips = [wav(np.frombuffer(turn1, "<i2"), 24000, "PCM_16"),
             wav(sf.read(io.BytesIO(turn3[a:b]), samplerate=8000, channels=1, format="RAW", subtype="ULAW",
                         dtype="float32")[0], 8000, "ULAW")]
    system = {"role": "system", "content": "Answer briefly."}
    convs = [[system, {"role": "user", "content": [{"type": "audio", "audio_index": 0}]}]]
    convs.append(convs[0] + [{"role": "assistant", "content": texts[0]},
                             {"role": "user", "content": [{"type": "text", "text": question}]}])
    convs.append(convs[1] + [{"role": "assistant", "content": texts[1]},
                             {"role": "user", "content": [{"type": "audio", "audio_index": 1}]}])
    for i, (conv, got, text, done) in enumerate(zip(convs, answers, texts, events)):
        used = clips[: 1 + (i == 2)]
        whole = client.ask(messages=conv, audio=used, max_tokens=MAX_TOKENS, stream=False)
        streamed = client.ask(messages=conv, audio=used, max_tokens=MAX_TOKENS, stream=True)
        waves = [mono16k(c) for c in used]
        want = ref.generate_conversation(conv, waves)
        assert got == whole.token_ids == streamed.token_ids == want, i
        assert text == whole.text, i
        usage = done[-1].response.usage
        prompt = ref.model_inputs(conv, waves)["input_ids"].shape[1]  # text + audio tokens, as the processor counts
        assert usage.output_tokens == len(got) and usage.input_tokens == prompt, i


def test_a_transcription_session_transcribes_each_turn_as_the_transcription_request(front, client, speech_bytes):
    url, app = front
    speech = mono16k(speech_bytes)
    turns = [pcm16(np.tile(speech, 8)[: 40 * SR]), pcm16(speech)]  # 40 s (a window goes ahead), then 5 s

    async def go():
        out = []
        async with connect(url) as conn:
            await conn.session.update(session={"type": "transcription", "audio": {"input": {
                "format": {"type": "audio/pcm", "rate": 16000}, "turn_detection": None,
                "transcription": {"model": "af3"}}}})
            await until(conn, "session.updated")
            for raw in turns:
                for at in range(0, len(raw), 32000):
                    await conn.input_audio_buffer.append(audio=b64(raw[at: at + 32000]))
                await conn.session.update(session={"type": "transcription"})
                await until(conn, "session.updated")
                settle_ahead(the_session(app))
                await conn.input_audio_buffer.commit()
                out.append(await until(conn, "conversation.item.input_audio_transcription.completed"))
        return out

    max_len = asyncio.run(client_max_output_len(client))
    for raw, events in zip(turns, asyncio.run(go())):
        deltas = "".join(e.delta for e in events if e.type == "conversation.item.input_audio_transcription.delta")
        want = client.ask(TRANSCRIPTION_PROMPT, [wav(np.frombuffer(raw, "<i2"), SR, "PCM_16")], strip_prefix=True,
                          max_tokens=max_len, stream=False)
        assert events[-1].transcript == deltas == want.text
        assert events[-1].usage.output_tokens == len(want.token_ids)


async def client_max_output_len(client) -> int:
    """The build's max_output_len, which a transcription asks for (as POST /v1/audio/transcriptions does)."""
    from af3trt.runtime.openai.triton import Triton

    triton = Triton(client.url)
    try:
        return (await triton.info()).max_output_len
    finally:
        await triton.close()


def test_a_wrong_key_is_an_error_event_and_a_close(front):
    url, _ = front

    async def go():
        async with connect(url, key="wrong") as conn:
            ev = await asyncio.wait_for(conn.recv(), WAIT_S)
            with pytest.raises(Exception):
                await asyncio.wait_for(conn.recv(), WAIT_S)
            return ev, conn._connection.close_code  # noqa: SLF001 - the code the server closed with

    ev, code = asyncio.run(go())
    assert ev.type == "error" and ev.error.code == "invalid_api_key" and code == 1008


def test_malformed_events_are_error_events_and_the_session_goes_on(front):
    url, _ = front

    async def go():
        async with connect(url) as conn:
            await until(conn, "session.created")
            got = []
            for raw in ("not json", '{"type": "no.such.event", "event_id": "e2"}',
                        '{"type": "input_audio_buffer.append", "audio": "%%%", "event_id": "e3"}',
                        '{"type": "session.update", "session": {"audio": {"input": {"format": '
                        '{"type": "audio/pcm", "rate": 44100}}}}, "event_id": "e4"}'):
                await conn.send_raw(raw)
                got.append((await until(conn, "error"))[-1].error)
            await conn.session.update(session={"instructions": "still here"})
            updated = (await until(conn, "session.updated"))[-1]
            return got, updated

    got, updated = asyncio.run(go())
    assert [(e.code, e.event_id) for e in got] == [("invalid_json", None), ("invalid_event", "e2"),
                                                   ("invalid_audio", "e3"), ("invalid_audio_format", "e4")]
    assert updated.session.instructions == "still here"


def test_session_limit_and_timeouts_end_sessions_with_an_error_event(server):
    def front_with(**kw):
        return openai_front(Settings(triton_url=server.grpc_url, realtime=RealtimeOptions(max_speed=0, **kw)))

    async def refused_second(url):
        async with connect(url) as first:
            await until(first, "session.created")
            async with connect(url) as second:
                return await asyncio.wait_for(second.recv(), WAIT_S)

    async def idle(url):
        async with connect(url) as conn:
            return (await until(conn, "error"))[-1]  # it sends nothing

    async def expired(url):
        async with connect(url) as busy:  # never idle, but past the session's limit
            await until(busy, "session.created")
            while True:
                try:
                    await busy.session.update(session={"instructions": "still here"})
                except ConnectionClosed:  # the server ended it between our events: its error event came first
                    pass
                last = await asyncio.wait_for(busy.recv(), WAIT_S)
                if last.type == "error":
                    return last
                await asyncio.sleep(0.2)

    with front_with(max_sessions=1) as (url, _):
        refused = asyncio.run(refused_second(url))
    assert refused.type == "error" and refused.error.code == "session_limit_reached"
    with front_with(idle_timeout_s=1.0) as (url, _):
        assert asyncio.run(idle(url)).error.code == "idle_timeout"
    with front_with(max_session_s=2.0) as (url, _):
        assert asyncio.run(expired(url)).error.code == "session_expired"


def test_a_client_that_leaves_mid_answer_stops_the_decoder(front, server):
    """The session's response is cancelled when its socket closes: its gRPC stream is cancelled and its id sent to
    the cancel model; the decoder stops that request short of max_tokens."""
    url, app = front

    async def go():
        async with connect(url) as conn:
            await conn.session.update(session={"type": "realtime", "max_output_tokens": 512,
                                               "audio": {"input": {"turn_detection": None}}})
            story = [{"type": "input_text", "text": "Tell a long story."}]
            await conn.conversation.item.create(item={"type": "message", "role": "user", "content": story})
            await conn.response.create()
            created = next(e for e in await until(conn, "response.output_text.delta") if e.type == "response.created")
        return created.response.id

    rid = asyncio.run(go())
    decoder_line = f"(request id {rid!r})"
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline and decoder_line not in server.log_path.read_text(errors="replace"):
        time.sleep(0.2)  # bounds the wait for the decoder's log line
    line = next(x for x in server.log_path.read_text(errors="replace").splitlines() if decoder_line in x)
    assert "cancelled by the client" in line and int(line.split(" after ")[1].split()[0]) < 512, line


def test_listen_streams_a_file_and_prints_the_answer_and_transcripts(front, client, speech_bytes, tmp_path):
    """`af3trt listen FILE` (runtime/client/listen.py) against the same front: the file as one turn with a question
    (its answer is the one request's), then as a transcription session whose turns the server finds by voice."""
    url, _ = front
    path = tmp_path / "speech.flac"
    path.write_bytes(speech_bytes)
    env = dict(os.environ, AF3TRT_LISTEN_KEY=KEY)

    def listen(*args):
        return subprocess.run([sys.executable, "-m", "af3trt.cli", "listen", str(path), "--url", url, "--speed", "0",
                               "--api-key-env", "AF3TRT_LISTEN_KEY", *args], capture_output=True, text=True,
                              timeout=300, env=env)

    asked = listen("--question", "What is said?", "--max-tokens", str(MAX_TOKENS))
    assert asked.returncode == 0, asked.stderr
    clip = wav(np.frombuffer(pcm16(mono16k(speech_bytes)), "<i2"), SR, "PCM_16")  # what listen sends: 16-kHz PCM16
    want = client.ask(messages=[{"role": "user", "content": [{"type": "audio", "audio_index": 0},
                                                             {"type": "text", "text": "What is said?"}]}],
                      audio=[clip], max_tokens=MAX_TOKENS, stream=False)
    assert asked.stdout == want.text + "\n" and "s after the commit" in asked.stderr

    heard = listen("--transcribe", "--vad")
    assert heard.returncode == 0, heard.stderr
    assert heard.stderr.count("[speech from") == 1 and heard.stdout.strip()


def test_the_docs_examples_run_against_the_server(front, tmp_path):
    """docs/realtime.md's Python blocks, as written but for the server's address: each prints what it promises."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    blocks = re.findall(r"```python\n(.*?)```", (root / "docs" / "realtime.md").read_text(), re.S)
    assert len(blocks) == 2
    url, _ = front
    outputs = []
    for i, code in enumerate(blocks):
        script = tmp_path / f"example{i}.py"
        script.write_text(code.replace("http://127.0.0.1:9000/v1", url + "/v1")
                          .replace('"unused-unless---api-key-env"', repr(KEY)))
        run = subprocess.run([sys.executable, str(script)], cwd=root, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
        outputs.append(run.stdout)
    assert re.search(r"\[\d+ tokens in, \d+ out\]", outputs[0])
    assert not any(line.startswith("error:") for line in outputs[0].splitlines())
    assert outputs[1].strip()


REALTIME_FORMATS = {"pcm16 24 kHz": ({"type": "audio/pcm", "rate": 24000}, 24000, "PCM_16"),
                    "pcm16 16 kHz": ({"type": "audio/pcm", "rate": 16000}, 16000, "PCM_16"),
                    "mu-law": ({"type": "audio/pcmu"}, 8000, "ULAW"), "A-law": ({"type": "audio/pcma"}, 8000, "ALAW")}
FUZZ_SESSIONS = int(os.environ.get("AF3TRT_FUZZ_EXAMPLES", "24"))


def test_fuzzed_live_audio_is_answered_or_refused_by_an_error_event_and_the_server_stays_exact(front, client,
                                                                                               speech_bytes):
    """Hypothesis sessions (issue 31, item 4: the realtime inputs fuzzed with audio mutations): each sends one input
    format, audio as appends, a commit and response.create. Half are tame (the bundled speech cut anywhere,
    in that format): each must reach the decoder (a completed response with output tokens). The rest are wild: the
    bytes of perf/fuzz.py's mutated files (wrong headers, extreme rates and channel counts claimed, cut, a header
    claiming hours) sent as samples, random bytes of any length (a partial sample included), long silences, text that
    is not base64. Every session ends within WAIT_S with response.done or an error event for its response.create,
    every error event is a client's (no server_error) with a code and a message, and afterwards a known gRPC request
    is answered with the same token ids as before."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from af3trt.perf.fuzz import audio_seeds
    from af3trt.runtime.client.library import Request

    url, _ = front
    known = Request(prompt="What is said?", audio=[speech_bytes], max_tokens=8)
    before = client.complete(known).token_ids
    speech = mono16k(speech_bytes)
    _, mutations = audio_seeds()

    def encoded(name: str, start: float, seconds: float) -> bytes:
        _, rate, subtype = REALTIME_FORMATS[name]
        cut = speech[int(start * SR): int((start + seconds) * SR)]
        wave = resample_poly(cut, rate, SR) if rate != SR else cut
        buf = io.BytesIO()
        sf.write(buf, np.clip(wave, -1, 1 - 2**-15), rate, format="RAW", subtype=subtype)
        return buf.getvalue()

    @st.composite
    def sessions(draw, kind: str):
        fmt = draw(st.sampled_from(sorted(REALTIME_FORMATS)))
        if kind == "tame":
            start = draw(st.floats(0, len(speech) / SR - 0.5))
            audio = b64(encoded(fmt, start, draw(st.floats(0.2, 20.0))))
        else:
            audio = draw(st.one_of(
                st.sampled_from(sorted(mutations.values())).map(b64),
                st.binary(max_size=4096).map(b64),
                st.integers(1, 70).map(lambda s: b64(bytes(s * REALTIME_FORMATS[fmt][1] * (
                    2 if REALTIME_FORMATS[fmt][2] == "PCM_16" else 1)))),  # silence (0 is not mu-law's zero)
                st.text(max_size=40)))
        chunk = draw(st.sampled_from([4096, 65536, 1 << 30]))  # base64 characters per append
        return kind, fmt, [audio[at: at + chunk] for at in range(0, len(audio), chunk)] or [""]

    outcomes, failures = {"tame": 0, "tame reached the decoder": 0, "wild": 0, "error events": 0}, []

    async def one(kind: str, fmt: str, appends: list[str]) -> None:
        async with connect(url) as conn:
            await until(conn, "session.created")
            await conn.session.update(session={"type": "realtime", "max_output_tokens": 3, "audio": {"input": {
                "format": REALTIME_FORMATS[fmt][0], "turn_detection": None}}})
            await until(conn, "session.updated")
            for i, part in enumerate(appends):
                await conn.send_raw(f'{{"type": "input_audio_buffer.append", "audio": "{part}", "event_id": "a{i}"}}')
            await conn.send_raw('{"type": "input_audio_buffer.commit", "event_id": "commit"}')
            await conn.send_raw('{"type": "response.create", "event_id": "respond"}')
            while True:
                ev = await asyncio.wait_for(conn.recv(), WAIT_S)
                if ev.type == "error":
                    outcomes["error events"] += 1
                    if ev.error.type == "server_error" or not ev.error.code or not ev.error.message:
                        failures.append(f"{kind} {fmt}: {ev.error}")
                    if ev.error.event_id == "respond":
                        break
                elif ev.type == "response.done":
                    usage = ev.response.usage
                    answered = ev.response.status in ("completed", "incomplete")  # incomplete: max_output_tokens
                    if kind == "tame" and answered and usage and usage.output_tokens:
                        outcomes["tame reached the decoder"] += 1
                    if ev.response.status == "failed":
                        failures.append(f"{kind} {fmt}: failed response {ev.response.status_details}")
                    break

    def check(case):
        kind, fmt, appends = case
        outcomes[kind] += 1
        try:
            asyncio.run(one(kind, fmt, appends))
        except (asyncio.TimeoutError, ConnectionClosed) as e:
            failures.append(f"{kind} {fmt}: {type(e).__name__} {e}")

    for kind in ("tame", "wild"):  # half each
        settings(max_examples=FUZZ_SESSIONS // 2, deadline=None, derandomize=True, database=None,
                 suppress_health_check=list(HealthCheck))(given(case=sessions(kind))(check))()
    print(f"\nrealtime fuzz: {outcomes}")
    assert failures == [], "\n".join(failures)
    assert outcomes["tame reached the decoder"] == outcomes["tame"] > 0
    assert outcomes["wild"] and outcomes["error events"]
    assert client.complete(known).token_ids == before
