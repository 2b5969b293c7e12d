"""The GPU target's decoder front (runtime/triton/decoder_front.py, triton_repo/decoder_front) against the strict fake of
the tensorrtllm backend (tests/fakes/trtllm_backend.py): ids, coalescing, host memory for stop/streaming, think/'s
adapter in the engine's dtype."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from af3trt.runtime.stages import contract as c
from af3trt.runtime.triton import decoder_front
from af3trt.triton_repo import configs

from fakes import pb_utils as fake_pb
from fakes.trtllm_backend import FakeTrtllmDecoder

SPEC = configs.RepoSpec(target="gpu", hidden_size=8, decoder_dtype="bfloat16", vocab_size=100, end_id=1, pad_id=0,
                        prompt_table_extra_ids=True, max_batch_size=2)
FINAL = fake_pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def engine_dir(tmp_path, dtype="bfloat16", lora=True):
    """An engine directory as trtllm-build writes it (tests/fakes/trtllm_build.py), 2 layers, hidden 8."""
    cfg = {"pretrained_config": {"dtype": dtype, "num_hidden_layers": 2, "hidden_size": 8, "num_attention_heads": 2,
                                 "num_key_value_heads": 1, "intermediate_size": 16, "vocab_size": 100},
           "build_config": {"max_batch_size": 2, "max_input_len": 64, "max_seq_len": 96,
                            "max_prompt_embedding_table_size": 64,
                            **({"lora_config": {"lora_target_modules": ["attn_q", "attn_v"], "max_lora_rank": 2}}
                               if lora else {})}}
    d = tmp_path / "engine"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def adapter_files(tmp_path, dtype="bfloat16"):
    """think/'s adapter for that engine as build/trtllm_lora.py writes it: rows (layer, module) of A [2, 8] then
    B [out, 2] (attn_q out 8, attn_v out 4), padded to the longest."""
    from af3trt.build.trtllm_lora import CONFIG_FILE, WEIGHTS_FILE, stored

    rows, config = [], []
    for layer in range(2):
        for module, out in ((1, 8), (3, 4)):
            rows.append(np.r_[np.full(2 * 8, 0.5), np.full(out * 2, 0.25), np.zeros((8 - out) * 2)])
            config.append([module, layer, 2])
    root = tmp_path / "lora"
    (root / "1").mkdir(parents=True)
    np.save(root / "1" / WEIGHTS_FILE, stored(np.asarray(rows, np.float32)[None], dtype))
    np.save(root / "1" / CONFIG_FILE, np.asarray(config, np.int32)[None])
    return root


@pytest.fixture
def decoder(tmp_path, monkeypatch):
    cfg = configs.decoder_config(configs.RepoSpec(**{**SPEC.__dict__, "decoder_params": {
        "gpt_model_path": str(engine_dir(tmp_path)), "lora_cache_optimal_adapter_size": "2",
        "lora_cache_max_adapter_size": "2", "enable_kv_cache_reuse": "false",
        # read without a default by the backend (build/gpu_repo.py backend_params): empty = no guided decoding
        "tokenizer_dir": "", "xgrammar_tokenizer_info_path": "", "guided_decoding_backend": ""}}))
    fake = FakeTrtllmDecoder(cfg, generate=True)
    monkeypatch.setattr(fake_pb, "BLS_MODELS", {"decoder": fake})
    return fake


def front(adapter=None, interval_s=0.05):
    return decoder_front.Front(fake_pb, "decoder", interval_s=interval_s, adapter=adapter)


def request(rid="r1", *, tokens=6, stream=True, lora=False, gpu_streaming=False):
    """A request as Triton hands it to the front: [1, L] ids, the [1] scalars reshaped to [] ([batch] only)."""
    inputs = {c.INPUT_IDS: np.array([[5, 6, 7]], np.int32), c.INPUT_LENGTHS: np.array([3], np.int32),
              c.REQUEST_OUTPUT_LEN: np.array([tokens], np.int32), c.STREAMING: np.array([stream]),
              c.END_ID: np.array([1], np.int32)}
    if lora:
        inputs[c.LORA_TASK_ID] = np.array([1], np.uint64)
    r = fake_pb.Request(inputs, rid)
    if gpu_streaming:  # FORCE_CPU_ONLY_INPUT_TENSORS "no": Triton may hand it over in GPU memory
        r.inputs[c.STREAMING] = fake_pb.GpuTensor(c.STREAMING, inputs[c.STREAMING])
    return r


def answered(r, timeout=10.0):
    assert r.sender.done.wait(timeout), "no final flag"
    return r.sender.sent


def tokens_of(sent):
    return [[int(t) for t in resp.outputs[c.OUTPUT_IDS].as_numpy().reshape(-1)] for resp, _ in sent if resp is not None]


def test_a_stream_is_coalesced_first_token_alone_last_response_alone(decoder):
    """Item 7: the backend's one response per token become at most one per interval; the first token goes at once
    and alone, the last as it came with the final flag, and the tokens join to the backend's."""
    r = request(tokens=12)
    front().submit(r)
    sent = answered(r)
    got = tokens_of(sent)
    want = decoder.executor[1]["tokens"]
    assert sum(got, []) == want and len(got) < len(want)
    assert got[0] == want[:1] and got[-1] == want[-1:]
    assert [f for _, f in sent] == [0] * (len(sent) - 1) + [FINAL]
    assert all(not r.has_error() for r, _ in sent)


