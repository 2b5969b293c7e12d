"""The OpenAI-compatible HTTP server (runtime/openai/app.py), driven by the official `openai` package.

`af3trt openai` runs as a real process on 127.0.0.1 (free port) in front of the session's real tritonserver
(conftest: the tiny ensemble). Answers are compared with the same requests sent straight to the ensemble over
gRPC (AF3Client), whose token ids test_integration/test_conversation prove equal to transformers' generate; the
usage's prompt_tokens is compared with the processor's own input ids.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
import urllib.error
import urllib.request

import numpy as np
import pytest
from helpers import UPLOAD_LIMIT, HTTPServer, http_server
from reference import MAX_TOKENS, mono16k, wav_bytes

from af3trt.runtime.stages.detok import strip_transcription_prefix
from af3trt.runtime.openai.transcriptions import TRANSCRIPTION_PROMPT
from af3trt.runtime.serve.server import free_port

openai = pytest.importorskip("openai")  # a declared test dependency (pyproject [test]); CI installs it

pytestmark = pytest.mark.integration

API_KEY = "af3trt-test-key"


@pytest.fixture(scope="module")
def http(server, tmp_path_factory):
    with http_server(server.grpc_url, tmp_path_factory.mktemp("openai"), api_key=API_KEY) as srv:
        yield srv


@pytest.fixture(scope="module")
def oai(http):
    return openai.OpenAI(base_url=http.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def audio_part(data: bytes, fmt: str = "flac") -> dict:
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode(), "format": fmt}}


def ask_messages(speech_bytes, question="What is said in the audio?"):
    return [{"role": "user", "content": [audio_part(speech_bytes), {"type": "text", "text": question}]}]


def test_models_and_health(oai, http):
    assert [m.id for m in oai.models.list().data] == ["af3"]
    with urllib.request.urlopen(http.url + "/health", timeout=10) as r:  # no key needed for health probes
        assert r.status == 200


def test_chat_equals_grpc_streamed_and_whole(oai, client, ref, speech_bytes):
    want = client.ask("What is said in the audio?", [speech_bytes], max_tokens=MAX_TOKENS, stream=False)
    assert len(want.token_ids) > 5
    whole = oai.chat.completions.create(model="af3", messages=ask_messages(speech_bytes), max_tokens=MAX_TOKENS)
    assert whole.choices[0].message.content == want.text
    assert whole.usage.completion_tokens == len(want.token_ids)
    inputs = ref.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "audio", "audio": mono16k(speech_bytes)},
                                      {"type": "text", "text": "What is said in the audio?"}]}],
        tokenize=True, return_dict=True, add_generation_prompt=True)
    assert whole.usage.prompt_tokens == inputs["input_ids"].shape[1]  # text + audio tokens, as the processor counts
    assert whole.choices[0].finish_reason == ("length" if len(want.token_ids) == MAX_TOKENS else "stop")

    stream = oai.chat.completions.create(model="af3", messages=ask_messages(speech_bytes), max_tokens=MAX_TOKENS,
                                         stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([d for d in deltas if d]) > 1  # really streamed
    assert "".join(deltas) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_system_and_sampling_parameters_reach_the_ensemble(oai, client, speech_bytes):
    msgs = [{"role": "system", "content": "Be precise."}] + ask_messages(speech_bytes, "Describe it.")
    got = oai.chat.completions.create(model="af3", messages=msgs, max_completion_tokens=12, temperature=0.8,
                                      top_p=0.9, seed=7)
    want = client.ask("Describe it.", [speech_bytes], system_prompt="Be precise.", max_tokens=12, temperature=0.8,
                      top_p=0.9, seed=7)
    assert got.choices[0].message.content == want.text
    assert got.usage.completion_tokens == len(want.token_ids)


def test_stop_string_truncates(oai, speech_bytes):
    whole = oai.chat.completions.create(model="af3", messages=ask_messages(speech_bytes), max_tokens=MAX_TOKENS)
    text = whole.choices[0].message.content
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert len(stop) == 3
    want = text[: text.index(stop)]
    got = oai.chat.completions.create(model="af3", messages=ask_messages(speech_bytes), max_tokens=MAX_TOKENS,
                                      stop=[stop, "\x00never"])
    assert got.choices[0].message.content == want and got.choices[0].finish_reason == "stop"
    streamed = oai.chat.completions.create(model="af3", messages=ask_messages(speech_bytes), max_tokens=MAX_TOKENS,
                                           stop=stop, stream=True)
    chunks = [c for c in streamed if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_multi_turn_conversation_with_audio(oai, client, ref, speech_bytes):
    """The model card's pattern: user audio + question, the assistant's answer, a follow-up question."""
    first = oai.chat.completions.create(model="af3", messages=ask_messages(speech_bytes), max_tokens=8)
    answer = first.choices[0].message.content
    msgs = ask_messages(speech_bytes) + [{"role": "assistant", "content": answer},
                                         {"role": "user", "content": "Why do you think so?"}]
    got = oai.chat.completions.create(model="af3", messages=msgs, max_tokens=MAX_TOKENS)
    ours = [{"role": "user", "content": [{"type": "audio", "audio_index": 0},
                                         {"type": "text", "text": "What is said in the audio?"}]},
            {"role": "assistant", "content": answer}, {"role": "user", "content": "Why do you think so?"}]
    want = client.ask(messages=ours, audio=[speech_bytes], max_tokens=MAX_TOKENS)
    assert want.token_ids == ref.generate_conversation(ours, [mono16k(speech_bytes)])
    assert got.choices[0].message.content == want.text
    assert got.usage.completion_tokens == len(want.token_ids)
    assert got.usage.prompt_tokens == ref.model_inputs(ours, [mono16k(speech_bytes)])["input_ids"].shape[1]


def test_transcription_strips_the_prefix(oai, client, speech_bytes):
    # the endpoint asks for the repository's max_output_len (tests/conftest.py: 512)
    plain = client.ask(TRANSCRIPTION_PROMPT, [speech_bytes], max_tokens=512, stream=False)
    want = strip_transcription_prefix(plain.text)
    got = oai.audio.transcriptions.create(model="af3", file=("speech.flac", speech_bytes))
    assert got.text == want
    text = oai.audio.transcriptions.create(model="af3", file=("speech.flac", speech_bytes), response_format="text")
    assert text == want
    events = list(oai.audio.transcriptions.create(model="af3", file=("speech.flac", speech_bytes), stream=True))
    deltas = [e.delta for e in events if e.type == "transcript.text.delta"]
    assert [e.type for e in events][-1] == "transcript.text.done" and events[-1].text == want
    assert "".join(deltas) == want


def test_eight_concurrent_requests(oai, client, speech_bytes):
    jobs = [("What is said?", speech_bytes), ("Say something nice.", None)] * 4
    want = [client.ask(p, [c] if c else [], max_tokens=MAX_TOKENS).text for p, c in jobs]

    def run(i: int) -> str:
        prompt, clip = jobs[i]
        messages = [{"role": "user", "content": ([audio_part(clip)] if clip else []) +
                     [{"type": "text", "text": prompt}]}]
        if i % 2:
            s = oai.chat.completions.create(model="af3", messages=messages, max_tokens=MAX_TOKENS, stream=True)
            return "".join(c.choices[0].delta.content or "" for c in s if c.choices)
        return oai.chat.completions.create(model="af3", messages=messages,
                                           max_tokens=MAX_TOKENS).choices[0].message.content

    with ThreadPoolExecutor(len(jobs)) as pool:  # all eight in flight at once
        got = list(pool.map(run, range(len(jobs)), timeout=300))
    assert got == want


def _status(fn) -> tuple[int, str]:
    try:
        fn()
    except openai.APIStatusError as e:
        return e.status_code, str(e.body)
    return 200, ""


def test_client_mistakes_get_4xx_with_openai_errors(oai, http, speech_bytes):
    silence = wav_bytes(np.zeros(16000 * 610, np.float32), 16000, "FLAC")  # 10 min 10 s: longer than AF3 reads

    def chat(messages=None, **kw):
        return lambda: oai.chat.completions.create(model=kw.pop("model", "af3"),
                                                   messages=messages or ask_messages(speech_bytes), **kw)

    bad_b64 = [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "@@notbase64",
                                                                                     "format": "wav"}}]}]
    cases = {
        "bad base64": (chat(bad_b64), 400, "base64"),
        "corrupt audio": (chat([{"role": "user", "content": [audio_part(b"RIFF\x00\x00garbage" * 10, "wav"),
                                                             {"type": "text", "text": "x"}]}]), 400, "decode"),
        "too long audio": (chat([{"role": "user", "content": [audio_part(silence)]}]), 400, "600 s"),
        "bad format": (chat([{"role": "user", "content": [audio_part(speech_bytes, "aiff")]}]), 400, "format"),
        "top_p": (chat(top_p=2.0), 400, "top_p"),
        "temperature": (chat(temperature=-1.0), 400, "temperature"),
        "max_tokens": (chat(max_tokens=100000), 400, "max_tokens"),
        "n>1": (chat(n=2), 400, "n=2"),
        "unknown parameter": (chat(extra_body={"best_of": 3}), 400, "best_of"),
        "conversation order": (chat([{"role": "assistant", "content": "hi"}]), 400, "messages"),
        "unknown model": (chat(model="gpt-4o"), 404, "model"),
        "over the upload limit": (lambda: oai.audio.transcriptions.create(
            model="af3", file=("big.wav", b"\x00" * (UPLOAD_LIMIT + 1))), 413, "limit"),
        "language hint": (lambda: oai.audio.transcriptions.create(
            model="af3", file=("a.flac", speech_bytes), language="de"), 400, "language"),
        "bad response_format": (lambda: oai.audio.transcriptions.create(
            model="af3", file=("a.flac", speech_bytes), response_format="srt"), 400, "response_format"),
    }
    for name, (fn, status, needle) in cases.items():
        got, body = _status(fn)
        assert (got, needle in body) == (status, True), f"{name}: {got} {body}"
    wrong = openai.OpenAI(base_url=http.url + "/v1", api_key="wrong-key", max_retries=0)
    status, body = _status(lambda: wrong.models.list())
    assert status == 401 and "API key" in body
    with pytest.raises(urllib.error.HTTPError) as missing:  # the openai client refuses to send no key at all
        urllib.request.urlopen(http.url + "/v1/models", timeout=10)
    assert missing.value.code == 401 and b"invalid_api_key" in missing.value.read()
    # and the server still answers
    assert oai.chat.completions.create(model="af3", messages=ask_messages(speech_bytes), max_tokens=4).choices


def _post(http, body: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(http.url + "/v1/chat/completions", data=body,
                                 headers={"authorization": f"Bearer {API_KEY}", "content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_errors_read_as_the_products(http):
    """An error fusion raises reaches the HTTP client with its code's status and its own words: no Triton prefix
    ("in ensemble 'af3', "), no exception class name; whole or streamed. A body that is not JSON names no field."""
    for stream in (False, True):
        status, body = _post(http, json.dumps({"model": "af3", "max_tokens": 0, "stream": stream,
                                               "messages": [{"role": "user", "content": "hi"}]}).encode())
        error = body["error"]
        assert status == 400 and error["type"] == "invalid_request_error", body
        assert re.fullmatch(r"max_tokens must be in \[1, \d+\], got 0", error["message"]), body
    status, body = _post(http, b"{not json")
    assert status == 400 and body["error"]["param"] is None, body
    assert body["error"]["message"].startswith("the request body is not valid JSON"), body


def test_triton_down_is_503(server, tmp_path):
    """An HTTP server whose Triton address has nothing listening: health and requests answer 503."""
    down = HTTPServer(f"127.0.0.1:{free_port()}", tmp_path / "openai-down.log", api_key=None)
    try:
        down.wait_listening()
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(down.url + "/health", timeout=10)
        assert e.value.code == 503
        c = openai.OpenAI(base_url=down.url + "/v1", api_key="unused", max_retries=0)
        status, body = _status(lambda: c.chat.completions.create(
            model="af3", messages=[{"role": "user", "content": "hi"}]))
        assert status == 503 and "unavailable" in body
    finally:
        down.stop()


def test_client_disconnect_cancels_the_grpc_stream(oai, http, server):
    """A streaming client that goes away: the HTTP server cancels its gRPC stream to Triton and, since Triton 2.51's
    ensemble does not pass that on to the decoder already running, sends the request id to the cancel model: the
    decoder stops that request short of max_tokens."""
    stream = oai.chat.completions.create(model="af3", messages=[{"role": "user", "content": "Tell a long story."}],
                                         max_tokens=512, stream=True)
    first = next(iter(stream))
    stream.close()
    rid = first.id.removeprefix('chatcmpl-')
    needle = f"request {rid}: cancelling it in Triton"
    decoder_line = f"(request id {rid!r})"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (needle in http.log() and decoder_line in server.log_tail(400)):
        time.sleep(0.2)
    assert needle in http.log()
    line = next(x for x in server.log_tail(400).splitlines() if decoder_line in x)
    assert "cancelled by the client" in line and int(line.split(" after ")[1].split()[0]) < 512, line


def test_decoder_stops_a_request_triton_cancels(server):
    """What the CPU decoder does when Triton reports a request cancelled (gRPC stream cancelled): it stops that
    request's generation. Sent to the decoder model directly, where Triton 2.51 delivers the cancellation."""
    import asyncio

    import tritonclient.grpc.aio as aio
    from tritonclient.grpc import InferInput

    # as long as the build allows (conftest: max_output_len 512), so that the decoder's cancellation poll (every
    # 50 ms) sees the cancel long before the answer could end on its own, however fast the machine
    LONG = 512

    def tensor(name, array, dtype):
        t = InferInput(name, list(array.shape), dtype)
        t.set_data_from_numpy(array)
        return t

    async def run() -> int:
        client = aio.InferenceServerClient(server.grpc_url)
        inputs = [tensor("input_ids", np.array([[11, 12, 13, 14, 15]], np.int32), "INT32"),
                  tensor("input_lengths", np.array([[5]], np.int32), "INT32"),
                  tensor("request_output_len", np.array([[LONG]], np.int32), "INT32"),
                  tensor("streaming", np.array([[True]]), "BOOL")]

        async def one():
            yield {"model_name": "decoder", "inputs": inputs, "request_id": "cancel-me"}
            await asyncio.sleep(120)

        call = client.stream_infer(one())
        n = 0
        async for _, error in call:
            assert error is None
            n += 1
            if n == 2:
                break
        call.cancel()
        await client.close()
        return n

    assert asyncio.run(run()) == 2
    # this request's line (by its id): an earlier test's cancelled request logs the same words
    mine = "(request id 'cancel-me')"
    deadline = time.monotonic() + 60
    while mine not in server.log_tail(400) and time.monotonic() < deadline:
        time.sleep(0.2)
    line = next(x for x in server.log_tail(400).splitlines() if mine in x)
    assert "request cancelled by the client" in line, line
    assert int(line.split(" after ")[1].split()[0]) < LONG, line


