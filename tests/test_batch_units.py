"""`af3trt batch`'s line handling and `af3trt score`'s matching (runtime/batch.py, perf/score.py), no server."""

from __future__ import annotations

import asyncio
import base64
import json

import numpy as np
import pytest
import soundfile as sf

from af3trt.perf import score
from af3trt.runtime import batch


def test_bad_lines_say_why():
    cases = {"not json": "invalid_json", "[1]": "invalid_request", '{"url": "/v1/chat/completions"}':
             "missing_custom_id", '{"custom_id": "a", "url": "/v1/embeddings", "body": {}}': "invalid_url",
             '{"custom_id": "a", "url": "/v1/chat/completions", "method": "GET", "body": {}}': "invalid_request"}
    for raw, code in cases.items():
        with pytest.raises(batch.BadLine) as e:
            batch.parse_line(raw, 1)
        assert e.value.code == code, raw


def test_files_are_read_relative_to_the_input_and_bodies_pass_through(tmp_path):
    (tmp_path / "clips").mkdir()
    sf.write(tmp_path / "clips" / "a.wav", np.zeros(8000, np.float32), 16000)
    job = batch.parse_line(json.dumps({"custom_id": "x", "method": "POST", "url": "/v1/chat/completions", "body": {
        "model": "af3", "max_tokens": 3, "thinking": {"type": "enabled"}, "messages": [{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"file": "clips/a.wav"}}, {"type": "text", "text": "hi"}]}]}}), 1)
    body = batch.resolve_chat(job, tmp_path)
    part = body["messages"][0]["content"][0]["input_audio"]
    assert part["format"] == "wav" and base64.b64decode(part["data"]) == (tmp_path / "clips" / "a.wav").read_bytes()
    assert body["thinking"] == {"type": "enabled"} and body["max_tokens"] == 3  # unchanged
    assert job.audio_seconds == pytest.approx(0.5)
    job = batch.parse_line(json.dumps({"custom_id": "t", "url": "/v1/audio/transcriptions", "body": {
        "file": "clips/a.wav", "response_format": "verbose_json", "timestamp_granularities": ["segment"],
        "chunking_strategy": {"type": "server_vad", "threshold": 0.6}}}), 2)
    fields, (name, data) = batch.resolve_transcription(job, tmp_path)
    assert name == "a.wav" and ("timestamp_granularities[]", "segment") in fields
    assert json.loads(dict(fields)["chunking_strategy"]) == {"type": "server_vad", "threshold": 0.6}
    with pytest.raises(batch.BadLine, match="cannot read"):
        batch.resolve_transcription(batch.parse_line(json.dumps(
            {"custom_id": "m", "url": "/v1/audio/transcriptions", "body": {"file": "nope.wav"}}), 3), tmp_path)


def test_resume_reads_answered_ids_and_cuts_a_torn_line(tmp_path):
    out = tmp_path / "out.jsonl"
    whole = [{"custom_id": "a", "response": {"status_code": 200}, "error": None},
             {"custom_id": None, "response": None, "error": {"code": "invalid_json", "line": 7, "message": "x"}}]
    out.write_text("".join(json.dumps(x) + "\n" for x in whole) + '{"custom_id": "b", "resp')
    ids, bad = batch.read_done(out)
    assert ids == {"a"} and bad == {7}
    assert out.read_text().endswith("}\n") and len(out.read_text().splitlines()) == 2


def test_window_halves_when_busy_and_grows_back():
    async def main():
        w = batch.Window(8)
        w.busy(), w.busy()
        assert w.limit == 2
        for _ in range(40):
            w.ok()
        assert 2 < w.limit <= 8
        return w

    asyncio.run(main())


# MMAU/MMAR's matching (Sakshi113/MMAU evaluation.py string_match), on cases where it decides.
@pytest.mark.parametrize("said, ok", [
    ("Dog barking", True), ("The answer is (B) dog barking.", True), ("dog", False),  # every answer token
    ("Dog barking, not a cat meowing", False),  # a wrong choice's own token
    ("", False), ("B", False)])
def test_matching_as_mmau_does(said, ok):
    assert score.matches("Dog barking", said, ["Cat meowing", "Dog barking", "Bird singing", "Car horn"]) is ok