def test_without_an_interval_every_token_goes_and_a_whole_answer_is_one_response(decoder):
    r = request(tokens=4)
    front(interval_s=0).submit(r)
    assert len(tokens_of(answered(r))) == 4
    whole = request("r2", tokens=4, stream=False)
    front().submit(whole)
    sent = answered(whole)
    assert tokens_of(sent) == [decoder.executor[2]["tokens"]] and sent[-1][1] == FINAL


def test_request_ids_duplicates_refused_and_ours_for_requests_without_one(decoder, monkeypatch):
    """Item 6: a stop is matched by request id (model_instance_state.cc handleStopRequest), so a second request with the
    id of one in flight is refused, and a request without an id gets one of ours (the stop map needs it)."""
    f = front()
    hold = decoder_front.RequestIds()
    monkeypatch.setattr(f, "ids", hold)
    hold.claim("busy")
    dup = request("busy")
    f.submit(dup)
    (resp, flags), = answered(dup)
    assert flags == FINAL and resp.has_error() and "already in flight" in resp.error.message()
    assert "busy" in hold and not decoder.executor  # the decoder never saw it
    anonymous = request("")
    f.submit(anonymous)
    answered(anonymous)
    (run,) = decoder.executor.values()
    assert run["triton_id"].startswith(decoder_front.ID_PREFIX) and len(run["triton_id"]) == len(
        decoder_front.ID_PREFIX) + 32
    assert run["triton_id"] not in hold  # released at the end
    again = request("busy2")
    f.submit(again)
    answered(again)
    f.submit(request("busy2"))  # the same id once the first has ended: accepted


def test_scalars_reach_the_backend_with_their_declared_shape(decoder):
    """Triton hands the front each [1] scalar reshaped to [batch]; sent on as such the decoder refuses it (core's shape
    check, seen on tritonserver 2.51): the front sends [1, 1]."""
    bad = decoder("d0", {c.INPUT_IDS: np.array([[5]], np.int32), c.INPUT_LENGTHS: np.array([1], np.int32),
                         c.REQUEST_OUTPUT_LEN: np.array([[2]], np.int32)})
    assert bad[0].has_error() and "Expected [-1, 1], got [1]" in bad[0].error().message()
    r = request(tokens=2)
    front().submit(r)
    assert not any(resp.has_error() for resp, _ in answered(r) if resp is not None)


