"""Structured output through the real ensemble (the session's tritonserver on the tiny build): gRPC guides equal
transformers' greedy generate with xgrammar's own logits processor on audio questions; the OpenAI front's
response_format, vLLM extras and errors, driven by the `openai` package; `af3trt batch` scoring multiple-choice lines
constrained to their choices (docs/structured-output.md)."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from pathlib import Path

import pytest
from helpers import http_server
from reference import mono16k

openai = pytest.importorskip("openai")  # a declared test dependency (pyproject [test])
jsonschema = pytest.importorskip("jsonschema")  # comes with schemathesis (pyproject [test])

pytestmark = pytest.mark.integration

N = 64
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["speaker", "words", "mood"],
          "properties": {"speaker": {"enum": ["man", "woman", "child", "machine"]},
                         "words": {"type": "integer", "minimum": 0, "maximum": 99},
                         "mood": {"type": "string", "maxLength": 8}}}
CHOICES = ["(A) a dog barking", "(B) a person speaking", "(C) a piano", "(D) rain"]


@pytest.fixture(scope="module")
def http(server, tmp_path_factory):
    with http_server(server.grpc_url, tmp_path_factory.mktemp("openai")) as srv:
        yield srv


@pytest.fixture(scope="module")
def oai(http):
    return openai.OpenAI(base_url=http.url + "/v1", api_key="unused", max_retries=0, timeout=300)


def _messages(speech_bytes, question: str) -> list[dict]:
    audio = {"type": "input_audio", "input_audio": {"data": base64.b64encode(speech_bytes).decode(), "format": "flac"}}
    return [{"role": "user", "content": [audio, {"type": "text", "text": question}]}]


def _strip_end(ids: list[int], eos) -> list[int]:
    return ids[:-1] if ids and ids[-1] in eos else ids


@pytest.mark.parametrize("guide_type, guide, backend", [
    ("json_schema", json.dumps(SCHEMA), ("json_schema", json.dumps(SCHEMA))),
    ("choice", json.dumps(CHOICES), ("ebnf_grammar", "root ::= " + " | ".join(json.dumps(c) for c in CHOICES))),
    ("regex", r"(yes|no), [a-z]{2,6}\.", ("regex", r"(yes|no), [a-z]{2,6}\.")),
])
def test_guided_audio_answers_equal_transformers_with_xgrammar(client, ref, speech_bytes, guide_type, guide, backend):
    question = "Describe the audio."
    got = client.ask(question, [speech_bytes], max_tokens=N, stream=False, guide_type=guide_type, guide=guide)
    want = ref.generate(question, mono16k(speech_bytes), max_new_tokens=N, guide=backend)
    assert _strip_end(got.token_ids, ref.eos_ids) == want
    if guide_type == "json_schema":
        jsonschema.validate(json.loads(got.text), SCHEMA)
    elif guide_type == "choice":
        assert got.text in CHOICES
    else:
        assert re.fullmatch(guide, got.text)


def test_response_format_json_schema_through_the_openai_client(oai, client, speech_bytes):
    rf = {"type": "json_schema", "json_schema": {"name": "clip", "schema": SCHEMA, "strict": True}}
    whole = oai.chat.completions.create(model="af3", messages=_messages(speech_bytes, "Describe it."), max_tokens=N,
                                        response_format=rf)
    answer = whole.choices[0].message.content
    jsonschema.validate(json.loads(answer), SCHEMA)
    assert whole.choices[0].finish_reason == "stop"
    same = client.ask("Describe it.", [speech_bytes], max_tokens=N, stream=False, guide_type="json_schema",
                      guide=json.dumps(SCHEMA))
    assert same.text == answer
    chunks = list(oai.chat.completions.create(model="af3", messages=_messages(speech_bytes, "Describe it."),
                                              max_tokens=N, response_format=rf, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer
    obj = oai.chat.completions.create(model="af3", messages=_messages(speech_bytes, "As JSON."), max_tokens=N,
                                      response_format={"type": "json_object"})
    assert obj.choices[0].finish_reason == "length" or isinstance(json.loads(obj.choices[0].message.content), dict)


def test_vllm_extras_choice_and_regex(oai, speech_bytes):
    pick = oai.chat.completions.create(model="af3", messages=_messages(speech_bytes, "Which is it?"), max_tokens=N,
                                       extra_body={"structured_outputs": {"choice": CHOICES}})
    assert pick.choices[0].message.content in CHOICES and pick.choices[0].finish_reason == "stop"
    legacy = oai.chat.completions.create(model="af3", messages=_messages(speech_bytes, "Which is it?"), max_tokens=N,
                                         extra_body={"guided_choice": CHOICES})
    assert legacy.choices[0].message.content == pick.choices[0].message.content
    code = oai.chat.completions.create(model="af3", messages=_messages(speech_bytes, "A code."), max_tokens=N,
                                       extra_body={"guided_regex": "[0-9]{3}-[A-Z]{2}"})
    assert re.fullmatch("[0-9]{3}-[A-Z]{2}", code.choices[0].message.content)


def test_max_tokens_too_small_for_the_schema_is_finish_reason_length(oai, speech_bytes):
    cut = oai.chat.completions.create(
        model="af3", messages=_messages(speech_bytes, "Describe it."), max_tokens=4,
        response_format={"type": "json_schema", "json_schema": {"name": "clip", "schema": SCHEMA}})
    assert cut.choices[0].finish_reason == "length" and cut.usage.completion_tokens == 4
    with pytest.raises(json.JSONDecodeError):
        json.loads(cut.choices[0].message.content)  # cut before the JSON closes: the reason says so


def test_bad_guides_are_400_and_nothing_else_is_disturbed(oai, client, speech_bytes):
    """Bad guides in flight beside good requests: each bad one a 400 naming the problem, the good ones exactly as
    alone."""
    baseline = client.ask("What is said in the audio?", [speech_bytes], max_tokens=24, stream=False)
    bad = {
        "uncompilable schema": {"response_format": {"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "object", "properties": {"a": {"$ref": "#/missing"}}}}}},
        "regex that cannot compile": {"extra_body": {"guided_regex": "(unclosed"}},
        "regex that matches nothing": {"extra_body": {"guided_regex": "[^\\x00-\\U0010ffff]"}},
        "thinking with a guide": {"reasoning_effort": "high", "response_format": {"type": "json_object"}},
        "two guides": {"extra_body": {"guided_regex": "a", "guided_choice": ["a"]}},
    }

    def good():
        return client.ask("What is said in the audio?", [speech_bytes], max_tokens=24, stream=False).token_ids

    def send(kw):
        try:
            oai.chat.completions.create(model="af3", messages=_messages(speech_bytes, "Hm?"), max_tokens=8, **kw)
        except openai.BadRequestError as e:
            return e.status_code, e.message
        return 200, "no error"

    with ThreadPoolExecutor(len(bad) + 2) as pool:
        goods = [pool.submit(good) for _ in range(2)]
        errors = {name: pool.submit(send, kw) for name, kw in bad.items()}
        assert [g.result(300) for g in goods] == [baseline.token_ids] * 2
        errors = {name: f.result(300) for name, f in errors.items()}
    assert all(status == 400 for status, _ in errors.values()), errors
    assert "cannot be compiled" in errors["uncompilable schema"][1]
    assert "cannot be compiled" in errors["regex that cannot compile"][1]
    assert "thinking" in errors["thinking with a guide"][1] or "think" in errors["thinking with a guide"][1]
    assert "give one guide" in errors["two guides"][1]


def test_a_batch_scores_multiple_choice_lines_constrained_to_their_choices(http, speech_bytes, tmp_path):
    (tmp_path / "clip.flac").write_bytes(speech_bytes)
    items = [{"id": f"q{i}", "question": q, "choices": CHOICES, "answer": CHOICES[1], "task": "sound"}
             for i, q in enumerate(["What do you hear?", "Which sound is this?", "Pick the sound source."])]
    with open(tmp_path / "in.jsonl", "w") as f:
        for item in items:
            text = item["question"] + " Choices: " + " ".join(item["choices"])
            f.write(json.dumps({"custom_id": item["id"], "method": "POST", "url": "/v1/chat/completions", "body": {
                "model": "af3", "max_tokens": 32, "guided_choice": item["choices"],
                "messages": [{"role": "user", "content": [
                    {"type": "input_audio", "input_audio": {"file": "clip.flac"}}, {"type": "text", "text": text}]}],
            }}) + "\n")
    (tmp_path / "key.json").write_text(json.dumps(items))
    run = subprocess.run([sys.executable, "-m", "af3trt.cli", "batch", str(tmp_path / "in.jsonl"),
                          str(tmp_path / "out.jsonl"), "--url", http.url], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert sorted(line["custom_id"] for line in lines) == ["q0", "q1", "q2"]
    for line in lines:
        assert line["response"]["status_code"] == 200, line
        assert line["response"]["body"]["choices"][0]["message"]["content"] in CHOICES
    score = subprocess.run([sys.executable, "-m", "af3trt.cli", "score", str(tmp_path / "out.jsonl"), "--key",
                            str(tmp_path / "key.json")], capture_output=True, text=True, timeout=120)
    assert score.returncode == 0 and "no prediction 0" in score.stdout, score.stdout + score.stderr


def test_the_documented_openai_example_runs(http, tmp_path):
    """docs/structured-output.md's first python block, as written but for the server's address, run as a user runs
    it: a script of its own (pydantic resolves the example's annotations in its module, which exec() into a bare
    namespace does not give it)."""
    root = Path(__file__).resolve().parent.parent
    page = (root / "docs" / "structured-output.md").read_text()
    code = re.search(r"```python\n(.*?)```", page, re.DOTALL).group(1)
    assert "http://127.0.0.1:9000/v1" in code
    script = tmp_path / "example.py"
    script.write_text(code.replace("http://127.0.0.1:9000/v1", http.url + "/v1"))
    run = subprocess.run([sys.executable, str(script)], cwd=root,  # the example opens runtime/assets/speech.flac
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    printed = run.stdout.splitlines()
    assert len(printed) == 4 and printed[2] in ("speech", "music", "noise")
    assert re.fullmatch(r"[0-9]{1,2}\.[0-9] s", printed[3])