def test_accuracy_overall_and_per_category():
    key = [{"id": "1", "choices": ["yes", "no"], "answer": "yes", "task": "speech", "difficulty": "easy"},
           {"id": "2", "choices": ["one", "two"], "answer": "two", "task": "speech", "difficulty": "hard"},
           {"id": "3", "choices": ["red", "blue"], "answer": "red", "task": "sound", "difficulty": "easy"},
           {"id": "4", "choices": ["up", "down"], "answer": "up", "task": "sound", "difficulty": "hard"}]
    outputs = {"1": "Yes.", "2": "one", "3": "red", "4": None}
    r = score.score(outputs, key)
    assert (r["correct"], r["total"], r["no_prediction"]) == (2, 4, 1) and r["accuracy"] == 50.0
    assert r["by"]["task"]["speech"] == {"correct": 1, "total": 2, "accuracy": 50.0}
    assert r["by"]["difficulty"]["easy"]["correct"] == 2 and r["by"]["difficulty"]["hard"]["correct"] == 0
    line = {"custom_id": "1", "response": {"status_code": 200, "body": {"choices": [{"message": {"content": "x"}}]}},
            "error": None}
    assert score.prediction(line) == "x"
    assert score.prediction({**line, "response": {"status_code": 400, "body": {"error": {}}}}) is None


def test_send_retries_busy_answers_and_posts_transcriptions_as_forms(tmp_path):
    import httpx

    sf.write(tmp_path / "a.wav", np.zeros(8000, np.float32), 16000)
    answers = [503, 503, 200]
    seen = []

    def handler(req):
        body = req.read()
        seen.append(body)
        status = answers.pop(0)
        return httpx.Response(status, json={"text": "ok"} if status == 200 else {"error": {"code": "server_busy"}})

    async def main():
        http = httpx.AsyncClient(base_url="http://x", transport=httpx.MockTransport(handler))
        job = batch.parse_line(json.dumps({"custom_id": "t", "url": "/v1/audio/transcriptions", "body": {
            "file": "a.wav", "timestamp_granularities": ["segment"], "chunking_strategy": "auto"}}), 1)
        tally, window = batch.Tally(total=1), batch.Window(4)
        out = await batch.send(http, job, tmp_path, window, tally, max_retries=3)
        return out, tally, window

    out, tally, window = asyncio.run(main())
    assert out["response"] == {"status_code": 200, "request_id": out["response"]["request_id"], "body": {"text": "ok"}}
    assert tally.retries == 2 and window.limit < 4 and tally.audio_s == pytest.approx(0.5)
    assert b'name="timestamp_granularities[]"' in seen[-1] and b'name="chunking_strategy"' in seen[-1]


def test_lines_no_server_answered_are_not_final_and_a_rerun_sends_them(tmp_path, capsys):
    """A line that got no answer for want of a server (refused connection, 503 to its last try) is not written: a
    rerun with the same output sends it. Before, it was written as a final "server_unavailable" error that a rerun
    skipped as done (seen: 32 of 60 lines after a tritonserver SIGKILL)."""
    import httpx

    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps({"custom_id": f"q{i}", "url": "/v1/chat/completions", "body": {
        "model": "af3", "messages": [{"role": "user", "content": "hi"}]}}) + "\n" for i in range(6)))
    server_up, tries = [False], []

    def handler(req):
        if not server_up[0]:  # no front (refused), or a front without Triton behind it (503), in turn
            tries.append(req)
            if len(tries) % 2:
                raise httpx.ConnectError("connection refused")
            return httpx.Response(503, json={"error": {"code": "triton_unavailable", "message": "no server"}})
        return httpx.Response(200, json={"choices": [{"message": {"content": "ok"}}]})

    real = httpx.AsyncClient

    def mocked(*a, **kw):
        kw.pop("limits", None)
        return real(*a, transport=httpx.MockTransport(handler), **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(httpx, "AsyncClient", mocked)
        tally = batch.Tally(total=0)
        asyncio.run(batch.run(inp, out, "http://x", 4, 1, None, 30, tally, server_wait_s=0.0))
        assert tally.unanswered == 6 and tally.done == 0 and "rerun" in tally.summary(False)
        assert not out.exists() or out.read_text() == ""  # nothing final
        server_up[0] = True
        tally = batch.Tally(total=0)
        asyncio.run(batch.run(inp, out, "http://x", 4, 1, None, 30, tally, server_wait_s=0.0))
    got = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted(g["custom_id"] for g in got) == [f"q{i}" for i in range(6)]
    assert all(g["response"]["status_code"] == 200 for g in got) and tally.unanswered == 0