def test_stop_and_streaming_reach_the_backend_in_host_memory(decoder):
    """Item 8: utils.cc getRequestBooleanInputTensor asserts host memory for `stop` and `streaming`; the front hands the
    backend host tensors whatever Triton gave it, and the strict fake refuses a GPU one."""
    direct = decoder("d1", {c.INPUT_IDS: np.array([[5]], np.int32), c.INPUT_LENGTHS: np.array([[1]], np.int32),
                            c.REQUEST_OUTPUT_LEN: np.array([[2]], np.int32),
                            c.STREAMING: fake_pb.GpuTensor(c.STREAMING, np.array([[True]]))})
    assert direct[0].has_error() and "host memory" in direct[0].error().message()
    r = request(gpu_streaming=True)
    front().submit(r)
    assert not any(resp.has_error() for resp, _ in answered(r) if resp is not None)
    assert decoder_front.HOST_INPUTS == (c.STOP, c.STREAMING, c.LORA_WEIGHTS, c.LORA_CONFIG)


def test_a_bf16_engine_is_sent_the_adapter_in_its_dtype_once_and_after_it_was_lost(decoder, tmp_path):
    """Item 1: a bf16 engine cannot preload the adapter (numpyUtils.cpp reads f2/f4 only); the front sends lora_weights
    in bf16 from host memory with lora_config on the first thinking request, then the task id alone; after the
    backend's "not found in cache" (a restarted decoder) it sends them again."""
    adapter = decoder_front.Adapter.load(adapter_files(tmp_path), 1, "bfloat16", held=False)
    assert adapter.weights.dtype == torch.bfloat16 and adapter.weights.shape == (1, 4, 32)
    f = front(adapter)
    for rid in ("t1", "t2"):
        r = request(rid, lora=True)
        f.submit(r)
        assert not any(resp.has_error() for resp, _ in answered(r) if resp is not None)
    assert [e["lora_task"] for e in decoder.executor.values()] == [1, 1]
    assert decoder.lora.tasks == {1: "BF16"}
    decoder.lora.tasks.clear()  # the decoder restarted: its cache is empty
    r = request("t3", lora=True)
    f.submit(r)
    assert not any(resp.has_error() for resp, _ in answered(r) if resp is not None)
    assert decoder.lora.tasks == {1: "BF16"} and len(decoder.executor) == 3  # the refused try was not enqueued


def test_weights_of_another_dtype_are_refused_as_upstream_refuses_them(decoder, tmp_path, monkeypatch):
    """The checks item 1 rests on: Triton refuses float16 weights for our bf16 declaration of lora_weights; with
    upstream's own declaration (TYPE_FP16) they pass Triton and the executor refuses them for the bf16 engine
    (loraUtils.cpp "Expected lora weights to be the same data type as base model")."""
    adapter = decoder_front.Adapter.load(adapter_files(tmp_path, "float16"), 1, "float16", held=False)
    r = request("t1", lora=True)
    front(adapter).submit(r)
    (resp, _), = answered(r)
    assert resp.has_error() and "data-type is 'FP16', but model 'decoder' expects 'BF16'" in resp.error.message()
    stock = FakeTrtllmDecoder(configs.decoder_config(configs.RepoSpec(**{**SPEC.__dict__, "decoder_dtype": "float16",
                                                                         "decoder_params": decoder.params})),
                              generate=True)
    monkeypatch.setitem(fake_pb.BLS_MODELS, "decoder", stock)
    r = request("t2", lora=True)
    front(adapter).submit(r)
    (resp, _), = answered(r)
    assert resp.has_error() and "same data type as base model" in resp.error.message()


