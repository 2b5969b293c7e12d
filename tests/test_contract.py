"""runtime/stages/contract.py is the one list of the ensemble's interface: the Triton configs and the client are built from
it (so they agree by construction, and a change shows up in both); and the pieces the refactor moved keep their
promises: a persistent client stream, perf's input data from the client, a stub site directory that is the same
in every process."""

from __future__ import annotations

import base64
import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from af3trt.perf import analyzer
from af3trt.runtime.stages import contract
from af3trt.runtime.client.library import AF3Stream, Request
from af3trt.triton_repo import configs
from reference import MAX_TOKENS

SPEC = configs.RepoSpec(target="cpu", hidden_size=8, decoder_dtype="float32", vocab_size=100, end_id=1, pad_id=0)


def _every_input_set() -> Request:
    return Request(prompt="p", audio=[b"a", b"b"], system_prompt="s", messages=[{"role": "user", "content": "m"}],
                   max_tokens=3, temperature=0.5, top_k=4, top_p=0.9, repetition_penalty=1.1, seed=7, stream=False,
                   strip_prefix=True, thinking=True, min_tokens=2, ignore_eos=False, guide_type="regex", guide="a+",
                   request_id="r")


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


ROOT = Path(__file__).resolve().parents[1]
GPU_SPEC = configs.RepoSpec(target="gpu", hidden_size=8, decoder_dtype="bfloat16", vocab_size=100, end_id=1, pad_id=0,
                            prompt_table_extra_ids=True, stop_ids=[2, 3])


def _literals(path: Path, names: set[str]) -> list[str]:
    text = path.read_text(encoding="utf-8")
    return [f"{path.relative_to(ROOT)}: {m.group(0)}" for m in re.finditer(r"[\"']([a-z_]+)[\"']", text)
            if m.group(1) in names]


def test_tensor_names_are_written_only_in_the_contract():
    """Each tensor name is written once, in runtime/stages/contract.py. The Triton adapters write no tensor name at all
    (they read and write tensors by the contract's names). The names of tensors between steps appear nowhere else
    in the package; the request and response names are the public API, which the client and the OpenAI front
    also spell (as JSON keys and keyword arguments)."""
    every = {t.name for m in contract.MODELS.values() for t in (*m.inputs, *m.outputs)}
    public = {t.name for t in (*contract.REQUEST_INPUTS, *contract.RESPONSE_OUTPUTS, contract.CANCEL_INPUT,
                               contract.CANCEL_OUTPUT)}
    # names that are also something else: a checkpoint fact and the fusion parameter carrying it (end_id, pad_id),
    # fusion's switch parameter (prompt_table_extra_ids), the keyword of a transformers model call (input_ids), a
    # section of perf's report (streaming), OpenAI's `stop` parameter and finish reason (stop)
    elsewhere = {contract.END_ID, contract.PAD_ID, contract.PROMPT_TABLE_EXTRA_IDS, contract.INPUT_IDS,
                 contract.STREAMING, contract.STOP}
    adapters = sorted((ROOT / "triton_repo").glob("*/model.py"))
    assert len(adapters) >= 7
    found = [hit for p in adapters for hit in _literals(p, every)]
    assert not found, found
    package = [p for d in ("runtime", "triton_repo", "kernels", "build", "export", "perf", "af3trt")
               for p in sorted((ROOT / d).rglob("*.py")) if p != ROOT / "runtime" / "stages" / "contract.py"]
    found = [hit for p in package for hit in _literals(p, every - public - elsewhere)]
    assert not found, found
    # the check sees a literal where there is one
    assert _literals(ROOT / "runtime" / "stages" / "contract.py", {contract.INPUT_FEATURES_MASK})


@pytest.mark.parametrize("spec", [SPEC, GPU_SPEC], ids=["cpu", "gpu"])
def test_the_ensemble_connects_every_consumed_tensor_to_a_producer(spec):
    """Every tensor a step reads is a request input or an earlier step's output; every input a model requires is
    fed; every response output is produced; and what each step writes is its model's output, typed as the reader
    declares it."""
    cfgs = configs.all_configs(spec)
    ens = cfgs[contract.ENSEMBLE]
    produced = {i.name: ("request", i) for i in ens.input}
    for step in ens.ensemble_scheduling.step:
        model = cfgs[step.model_name]
        declared = {i.name: i for i in model.input}
        for name, tensor in step.input_map.items():
            assert name in declared, (step.model_name, name)
            assert tensor in produced, f"{step.model_name}.{name} reads {tensor}, which nothing writes before it"
            src = produced[tensor][1]
            assert src.data_type == declared[name].data_type, (step.model_name, name)
        missing = [i.name for i in model.input if not i.optional and i.name not in step.input_map]
        assert not missing, (step.model_name, missing)
        outputs = {o.name: o for o in model.output}
        assert set(step.output_map) == set(outputs), step.model_name
        for name, tensor in step.output_map.items():
            produced[tensor] = (step.model_name, outputs[name])
    for o in ens.output:
        assert produced[o.name][0] == contract.POSTPROCESS, o.name
    # the GPU repository feeds the decoder its extra ids and stop words; the CPU one (SPEC) leaves both out
    decoder_feed = set(ens.ensemble_scheduling.step[3].input_map)
    extra = {contract.PROMPT_TABLE_EXTRA_IDS, contract.STOP_WORDS_LIST}
    assert extra <= decoder_feed if spec is GPU_SPEC else not extra & decoder_feed


def test_a_step_input_without_a_producer_is_caught(monkeypatch):
    """The wiring is derived: a step reading a tensor that no earlier step writes is left unfed, and the test above
    fails on it when the model requires it."""
    stage = contract.DECODER_STAGE
    renamed = contract.StageSpec(stage.name, (contract.TensorSpec("input_lengthz", "INT32", (1,)), *stage.inputs[1:]),
                                 stage.outputs)
    monkeypatch.setattr(contract, "STEPS", tuple(renamed if s is stage else s for s in contract.STEPS))
    monkeypatch.setitem(contract.MODELS, stage.name, renamed)
    with pytest.raises(AssertionError, match="input_lengthz"):
        test_the_ensemble_connects_every_consumed_tensor_to_a_producer(SPEC)


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
    code = "from af3trt.runtime.serve.triton_install import _stub_pythonpath; print(_stub_pythonpath())"
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
