"""Unit tests (no server) for the OpenAI front end's own logic, and the prompt length it reports as usage:
fusion records it in the request context, postprocess returns it with every response."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from fakes import pb_utils as fake_pb
from af3trt.runtime.stages.audio import prepare_clips
from af3trt.runtime.triton.context import RequestContext
from af3trt.runtime.openai.chat import ChatRequest, build_job
from af3trt.runtime.openai.common import APIError, StopScanner
from af3trt.runtime.openai.triton import EnsembleInfo
from pydantic import ValidationError
from af3trt.triton_repo import configs

INFO = EnsembleInfo(inputs=frozenset({"text_input", "messages", "audio"}), models=("af3",), default_max_tokens=16,
                    max_output_len=64, max_audio_seconds=600.0)


@pytest.mark.parametrize("stops,pieces,want", [
    (["END"], ["hello E", "N", "D more"], "hello "),
    (["xy", "b"], ["a", "xa", "ab"], "axaa"),
    ([], ["a", "b"], None),
    (["zz"], ["abc", "z"], None),  # never matched: everything comes out, the held 'z' at the end
])
def test_stop_scanner_cuts_at_the_first_stop(stops, pieces, want):
    scan = StopScanner(stops)
    out = "".join(scan.feed(p) for p in pieces)
    if want is None:
        assert not scan.stopped and out + scan.flush() == "".join(pieces)
    else:
        assert scan.stopped and out == want


def test_build_job_maps_parts_and_roles(speech_bytes):
    audio = {"type": "input_audio", "input_audio": {"data": base64.b64encode(speech_bytes).decode(), "format": "flac"}}
    req = ChatRequest(model="af3", max_completion_tokens=9, messages=[
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [audio, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "Speech."},
        {"role": "user", "content": [{"type": "text", "text": "And this?"}, audio]}])
    job = build_job(req, INFO)
    assert job.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "audio", "audio_index": 0}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "Speech."},
        {"role": "user", "content": [{"type": "text", "text": "And this?"}, {"type": "audio", "audio_index": 1}]}]
    assert list(job.audio) == [speech_bytes, speech_bytes] and job.max_tokens == 9
    default = build_job(ChatRequest(model="af3", messages=[{"role": "user", "content": "hi"}]), INFO)
    assert default.max_tokens == INFO.default_max_tokens  # known, so finish_reason "length" can be told apart


@pytest.mark.parametrize("extra,thinking", [
    ({}, None), ({"reasoning_effort": "none"}, None), ({"reasoning_effort": "minimal"}, None),
    ({"reasoning_effort": "low"}, True), ({"reasoning_effort": "high"}, True),
    ({"chat_template_kwargs": {"enable_thinking": True}}, True),
    ({"chat_template_kwargs": {"enable_thinking": False}}, None),
    ({"reasoning_effort": "medium", "chat_template_kwargs": {"enable_thinking": True}}, True),
])
def test_reasoning_effort_turns_thinking_on(extra, thinking):
    info = EnsembleInfo(**{**INFO.__dict__, "inputs": INFO.inputs | {"thinking"}})
    job = build_job(ChatRequest(model="af3", messages=[{"role": "user", "content": "hi"}], **extra), info)
    assert job.thinking is thinking
    assert ("thinking" in job.values()) is bool(thinking)


def test_reasoning_effort_refusals():
    ask = [{"role": "user", "content": "hi"}]
    with pytest.raises(APIError, match="disagree"):
        build_job(ChatRequest(model="af3", messages=ask, reasoning_effort="high",
                              chat_template_kwargs={"enable_thinking": False}), INFO)
    with pytest.raises(APIError, match="no thinking input"):  # INFO: a repository from before thinking existed
        build_job(ChatRequest(model="af3", messages=ask, reasoning_effort="high"), INFO)
    with pytest.raises(ValueError):
        ChatRequest(model="af3", messages=ask, reasoning_effort="extreme")


def test_build_job_without_messages_input_takes_one_turn():
    old = EnsembleInfo(**{**INFO.__dict__, "inputs": frozenset({"text_input", "system_prompt", "audio"})})
    job = build_job(ChatRequest(model="af3", messages=[{"role": "system", "content": "S"},
                                                       {"role": "user", "content": "Q"}]), old)
    assert (job.prompt, job.system_prompt, job.messages) == ("Q", "S", None)
    with pytest.raises(APIError, match="messages"):
        build_job(ChatRequest(model="af3", messages=[{"role": "user", "content": "Q"},
                                                     {"role": "assistant", "content": "A"},
                                                     {"role": "user", "content": "Q2"}]), old)


@pytest.mark.parametrize("part,needle", [
    ({"data": "%%%", "format": "wav"}, "base64"),
    ({"data": base64.b64encode(b"x").decode(), "format": "aac"}, "format"),
    ({"data": "", "format": "wav"}, "empty"),
])
def test_bad_audio_parts_are_400(part, needle):
    req = ChatRequest(model="af3", messages=[{"role": "user", "content": [{"type": "input_audio",
                                                                          "input_audio": part}]}])
    with pytest.raises(APIError, match=needle) as e:
        build_job(req, INFO)
    assert e.value.status == 400


def test_n_above_one_is_refused():
    with pytest.raises(APIError, match="n=3"):
        build_job(ChatRequest(model="af3", n=3, messages=[{"role": "user", "content": "hi"}]), INFO)


def test_prompt_tokens_travel_from_fusion_to_postprocess(tiny_ckpt, speech_bytes, tmp_path, monkeypatch):
    monkeypatch.setattr("af3trt.runtime.triton.context.default_root", lambda: tmp_path)
    spec = configs.RepoSpec(target="cpu", hidden_size=64, decoder_dtype="float32", vocab_size=704, end_id=642,
                            pad_id=640, max_input_len=2048, max_output_len=64, default_max_tokens=16,
                            fusion_params={"tokenizer_dir": str(tiny_ckpt)},
                            postprocess_params={"tokenizer_dir": str(tiny_ckpt)})
    fusion = fake_pb.load_model("fusion", configs.fusion_config(spec))
    post = fake_pb.load_model("postprocess", configs.postprocess_config(spec))
    batch = prepare_clips([speech_bytes])
    embeds = np.zeros((1, 750, spec.hidden_size), np.float32)
    RequestContext(tmp_path).put("r1", {"stream": True})  # what preprocess writes first
    (resp,) = fusion.execute([fake_pb.Request({"text_input": np.array([b"What is said?"], object),
                                               "audio_embeds": embeds, "input_features_mask": batch.mask,
                                               "audio_windows": np.array([1], np.int32),
                                               "stream": np.array([True])}, "r1")])
    n_prompt = int(resp.outputs["input_lengths"].as_numpy()[0, 0])
    assert n_prompt > batch.tokens_per_clip[0]  # text + audio tokens

    def out(ids, rid):
        a = np.asarray(ids, np.int32).reshape(1, 1, -1)
        (r,) = post.execute([fake_pb.Request({"output_ids": a, "sequence_length": np.array([[a.shape[-1]]], np.int32)},
                                             rid)])
        return int(r.outputs["prompt_tokens"].as_numpy()[0])

    assert [out([5], "r1"), out([6], "r1"), out([], "r1")] == [n_prompt] * 3
    assert out([5], "") == -1  # no request id (perf_analyzer): unknown, said so


# ------------------------------------------------------------------ a stage's error code, carried to the HTTP client


def _through_triton(exc: BaseException):
    """What the front gets from Triton when a step answers with exc: the adapters' error response (fake Triton
    utils), its message as Triton relays an ensemble step's ("in ensemble 'af3', " + the step's message), read by
    the client's ResponseReader and turned into the front's APIError as Triton.generate does."""
    from tritonclient.utils import InferenceServerException

    from af3trt.runtime.triton import triton_io
    from af3trt.runtime.client.library import AF3Error, ResponseReader
    from af3trt.runtime.openai import triton

    resp = triton_io.error_response(fake_pb, exc)
    relayed = InferenceServerException(msg=f"in ensemble 'af3', {resp.error.message()}")
    try:
        ResponseReader("127.0.0.1:1", "af3", running=True).read(None, relayed)
    except AF3Error as e:
        return resp.error, triton._api_error(e)
    raise AssertionError("the error was not raised")


class FakeTriton:
    """Triton for the HTTP app: the ensemble's info, and a generation that fails with `error` at once."""

    def __init__(self, url, model, error=None):
        self.error = error

    async def info(self):
        return INFO

    async def generate(self, job, request_id):
        raise self.error
        yield  # an async generator, like Triton.generate

    async def close(self):
        pass