def test_the_gpu_repository_renders_the_front_as_the_ensembles_decoder_step():
    spec = configs.RepoSpec(**{**SPEC.__dict__, "decoder_front_params": {"stream_interval_ms": 50}})
    cfgs = configs.all_configs(spec)
    steps = {s.model_name for s in cfgs["af3"].ensemble_scheduling.step}
    assert c.DECODER_FRONT in steps and c.DECODER not in steps
    front_cfg, dec = cfgs[c.DECODER_FRONT], cfgs[c.DECODER]
    assert front_cfg.backend == "python" and front_cfg.model_transaction_policy.decoupled
    assert front_cfg.parameters["decoder_model"].string_value == c.DECODER
    assert front_cfg.parameters["FORCE_CPU_ONLY_INPUT_TENSORS"].string_value == "no"
    assert len(front_cfg.instance_group) == 1 and front_cfg.instance_group[0].count == 1  # one set of ids in flight
    weights = next(i for i in dec.input if i.name == c.LORA_WEIGHTS)
    assert configs.mc.DataType.Name(weights.data_type) == "TYPE_BF16"  # the engine's dtype, not upstream's TYPE_FP16
    assert cfgs[c.CANCEL].parameters["stop_model"].string_value == c.DECODER  # stops still go to the backend
    cpu = configs.all_configs(configs.RepoSpec(target="cpu", hidden_size=8, decoder_dtype="float32", vocab_size=100,
                                               end_id=1, pad_id=0))
    assert c.DECODER_FRONT not in cpu and c.LORA_WEIGHTS not in {i.name for i in cpu[c.DECODER].input}


@pytest.fixture(scope="module")
def front_server(tiny_ckpt, tmp_path_factory):
    """The GPU target's ensemble shape on a real tritonserver: a CPU build of stand-ins with --decoder-front (the front
    coalescing at 50 ms, calling by BLS a stand-in decoder that sends one response per token, at 300 tokens/s)."""
    from af3trt.build.build_engines import main as build_main
    from af3trt.runtime.serve.server import TritonServer

    out = tmp_path_factory.mktemp("front") / "af3"
    build_main(["--hf-model", str(tiny_ckpt), "--out", str(out), "--stand-in-tokens-per-s", "300", "--decoder-front",
                "--stream-interval-ms", "50", "--max-output-len", "64"])
    with TritonServer(out / "model_repository", log_path=out / "tritonserver.log") as srv:
        yield srv


@pytest.mark.integration
def test_the_front_on_tritonserver_coalesces_owns_ids_and_stops(front_server, speech_bytes):
    """Item 7 on Triton 2.51 itself (BLS from the front's threads, decoupled both ways, the ensemble's final flag):
    a stream of 48 tokens at 300/s arrives in far fewer responses, the first token alone, and joins to the whole
    answer; a duplicate id in flight is refused; a cancel stops the stream in the decoder behind the front."""
    import threading

    from af3trt.runtime.client.library import AF3Client, AF3Error

    client = AF3Client(front_server.grpc_url, timeout=120)
    whole = client.ask("Say something.", [speech_bytes], max_tokens=48, ignore_eos=True, stream=False)
    streamed = client.ask("Say something.", [speech_bytes], max_tokens=48, ignore_eos=True, stream=True)
    assert streamed.token_ids == whole.token_ids and len(whole.token_ids) == 48
    assert 2 <= streamed.chunks <= 12  # 48 tokens in 160 ms at 50 ms: a handful, not 48
    first = next(iter(client.stream("Say something.", [speech_bytes], max_tokens=4, ignore_eos=True)))
    assert len(first.token_ids) == 1  # the first token alone

    long = client.stream("Say something.", [speech_bytes], max_tokens=64, ignore_eos=True, request_id="same-id")
    next(iter(long))  # in flight
    with pytest.raises(AF3Error, match="already in flight"):
        client.ask("Say something.", [speech_bytes], max_tokens=2, request_id="same-id", stream=False)
    got = []
    done = threading.Event()

    def drain():
        for c in long:
            got.append(c)
        done.set()

    threading.Thread(target=drain, daemon=True).start()
    assert done.wait(60)
    # after it ended, the id is free again
    assert client.ask("Say something.", [speech_bytes], max_tokens=2, request_id="same-id", stream=False).token_ids
