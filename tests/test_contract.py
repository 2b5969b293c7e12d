"""runtime/contract.py is the one list of the ensemble's interface: the Triton configs and the client are built from
it (so they agree by construction, and a change shows up in both); and the pieces the refactor moved keep their
promises: a persistent client stream, perf's input data from the client, a stub site directory that is the same
in every process."""

from __future__ import annotations

import base64
import json
import os
import struct
import subprocess
import sys

import pytest

from af3trt.perf import analyzer
from af3trt.runtime import contract
from af3trt.runtime.client import AF3Stream, Request
from af3trt.triton_repo import configs
from reference import MAX_TOKENS

SPEC = configs.RepoSpec(target="cpu", hidden_size=8, decoder_dtype="float32", vocab_size=100, end_id=1, pad_id=0)


def _every_input_set() -> Request:
    return Request(prompt="p", audio=[b"a", b"b"], system_prompt="s", messages=[{"role": "user", "content": "m"}],
                   max_tokens=3, temperature=0.5, top_k=4, top_p=0.9, repetition_penalty=1.1, seed=7, stream=False,
                   strip_prefix=True, request_id="r")


def test_the_ensemble_config_is_the_contract():
    ens = configs.ensemble_config(SPEC)
    assert ens.name == contract.ENSEMBLE
    assert [(i.name, configs.mc.DataType.Name(i.data_type), list(i.dims), i.optional) for i in ens.input] == \
        [(s.name, "TYPE_STRING" if s.datatype == "BYTES" else f"TYPE_{s.datatype}", list(s.dims), s.optional)
         for s in contract.REQUEST_INPUTS]
    assert [o.name for o in ens.output] == [s.name for s in contract.RESPONSE_OUTPUTS]
    assert [s.model_name for s in ens.ensemble_scheduling.step] == list(contract.STAGES)
    cancel = configs.cancel_config(SPEC)
    assert (cancel.name, cancel.input[0].name, cancel.output[0].name) == \
        (contract.CANCEL, contract.CANCEL_INPUT.name, contract.CANCEL_OUTPUT.name)
    # the steps that read request inputs read them as the client sends them
    for cfg in (configs.preprocess_config(SPEC), configs.fusion_config(SPEC)):
        for i in cfg.input:
            if i.name in {s.name for s in contract.REQUEST_INPUTS}:
                spec = contract.request_input(i.name)
                assert (configs.triton_type(spec.datatype), list(i.dims), i.optional) == \
                    (i.data_type, list(spec.dims), spec.optional), (cfg.name, i.name)


def test_the_client_sends_every_input_as_the_contract_types_it():
    inputs = {i.name(): i for i in _every_input_set().inputs()}
    assert list(inputs) == [s.name for s in contract.REQUEST_INPUTS]  # every input can be set, none is extra
    for spec in contract.REQUEST_INPUTS:
        assert inputs[spec.name].datatype() == spec.datatype, spec.name
    assert inputs["audio"].shape() == [2] and inputs["seed"].shape() == [1]
    values = _every_input_set().values()
    assert json.loads(values["messages"][0]) == [{"role": "user", "content": "m"}]
    assert values["text_input"] == [b"p"] and values["top_k"] == [4] and values["stream"] == [False]
    with pytest.raises(KeyError, match="not a request input"):
        contract.request_input("prompt")


def test_perf_analyzer_input_data_is_the_clients(tmp_path):
    """perf_analyzer sends what the client sends: the same inputs, BYTES as base64 of Triton's serialized
    elements (4-byte length, then the bytes), the others as content."""
    path = analyzer.write_input_data(tmp_path / "in.json", [("hi", b"clip")], max_tokens=5, stream=False)
    (entry,) = json.loads(path.read_text())["data"]
    values = Request("hi", [b"clip"], max_tokens=5, stream=False).values()
    assert list(entry) == list(values) == ["text_input", "audio", "max_tokens", "stream"]
    assert base64.b64decode(entry["audio"]["b64"]) == struct.pack("<I", 4) + b"clip"
    assert entry["max_tokens"] == {"content": [5], "shape": [1]} and entry["stream"]["content"] == [False]


def test_the_stub_site_directory_is_the_same_in_every_process(tmp_path):
    """Python's hash() of a str changes per process; the directory name must not (one directory per interpreter,
    not one per run)."""
    code = "from af3trt.runtime.triton_install import _stub_pythonpath; print(_stub_pythonpath())"
    env = {**os.environ, "AF3TRT_CACHE": str(tmp_path), "PYTHONHASHSEED": "random"}
    runs = {subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                           timeout=120).stdout.strip() for _ in range(3)}
    assert len(runs) == 1
    assert [p.name for p in tmp_path.iterdir()] == [os.path.basename(runs.pop())]


@pytest.mark.integration
def test_a_persistent_stream_answers_like_the_client(server, client, speech_bytes):
    """AF3Stream (perf's per-request probe): requests one after another on one connection answer as AF3Client
    does; one left early is cancelled and the next request on the same AF3Stream is answered whole."""
    want = client.ask("What is said?", [speech_bytes], max_tokens=MAX_TOKENS, stream=False)
    with AF3Stream(server.grpc_url, timeout=120) as conn:
        for stream in (False, True):
            got = [c for c in conn.responses(Request("What is said?", [speech_bytes], max_tokens=MAX_TOKENS,
                                                     stream=stream))]
            assert [t for c in got for t in c.token_ids] == want.token_ids
            assert got[0].prompt_tokens > 0 and (len(got) > 1 if stream else len(got) == 1)
        early = conn.responses(Request("What is said?", [speech_bytes], max_tokens=MAX_TOKENS, stream=True))
        assert len(next(early).token_ids) == 1
        early.close()
        again = [t for c in conn.responses(Request("What is said?", [speech_bytes], max_tokens=MAX_TOKENS,
                                                   stream=False)) for t in c.token_ids]
    assert again == want.token_ids