def _app(monkeypatch, error=None):
    from fastapi.testclient import TestClient

    from af3trt.runtime.openai import app as openai_server

    monkeypatch.setattr(openai_server, "Triton", lambda url, model: FakeTriton(url, model, error))
    return TestClient(openai_server.create_app(openai_server.Settings()))


@pytest.mark.parametrize("stage_error,status,kind,triton_code", [
    ("prompt", 400, "invalid_request_error", "INVALID_ARG"),
    ("audio", 400, "invalid_request_error", "INVALID_ARG"),
    ("busy", 503, "service_unavailable", "UNAVAILABLE"),
    ("bug", 500, "server_error", "INTERNAL"),
    ("nothink", 400, "invalid_request_error", "UNSUPPORTED"),
])
@pytest.mark.parametrize("stream", [False, True])
def test_a_stage_error_reaches_the_http_client_as_its_code(monkeypatch, stage_error, status, kind, triton_code,
                                                           stream):
    """The code a stage raises with travels in Triton's message (tagged, runtime/stages/errors.py), not the exception's class
    name: the HTTP status and OpenAI type are the code's, the message the stage's own words."""
    from af3trt.runtime.stages.audio import AudioError
    from af3trt.runtime.engines.decoder import NoAdapter, ServerBusy
    from af3trt.runtime.stages.prompt import PromptError

    exc, words = {
        "prompt": (PromptError, "max_tokens must be in [1, 512], got 0"),
        "audio": (AudioError, "audio clip 0: cannot decode it"),
        "busy": (ServerBusy, "server busy: 4 requests already wait for the decoder"),
        "bug": (RuntimeError, "boom"),
        "nothink": (NoAdapter, "lora_task_id 1: this decoder was built without a LoRA adapter"),
    }[stage_error]
    triton_error, api_error = _through_triton(exc(words))
    assert triton_error.code() == getattr(fake_pb.TritonError, triton_code)
    with _app(monkeypatch, api_error) as http:
        r = http.post("/v1/chat/completions", json={"model": "af3", "stream": stream,
                                                    "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert (error["message"], error["type"]) == (words, kind)


def test_a_body_that_is_not_json_is_one_clear_error(monkeypatch):
    with _app(monkeypatch) as http:
        bad = http.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
        field = http.post("/v1/chat/completions", json={"model": "af3", "messages": [{"role": "robot",
                                                                                      "content": "hi"}]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] is None, bad.text
    assert bad.json()["error"]["message"].startswith("the request body is not valid JSON")
    assert field.status_code == 400 and field.json()["error"]["param"] == "messages.0.role", field.text


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens", "min_tokens"])
@pytest.mark.parametrize("value", [-2654772151029637002420253481762816, 2**31, -1])
def test_token_counts_beyond_int32_are_400(monkeypatch, field, value):
    """af3trt fuzz (perf/fuzz.py) sent max_completion_tokens -2.6e33: it overflowed the ensemble's INT32 input and the
    front answered 500. Token counts outside [0, 2**31) are the client's mistake: 400 naming the field."""
    with _app(monkeypatch) as http:
        r = http.post("/v1/chat/completions", json={"model": "af3", "messages": [{"role": "user", "content": "hi"}],
                                                    field: value})
    assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text


def test_error_codes_round_trip_through_the_message():
    from af3trt.runtime.stages import errors
    from af3trt.runtime.stages.prompt import PromptError

    for exc, code in [(PromptError("x: 1"), errors.ErrorCode.INVALID_ARGUMENT),
                      (ValueError("bad"), errors.ErrorCode.INVALID_ARGUMENT),
                      (KeyError("k"), errors.ErrorCode.INTERNAL)]:
        assert errors.parse("in ensemble 'af3', " + errors.tagged(exc)) == (code, str(exc))
    # an error Triton raised itself carries no code of ours: shown without the ensemble prefix
    assert errors.parse("in ensemble 'af3', unexpected shape for input 'audio'") == \
        (None, "unexpected shape for input 'audio'")


def test_build_job_takes_ignore_eos_and_min_tokens():
    """AIPerf's fixed-length advice (--extra-inputs ignore_eos:true / min_tokens:N) reaches the ensemble's inputs; a
    repository without them refuses it with a 400 naming the field, not a 500 from Triton."""
    body = {"model": "af3", "messages": [{"role": "user", "content": "hi"}], "ignore_eos": True, "min_tokens": 4,
            "max_tokens": 8}
    info = EnsembleInfo(**{**INFO.__dict__, "inputs": INFO.inputs | {"ignore_eos", "min_tokens"}})
    job = build_job(ChatRequest(**body), info)
    assert job.ignore_eos is True and job.min_tokens == 4
    assert job.values()["ignore_eos"] == [True] and job.values()["min_tokens"] == [4]
    with pytest.raises(APIError, match="ignore_eos") as e:
        build_job(ChatRequest(**body), INFO)
    assert e.value.status == 400
    with pytest.raises(ValidationError):
        ChatRequest(**{**body, "min_tokens": -1})


@pytest.mark.parametrize("code, details, status, retry", [
    ("INTERNAL", "Internal error from Core", 503, True),  # grpc.aio's own failure: the connection was lost
    ("CANCELLED", "Received RST_STREAM with error code 8", 503, True),  # the proxy reset the stream
    ("INTERNAL", "Received RST_STREAM with error code 2", 503, True),
    ("UNAVAILABLE", "Socket closed", 503, True),
    ("DEADLINE_EXCEEDED", "Deadline Exceeded", 503, True),
    ("INTERNAL", "Stub process 'decoder_0_0' is not healthy.", 500, False),  # Triton's own answer
])
def test_a_call_that_lost_its_connection_is_unavailable_not_internal(code, details, status, retry):
    """A replica SIGKILLed under an open stream (tests/test_batch.py) surfaced as 500 "Internal error from Core" or as
    a stream reset by HAProxy, which af3trt batch keeps as a final answer; it is a lost connection, retried like any
    503."""
    import grpc

    from af3trt.runtime.openai.triton import rpc_error

    e = rpc_error("127.0.0.1:1", grpc.aio.AioRpcError(getattr(grpc.StatusCode, code), grpc.aio.Metadata(),
                                                      grpc.aio.Metadata(), details=details))
    assert e.status == status and (e.code == "triton_unavailable") == retry and details in e.message
    # the same failure read from a stream's error (tritonclient: "StatusCode.X" and the message) in the client library
    from af3trt.runtime.client.library import AF3ConnectionError, connection_error

    class StreamError:
        def status(self):
            return f"StatusCode.{code}"

        def message(self):
            return details

    assert isinstance(connection_error("127.0.0.1:1", "af3", StreamError()), AF3ConnectionError) == retry