def test_serve_with_openai_port_starts_both(repo, tmp_path):
    """`af3trt serve --openai-port P`: tritonserver and the HTTP API from one command; SIGTERM stops both."""
    ports = {name: free_port() for name in ("grpc", "http", "metrics", "openai")}
    cmd = [sys.executable, "-m", "af3trt.runtime.serve.server", "--model-repository", str(repo / "model_repository"),
           "--grpc-port", str(ports["grpc"]), "--http-port", str(ports["http"]), "--metrics-port",
           str(ports["metrics"]), "--log", str(tmp_path / "triton.log"), "--openai-port", str(ports["openai"])]
    log = tmp_path / "serve.log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{ports['openai']}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{ports['openai']}/v1", api_key="none", max_retries=0)
        got = c.chat.completions.create(model="af3", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert got.usage.completion_tokens >= 1
    finally:
        proc.terminate()
        proc.wait(60)
    with pytest.raises(urllib.error.URLError):  # Triton went down with it
        urllib.request.urlopen(f"http://127.0.0.1:{ports['http']}/v2/health/live", timeout=5)


def test_aiperf_runs_fixed_length_against_the_front(http, repo, tmp_path):
    """NVIDIA's AIPerf (the perf extra) with synthetic audio and its fixed-length advice, --extra-inputs ignore_eos:true
    (refused with 400 "Extra inputs are not permitted" before): every request answered, none failed."""
    from af3trt.perf.serving_path import run_aiperf

    result = run_aiperf(http.url, repo / "artifacts" / "lm", tmp_path, concurrency=2, requests=4, max_tokens=8,
                        clip_seconds=2.0, api_key=API_KEY)
    m = result["metrics"]
    assert m["request_count"]["avg"] == 4
    assert m.get("error_request_count", {}).get("avg", 0) == 0
    assert m["output_token_throughput"]["avg"] > 0


# ------------------------------------------------------------------------------------------------ fuzzing (issue 19)
# Cases generated from the front's own OpenAPI schema (/openapi.json) by schemathesis, against the running front, with
# the rules of perf/fuzz.py (check_response): no 5xx but the documented 503, every error in OpenAI's error body, every
# status and JSON body as the schema says, and the front healthy and exact afterwards. Bounded here (FUZZ_EXAMPLES per
# operation, derandomized); `af3trt fuzz --minutes N` runs a longer one over a build.
from af3trt.perf.fuzz import fuzz  # noqa: E402

FUZZ_EXAMPLES = int(os.environ.get("AF3TRT_FUZZ_EXAMPLES", "40"))


@pytest.fixture(scope="module")
def before_fuzzing(oai, speech_bytes) -> str:
    """An exact answer before the fuzzing, to compare with after it."""
    return oai.chat.completions.create(model="af3", messages=ask_messages(speech_bytes),
                                       max_tokens=MAX_TOKENS).choices[0].message.content


def test_fuzz_from_the_openapi_schema(http, before_fuzzing):
    """Most seeded cases reach the decoder (a 200): before issue 31, 58 of 19,407 chat cases did and no transcription
    case carried valid audio (the transcription form was not in /openapi.json)."""
    result = fuzz(http.url, api_key=API_KEY, examples=FUZZ_EXAMPLES, derandomize=True)
    ops = result["operations"]
    assert set(ops) >= {"POST /v1/chat/completions", "POST /v1/audio/transcriptions", "GET /v1/models"}
    assert all(s["cases"] for s in ops.values()), ops
    assert result["failures"] == [], "\n".join(result["failures"])
    for op in ("POST /v1/chat/completions", "POST /v1/audio/transcriptions"):
        seeded = ops[op]["by_mode"].get("seeded", {})
        print(f"\n{op}: {ops[op]['statuses']}, seeded {seeded}, mutated audio {ops[op]['by_mode'].get('mutated audio')}")
        assert seeded.get(200, 0) * 2 > sum(seeded.values()), (op, ops[op])  # most seeded cases reach the model


def test_fuzz_over_grpc_reaches_the_decoder(server, before_fuzzing):
    """Hypothesis requests to the ensemble over gRPC (valid and mutated audio, conversations, every field): each is
    answered, busy, or refused with a client's code; every tame request (valid by construction) reaches the decoder
    (tokens), and they are a good share of the cases."""
    from af3trt.perf.fuzz import fuzz_grpc

    result = fuzz_grpc(server.grpc_url, examples=FUZZ_EXAMPLES, derandomize=True)
    print(f"\ngRPC fuzz: {result['outcomes']}, tame: {result['tame']}")
    assert result["failures"] == [], "\n".join(result["failures"])
    assert result["tame"].get("answered with tokens", 0) == result["tame"]["cases"]
    assert result["tame"]["cases"] * 4 >= result["cases"]


def test_front_is_healthy_and_exact_after_fuzzing(oai, http, speech_bytes, before_fuzzing):
    with urllib.request.urlopen(http.url + "/health", timeout=30) as r:
        assert r.status == 200
    after = oai.chat.completions.create(model="af3", messages=ask_messages(speech_bytes), max_tokens=MAX_TOKENS)
    assert after.choices[0].message.content == before_fuzzing
