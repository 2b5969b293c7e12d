"""`af3trt batch` and long-form transcription against a real server: `af3trt serve --openai-port` started the way
`af3trt batch --model-repository` starts it (runtime/batch.py Served), on the tiny build, free loopback ports.

- batch: 200 lines killed halfway (SIGINT, then SIGKILL) and resumed end with each custom_id exactly once, every
  line valid and read by the `openai` package's types; an espeak-ng multiple-choice set scored by `af3trt score`.
- long-form: chunking_strategy "auto" over a 70-s talk: segments on the cut points runtime/stages/longform.py computes,
  within the audio, each segment's text equal to its piece transcribed alone; the stream's deltas add up to the
  text; `af3trt ask --transcribe` gives the same segments; past the server's length limit, a clear 400.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from af3trt.perf import clips, score
from af3trt.runtime import batch
from af3trt.runtime.stages import longform
from af3trt.runtime.stages.audio import decode_audio

openai = pytest.importorskip("openai")  # a declared test dependency (pyproject [test])
from openai.types import BatchError  # noqa: E402
from openai.types.audio import Transcription  # noqa: E402
from openai.types.chat import ChatCompletion  # noqa: E402

pytestmark = pytest.mark.integration

LIMIT_S = 100  # the served --max-transcription-seconds


@pytest.fixture(scope="module")
def served(tiny_repo):
    srv = batch.Served(tiny_repo / "model_repository", 300, ["--max-transcription-seconds", str(LIMIT_S)])
    try:
        yield srv
    finally:
        srv.stop()
        assert srv.proc.poll() is not None
        print(f"--- serve log\n{srv.log.read_text(errors='replace')[-3000:]}")


@pytest.fixture(scope="module")
def oai(served):
    return openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def talk_flac():
    wave, _ = clips.talk(70.0, seed=5)
    return clips.flac_bytes(wave)


def _batch(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "af3trt.runtime.batch", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_lines(path: Path, n: int, proc: subprocess.Popen) -> None:
    while proc.poll() is None:
        if path.exists() and path.read_bytes().count(b"\n") >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"batch ended before writing {n} lines:\n{proc.stderr.read()}")


def test_batch_killed_and_resumed_answers_each_line_once(served, tmp_path, speech_bytes):
    (tmp_path / "clips").mkdir()
    (tmp_path / "clips" / "s.flac").write_bytes(speech_bytes)
    b64 = base64.b64encode(speech_bytes).decode()
    lines = []
    for i in range(200):
        audio = {"file": "clips/s.flac"} if i % 2 else {"data": b64, "format": "flac"}
        lines.append(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": {
            "model": "af3", "max_tokens": 2 + i % 3, "messages": [{"role": "user", "content": [
                {"type": "input_audio", "input_audio": audio}, {"type": "text", "text": f"Question {i}?"}]}]}}))
    lines[17] = "{not json"
    lines[42] = json.dumps({"custom_id": "r7", "url": "/v1/chat/completions", "body": {}})  # a repeated id
    lines[99] = json.dumps({"custom_id": "t99", "url": "/v1/audio/transcriptions", "body": {"file": "clips/s.flac"}})
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join(lines) + "\n")
    args = [str(inp), str(out), "--url", served.url, "--concurrency", "4"]

    first = _batch(args)
    _wait_lines(out, 40, first)
    first.send_signal(signal.SIGINT)  # Ctrl-C
    _, err = first.communicate(timeout=120)
    assert first.returncode == 130, err
    assert "interrupted" in err and "rerun" in err
    assert all(json.loads(x) for x in out.read_text().splitlines())  # a valid file

    second = _batch(args)
    _wait_lines(out, 110, second)
    second.kill()  # no chance to finish a line
    second.wait()

    third = _batch(args)
    _, err = third.communicate(timeout=600)
    assert third.returncode == 0, err
    assert "req/s" in err and "RTFx" in err and "ETA" in err

    got = [json.loads(x) for x in out.read_text().splitlines()]
    ids = [g["custom_id"] for g in got if g["custom_id"] is not None]
    assert sorted(ids) == sorted({f"r{i}" for i in range(200) if i not in (17, 42, 99)} | {"t99"})
    assert len(ids) == len(set(ids))  # each exactly once
    bad = sorted(g["error"]["line"] for g in got if g["custom_id"] is None)
    assert bad == [18, 43]  # 1-based line numbers, each reported once
    for g in got:
        assert g["id"].startswith("batch_req_")
        if g["custom_id"] is None:
            err = BatchError.model_validate(g["error"])
            assert err.code in ("invalid_json", "duplicate_custom_id")
            continue
        assert g["error"] is None and g["response"]["status_code"] == 200, g
        if g["custom_id"] == "t99":
            Transcription.model_validate(g["response"]["body"])
        else:
            c = ChatCompletion.model_validate(g["response"]["body"])
            n = int(g["custom_id"][1:])
            assert c.usage.completion_tokens <= 2 + n % 3


def test_score_a_spoken_multiple_choice_set(served, tmp_path):
    words = ["apple", "river", "window", "garden", "yellow", "seven"]
    key, lines = [], []
    for i, w in enumerate(words):
        sf.write(tmp_path / f"q{i}.wav", clips.espeak(f"The word is {w}."), clips.SR)
        choices = [words[(i + k) % len(words)] for k in range(4)]
        key.append({"id": f"q{i}", "choices": choices, "answer": w, "task": "speech",
                    "difficulty": "easy" if i < 3 else "hard"})
        q = f"Which word is spoken? Choices: {', '.join(choices)}."
        lines.append(json.dumps({"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions", "body": {
            "model": "af3", "max_tokens": 4, "messages": [{"role": "user", "content": [
                {"type": "input_audio", "input_audio": {"file": f"q{i}.wav"}}, {"type": "text", "text": q}]}]}}))
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "key.json").write_text(json.dumps(key))
    assert batch.main([str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl"), "--url", served.url]) == 0
    assert score.main([str(tmp_path / "out.jsonl"), "--key", str(tmp_path / "key.json"), "--json",
                       str(tmp_path / "s.json")]) == 0
    r = json.loads((tmp_path / "s.json").read_text())
    said = score.read_outputs(tmp_path / "out.jsonl")
    assert r["total"] == 6 and r["no_prediction"] == 0
    expect = sum(score.matches(k["answer"], said[k["id"]], k["choices"]) for k in key)
    assert r["correct"] == expect
    assert {v: c["total"] for v, c in r["by"]["difficulty"].items()} == {"easy": 3, "hard": 3}


def _alone(oai, wave: np.ndarray) -> str:
    return oai.audio.transcriptions.create(model="af3", file=("p.wav", longform.wav_bytes(wave))).text.strip()


def test_long_form_segments_are_the_pieces_transcribed_alone(oai, talk_flac):
    r = oai.audio.transcriptions.create(model="af3", file=("talk.flac", talk_flac), chunking_strategy="auto",
                                        response_format="verbose_json", timestamp_granularities=["segment"])
    wave = decode_audio(talk_flac)
    spans = list(longform.split([wave], longform.Chunking()))  # the cut points, computed here
    assert r.duration == pytest.approx(len(wave) / 16000, abs=1e-3)
    assert len(r.segments) == len(spans) >= 3
    for seg, span in zip(r.segments, spans):
        assert 0 <= seg.start < seg.end <= r.duration
        assert seg.start == pytest.approx(span.start / 16000, abs=1e-3)
        assert seg.end == pytest.approx(span.end / 16000, abs=1e-3)
        assert seg.text == _alone(oai, span.wave)
    assert r.text == " ".join(s.text for s in r.segments if s.text)


def test_long_form_stream_and_fixed_windows(oai, served, talk_flac):
    whole = oai.audio.transcriptions.create(model="af3", file=("t.flac", talk_flac),
                                            chunking_strategy={"type": "server_vad", "silence_duration_ms": 300})
    events = list(oai.audio.transcriptions.create(model="af3", file=("t.flac", talk_flac), stream=True,
                                                  chunking_strategy={"type": "server_vad", "silence_duration_ms": 300}))
    deltas = [e.delta for e in events if e.type == "transcript.text.delta"]
    assert len(deltas) > 1 and "".join(deltas) == whole.text == events[-1].text
    import httpx

    r = httpx.post(served.url + "/v1/audio/transcriptions", files={"file": ("t.flac", talk_flac)}, timeout=300,
                   data={"chunking_strategy": json.dumps({"type": "fixed", "window_seconds": 20}),
                         "response_format": "verbose_json"}).json()
    assert [s["start"] for s in r["segments"]] == [0.0, 20.0, 40.0, 60.0]


def test_ask_transcribe_prints_the_same_segments(oai, served, talk_flac, tmp_path, capsys):
    from af3trt.runtime.client import ask

    path = tmp_path / "talk.flac"
    path.write_bytes(talk_flac)
    r = oai.audio.transcriptions.create(model="af3", file=("t.flac", talk_flac), chunking_strategy="auto",
                                        response_format="verbose_json")
    with pytest.raises(SystemExit) as e:
        ask.main(["--transcribe", str(path), "--url", f"127.0.0.1:{served.grpc_port}"])
    assert e.value.code == 0
    printed = re.split(r"^\[\d+:\d\d:\d\d\.\d\d → \d+:\d\d:\d\d\.\d\d\] ", capsys.readouterr().out, flags=re.M)
    assert printed[0] == "" and [p[:-1] for p in printed[1:]] == [s.text for s in r.segments]


def test_long_form_past_the_limit_is_a_clear_error(oai, talk_flac):
    long = clips.flac_bytes(np.tile(decode_audio(talk_flac), 2))  # 140 s > LIMIT_S
    with pytest.raises(openai.BadRequestError) as e:
        oai.audio.transcriptions.create(model="af3", file=("l.flac", long), chunking_strategy="auto")
    assert e.value.code == "audio_too_long" and f"--max-transcription-seconds is {LIMIT_S}" in e.value.message


# ------------------------------------------------------------------------------------------------ batch vs. failures
# (issue 31) Each run: 48 chat lines over 4 distinct requests, concurrency 4; the reference of each request is its
# answer on the quiet server before the run. The run must end with every custom_id exactly once, every line 200 and
# every 200 equal to its reference.

PROMPTS = ("What is said?", "Describe the sound.", "Who speaks?", "Transcribe it.")


def _chat_body(speech: bytes, k: int) -> dict:
    return {"model": "af3", "max_tokens": 8, "messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": base64.b64encode(speech).decode(), "format": "flac"}},
        {"type": "text", "text": PROMPTS[k]}]}]}


def _references(url: str, speech: bytes) -> list[str]:
    import httpx

    return [httpx.post(url + "/v1/chat/completions", json=_chat_body(speech, k), timeout=300).json()[
        "choices"][0]["message"]["content"] for k in range(len(PROMPTS))]


def _run_through_a_failure(url: str, tmp_path: Path, speech: bytes, fail) -> list[dict]:
    refs = _references(url, speech)
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps({"custom_id": f"c{i}", "url": "/v1/chat/completions",
                                       "body": _chat_body(speech, i % len(PROMPTS))}) + "\n" for i in range(48)))
    run = _batch([str(inp), str(out), "--url", url, "--concurrency", "4"])
    _wait_lines(out, 8, run)
    fail()
    _, err = run.communicate(timeout=1200)
    assert run.returncode == 0, err
    got = [json.loads(x) for x in out.read_text().splitlines()]
    ids = [g["custom_id"] for g in got]
    assert sorted(ids) == sorted(f"c{i}" for i in range(48)) and len(ids) == len(set(ids)), err  # each once
    for g in got:
        assert g["error"] is None and g["response"]["status_code"] == 200, g
        k = int(g["custom_id"][1:]) % len(PROMPTS)
        assert g["response"]["body"]["choices"][0]["message"]["content"] == refs[k], g  # exact
    print(f"\n{err.strip().splitlines()[-1]}")
    return got


def test_a_batch_survives_a_killed_tritonserver(served, tmp_path, speech_bytes):
    """tritonserver SIGKILLed during `af3trt batch`: `af3trt serve` shut the whole service down, the batch retried a
    dead port and wrote 32 of 60 lines as final errors. Now serve restarts tritonserver and the batch's lines that
    found no server are retried until it is back. (Last of the module's users of `served`: it restarts its Triton.)"""
    from af3trt.runtime.serve import supervisor

    def kill_tritonserver():
        triton = next(p for p in supervisor.children(served.proc.pid)
                      if b"tritonserver" in Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")[0])
        os.kill(triton, signal.SIGKILL)

    _run_through_a_failure(served.url, tmp_path, speech_bytes, kill_tritonserver)
    assert served.proc.poll() is None
    assert "tritonserver exited with code -9; restarting" in served.log.read_text(errors="replace")


def test_a_batch_through_a_replica_set_survives_a_killed_replica(tiny_repo, tmp_path, speech_bytes):
    """Two replicas behind HAProxy, the OpenAI front in front of it; replica 0 SIGKILLed mid-run: its requests in
    flight fail over or are retried, and the run ends complete and exact."""
    from af3trt.perf.serving_path import OpenAIFront
    from af3trt.runtime.serve.replicas import ReplicaSet

    with ReplicaSet(tiny_repo / "model_repository", 2, tmp_path / "replicas") as rs:
        front = OpenAIFront(rs.grpc_url, tmp_path / "openai.log")
        try:
            _run_through_a_failure(front.url, tmp_path, speech_bytes, lambda: rs.kill(0))
        finally:
            front.stop()
