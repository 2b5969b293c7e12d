"""Both rendered repositories (CPU and GPU targets), read back through Triton's model_config protobuf and checked
against the tensor contract of every model they connect, and the GPU decoder against TensorRT-LLM 1.2's
`tensorrtllm` backend contract (triton_backend/all_models/inflight_batcher_llm/tensorrt_llm/config.pbtxt and the
parameters its model_instance_state.cc reads)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
from tritonclient.grpc import model_config_pb2 as mc

from af3trt.build.gpu_repo import (EXECUTOR_WORKER_PATH, GpuRepoError, TrtllmOptions, decoder_parameters,
                                   gpu_repo_spec, read_decoder_engine, render_gpu_repository)
from af3trt.build.repository import render_repository
from af3trt.build.trt_encoder import encoder_engine_plan
from af3trt.runtime.stages import audio_cache, contract, lengths
from af3trt.runtime.stages.prompt import table_extra_ids
from af3trt.triton_repo import configs

from fakes import pb_utils as fake_pb
from helpers import engine_config, gpu_spec, rendered, write_engine

T = mc.DataType


# TensorRT-LLM 1.2 tensorrt_llm/config.pbtxt: name → (dtype, dims, reshape (None: none), optional, allow_ragged_batch).
# "ENGINE" stands for ${prompt_embedding_table_data_type}, the engine's dtype.
TRTLLM_INPUTS = {
    "input_ids": (T.TYPE_INT32, [-1], None, True, True),
    "input_lengths": (T.TYPE_INT32, [1], [], False, False),
    "request_output_len": (T.TYPE_INT32, [1], [], False, False),
    "end_id": (T.TYPE_INT32, [1], [], True, False),
    "pad_id": (T.TYPE_INT32, [1], [], True, False),
    "stop_words_list": (T.TYPE_INT32, [2, -1], None, True, True),
    "bad_words_list": (T.TYPE_INT32, [2, -1], None, True, True),
    "beam_width": (T.TYPE_INT32, [1], [], True, False),
    "temperature": (T.TYPE_FP32, [1], [], True, False),
    "runtime_top_k": (T.TYPE_INT32, [1], [], True, False),
    "runtime_top_p": (T.TYPE_FP32, [1], [], True, False),
    "repetition_penalty": (T.TYPE_FP32, [1], [], True, False),
    "min_tokens": (T.TYPE_INT32, [1], [], True, False),
    "presence_penalty": (T.TYPE_FP32, [1], [], True, False),
    "frequency_penalty": (T.TYPE_FP32, [1], [], True, False),
    "seed": (T.TYPE_UINT64, [1], [], True, False),
    "return_log_probs": (T.TYPE_BOOL, [1], [], True, False),
    "return_num_output_tokens": (T.TYPE_BOOL, [1], [], True, False),
    "exclude_input_in_output": (T.TYPE_BOOL, [1], [], True, False),
    "streaming": (T.TYPE_BOOL, [1], [], True, False),
    "stop": (T.TYPE_BOOL, [1], [], True, False),  # the cancel path's stop request (runtime/triton/trtllm_stop.py)
    "prompt_embedding_table": ("ENGINE", [-1, -1], None, True, True),
    "prompt_table_extra_ids": (T.TYPE_UINT64, [-1], None, True, True),
    "prompt_vocab_size": (T.TYPE_INT32, [1], [], True, False),
    # the LoRA task (thinking): "lora_task_id" TYPE_UINT64 dims [1] reshape [] optional (same file, NVIDIA/TensorRT-LLM
    # triton_backend/all_models/inflight_batcher_llm/tensorrt_llm/config.pbtxt at 0c8de69a)
    "lora_task_id": (T.TYPE_UINT64, [1], [], True, False),
    # guided decoding: TYPE_STRING dims [1] optional allow_ragged_batch, no reshape (same file at 0c8de69a)
    "guided_decoding_guide_type": (T.TYPE_STRING, [1], None, True, True),
    "guided_decoding_guide": (T.TYPE_STRING, [1], None, True, True),
    # the adapter with a request (the decoder front sends it to a bf16 engine): "lora_weights" [-1, -1] optional ragged,
    # TYPE_FP16 in upstream's file but the engine's dtype in ours (TensorRT-LLM refuses other weights: loraUtils.cpp),
    # "lora_config" TYPE_INT32 [-1, 3] optional ragged (same file)
    "lora_weights": ("ENGINE", [-1, -1], None, True, True),
    "lora_config": (T.TYPE_INT32, [-1, 3], None, True, True),
}
TRTLLM_OUTPUTS = {
    "output_ids": (T.TYPE_INT32, [-1, -1]), "sequence_length": (T.TYPE_INT32, [-1]),
    "cum_log_probs": (T.TYPE_FP32, [-1]), "output_log_probs": (T.TYPE_FP32, [-1, -1]),
    "num_input_tokens": (T.TYPE_INT32, [1]), "num_output_tokens": (T.TYPE_INT32, [1]),
    "first_token_time_ns": (T.TYPE_INT64, [1]),
}
# Parameters the 1.2 backend reads without a default: a config without them does not load.
TRTLLM_REQUIRED_PARAMS = ("gpt_model_type", "tokenizer_dir", "xgrammar_tokenizer_info_path", "guided_decoding_backend")
BACKEND_BOOLS = ("True", "true", "TRUE", "1", "False", "false", "FALSE", "0")  # ModelState::GetParameter<bool>


def cpu_spec(checkpoint, limits) -> configs.RepoSpec:  # what build_engines.build_cpu renders
    return configs.RepoSpec(
        target="cpu", hidden_size=checkpoint.text_hidden_size, decoder_dtype="float32",
        vocab_size=checkpoint.vocab_size, end_id=checkpoint.end_id, pad_id=checkpoint.pad_id,
        max_batch_size=limits.max_batch_size, max_audio_windows=limits.max_audio_windows,
        max_input_len=limits.max_input_len, max_output_len=limits.max_output_len,
        default_max_tokens=limits.served_default_max_tokens,
        encoder_params={"onnx_path": "artifacts/encoder.onnx"}, decoder_params={"gpt_model_path": "artifacts/lm"},
        fusion_params={"tokenizer_dir": "artifacts/lm"}, postprocess_params={"tokenizer_dir": "artifacts/lm"},
        prompt_table_extra_ids=True)


def full_shape(cfg: mc.ModelConfig, t) -> list[int]:
    """The tensor's shape as Triton passes it between models: batching models prepend the batch dimension."""
    return ([-1] if cfg.max_batch_size > 0 else []) + list(t.dims)


def compatible(a: list[int], b: list[int]) -> bool:
    return len(a) == len(b) and all(x == y or -1 in (x, y) for x, y in zip(a, b))


def check_repository(cfgs: dict[str, mc.ModelConfig]) -> None:
    ens = cfgs["af3"]
    assert ens.platform == "ensemble" and ens.max_batch_size == 0
    produced = {i.name: (ens, i) for i in ens.input}  # ensemble tensor → (producer config, its io)
    for step in ens.ensemble_scheduling.step:
        model = cfgs[step.model_name]
        ins, outs = {i.name: i for i in model.input}, {o.name: o for o in model.output}
        for model_in, tensor in step.input_map.items():
            assert model_in in ins, f"{step.model_name} has no input {model_in}"
            assert tensor in produced, f"{tensor} is used by {step.model_name} before any step produces it"
            src_cfg, src = produced[tensor]
            dst = ins[model_in]
            assert src.data_type == dst.data_type, (step.model_name, model_in)
            assert compatible(full_shape(src_cfg, src), full_shape(model, dst)), \
                (step.model_name, model_in, full_shape(src_cfg, src), full_shape(model, dst))
        missing = [n for n, i in ins.items() if not i.optional and n not in step.input_map]
        assert not missing, f"{step.model_name}: required inputs {missing} are not fed"
        for model_out, tensor in step.output_map.items():
            assert model_out in outs, f"{step.model_name} has no output {model_out}"
            assert tensor not in produced, f"{tensor} is produced twice"
            produced[tensor] = (model, outs[model_out])
    for o in ens.output:
        src_cfg, src = produced[o.name]
        assert src.data_type == o.data_type and compatible(full_shape(src_cfg, src), list(o.dims)), o.name
    consumed = {t for s in ens.ensemble_scheduling.step for t in s.input_map.values()}
    assert {i.name for i in ens.input} <= consumed  # every request input reaches a model

    for name, cfg in cfgs.items():
        if name == "af3":
            continue
        assert cfg.model_transaction_policy.decoupled == (name in ("decoder", "decoder_front")), name
        # every stage but postprocess has a scheduler queue (bounded by the queue policy; see test_reliability);
        # the cancel side channel has none either: a cancellation is never rejected as overload
        assert cfg.HasField("dynamic_batching") == (name not in ("postprocess", "cancel")), name
        for i in cfg.input:
            if i.HasField("reshape"):  # [1] scalars reshaped to []
                assert math.prod(i.dims) == math.prod(i.reshape.shape) and list(i.dims) == [1], (name, i.name)
    # one request's windows fit in one encoder execution: a batching encoder's batch, or whole requests (0)
    enc_batch = cfgs["encoder"].max_batch_size
    assert enc_batch == 0 or enc_batch >= int(cfgs["preprocess"].parameters["max_audio_windows"].string_value)

    request = {i.name: i for i in ens.input}
    assert request["messages"].data_type == mc.TYPE_STRING and list(request["messages"].dims) == [1]
    assert all(i.optional for i in request.values())  # text_input or messages: fusion says which is missing


def check_decoder_contract(dec: mc.ModelConfig, engine_dtype: int) -> None:
    """Every tensor our decoder declares is the 1.2 backend's, with its dtype, dims, reshape and flags."""
    for i in dec.input:
        assert i.name in TRTLLM_INPUTS, f"{i.name} is not a tensorrtllm input"
        dtype, dims, reshape, optional, ragged = TRTLLM_INPUTS[i.name]
        assert i.data_type == (engine_dtype if dtype == "ENGINE" else dtype), i.name
        assert list(i.dims) == dims and i.optional == optional and i.allow_ragged_batch == ragged, i.name
        assert (list(i.reshape.shape) if i.HasField("reshape") else None) == reshape, i.name
    required = {n for n, v in TRTLLM_INPUTS.items() if not v[3]}
    assert required <= {i.name for i in dec.input}
    for o in dec.output:
        assert o.name in TRTLLM_OUTPUTS and (o.data_type, list(o.dims)) == TRTLLM_OUTPUTS[o.name], o.name
    assert dec.model_transaction_policy.decoupled  # streaming needs it


# ---------------------------------------------------------------------------------------------------------------

def test_cpu_repository_contracts(checkpoint, limits, tmp_path):
    render_repository(tmp_path / "repo", cpu_spec(checkpoint, limits))
    cfgs = rendered(tmp_path / "repo")
    check_repository(cfgs)
    check_decoder_contract(cfgs["decoder"], T.TYPE_FP32)
    assert cfgs["encoder"].backend == "python" and cfgs["decoder"].backend == "python"
    assert (tmp_path / "repo" / "encoder" / "1" / "model.py").is_file()
    # fusion sends prompt_table_extra_ids on the CPU target too: the CPU decoder's KV reuse is keyed by them
    assert "prompt_table_extra_ids" in {o.name for o in cfgs["fusion"].output}
    assert cfgs["fusion"].parameters["prompt_table_extra_ids"].string_value == "true"
    assert cfgs["preprocess"].parameters["gpu_kernels"].string_value == "false"
    assert cfgs["fusion"].parameters["gpu_kernels"].string_value == "false"


@pytest.mark.parametrize("batching", [None, True, False])
def test_cpu_encoder_batching_defaults_off_and_keeps_its_queue_bounded(checkpoint, limits, tmp_path, batching):
    """Encoder batching is off on CPU unless the build asks (triton_repo/configs.py ENCODER_BATCHING: measured
    slower there): then a request is one execution (max_batch_size 0, the window axis in each tensor) and the queue
    policy still bounds the encoder's queue; on: Triton batches windows (max_batch_size, queue delay)."""
    from dataclasses import replace

    spec = replace(cpu_spec(checkpoint, limits), encoder_batching=batching)
    render_repository(tmp_path / "repo", spec)
    cfgs = rendered(tmp_path / "repo")
    check_repository(cfgs)
    enc = cfgs["encoder"]
    policy = enc.dynamic_batching.default_queue_policy
    assert policy.max_queue_size == spec.max_queue_size and policy.timeout_action == mc.ModelQueuePolicy.REJECT
    if batching:
        assert enc.max_batch_size == spec.encoder_max_batch
        assert enc.dynamic_batching.max_queue_delay_microseconds == spec.encoder_queue_delay_us
        assert [list(i.dims) for i in enc.input][:2] == [[128, -1], [-1]]
    else:
        assert enc.max_batch_size == 0 and enc.dynamic_batching.max_queue_delay_microseconds == 0
        assert [list(i.dims) for i in enc.input][:2] == [[-1, 128, -1], [-1, -1]]
        assert [list(o.dims) for o in enc.output] == [[-1, -1, checkpoint.text_hidden_size]]
    gpu = configs.encoder_config(replace(spec, target="gpu", encoder_params={}))  # the CPU encoder's own are not the GPU's
    assert gpu.max_batch_size == spec.encoder_max_batch and gpu.HasField("dynamic_batching") == (batching is not False)


@pytest.mark.parametrize("dtype, triton_dtype", [("bfloat16", T.TYPE_BF16), ("float16", T.TYPE_FP16),
                                                 ("float32", T.TYPE_FP32)])
def test_gpu_repository_contracts(checkpoint, limits, tmp_path, dtype, triton_dtype):
    spec, engine_dir = gpu_spec(checkpoint, limits, tmp_path, dtype)
    plan = tmp_path / "encoder.plan"
    plan.write_bytes(b"PLAN")
    out = render_gpu_repository(tmp_path / "repo", spec, encoder_plan=plan)
    cfgs = rendered(tmp_path / "repo")
    check_repository(cfgs)

    dec = cfgs["decoder"]
    check_decoder_contract(dec, triton_dtype)
    assert dec.backend == "tensorrtllm" and not dec.platform and dec.max_batch_size == limits.max_batch_size
    assert [(g.kind, g.count) for g in dec.instance_group] == [(mc.ModelInstanceGroup.KIND_CPU, 1)]
    table = {i.name: i for i in dec.input}["prompt_embedding_table"]
    assert table.data_type == triton_dtype  # the engine's dtype, end to end
    assert {o.name: o for o in cfgs["fusion"].output}["prompt_embedding_table"].data_type == triton_dtype
    assert cfgs["fusion"].parameters["dtype"].string_value == dtype
    assert int(cfgs["fusion"].parameters["vocab_size"].string_value) == checkpoint.vocab_size + 8  # engine's

    enc = cfgs["encoder"]
    # a python model runs the plan: the 26.04 trtllm container has no TensorRT backend (test_gpu_encoder.py)
    assert enc.backend == "python" and not enc.platform and enc.parameters["plan_file"].string_value == "model.plan"
    assert enc.parameters["FORCE_CPU_ONLY_INPUT_TENSORS"].string_value == "no"
    # pinned to GPU 0, the ensemble's: without `gpus` Triton puts an instance on every visible GPU (server r26.04
    # docs/user_guide/model_configuration.md, Instance Groups), outside the memory plan under TP 2 / --gpus all
    assert [(g.kind, list(g.gpus)) for g in enc.instance_group] == [(mc.ModelInstanceGroup.KIND_GPU, [0])]
    assert "gpus: 0" in configs.render(enc)
    assert enc.max_batch_size == encoder_engine_plan(max_windows=spec.encoder_max_batch).max_windows \
        == limits.max_batch_size * limits.max_audio_windows  # Triton batches what the engine profile takes
    assert (tmp_path / "repo" / "encoder" / "1" / "model.plan").read_bytes() == b"PLAN" and not plan.exists()
    assert sorted(p.name for p in (tmp_path / "repo" / "encoder" / "1").iterdir()) == ["model.plan", "model.py"]
    assert "TrtRunner" in (tmp_path / "repo" / "encoder" / "1" / "model.py").read_text()
    assert out["encoder_plan"] == str(tmp_path / "repo" / "encoder" / "1" / "model.plan")
    # [W, 128, T] with T dynamic (the request's frame bucket), as the engine profile ranges over T
    assert [(i.name, i.data_type, list(i.dims)) for i in enc.input] == [
        ("input_features", T.TYPE_FP32, [lengths.N_MELS, -1]), ("input_features_mask", T.TYPE_INT32, [-1]),
        ("window_thinking", T.TYPE_BOOL, [1]),  # per window: think/'s encoder variant
        ("audio_digest", T.TYPE_UINT64, [2])]  # each window's key (runtime/stages/audio_cache.py), optional
    assert [(o.name, o.data_type, list(o.dims)) for o in enc.output] == [
        ("audio_embeds", T.TYPE_FP32, [-1, checkpoint.text_hidden_size])]
    assert not any(i.allow_ragged_batch for i in enc.input)  # Triton batches equal T only: per-bucket batching

    p = {k: v.string_value for k, v in dec.parameters.items()}
    for k in TRTLLM_REQUIRED_PARAMS:
        assert k in p, k
    assert p["gpt_model_type"] == "inflight_fused_batching" and p["gpt_model_path"] == str(engine_dir.resolve())
    assert Path(p["gpt_model_path"]).is_absolute()
    assert (p["max_beam_width"], p["kv_cache_free_gpu_mem_fraction"], p["batch_scheduler_policy"]) == \
        ("1", "0.9", "guaranteed_no_evict")
    assert (p["enable_kv_cache_reuse"], p["enable_chunked_context"], p["exclude_input_in_output"]) == \
        ("true", "true", "true")
    assert p["executor_worker_path"] == EXECUTOR_WORKER_PATH and p["FORCE_CPU_ONLY_INPUT_TENSORS"] == "no"
    assert int(p["cancellation_check_period_ms"]) > 0 and "max_tokens_in_paged_kv_cache" not in p
    assert p["guided_decoding_backend"] == "" and p["xgrammar_tokenizer_info_path"] == ""  # guided decoding off
    for k in ("enable_kv_cache_reuse", "enable_chunked_context", "exclude_input_in_output"):
        assert p[k] in BACKEND_BOOLS

    # KV-cache reuse on: fusion sends the extra ids and the ensemble carries them to the decoder
    assert {o.name: o for o in cfgs["fusion"].output}["prompt_table_extra_ids"].data_type == T.TYPE_UINT64
    assert cfgs["fusion"].parameters["prompt_table_extra_ids"].string_value == "true"
    dec_step = next(s for s in cfgs["af3"].ensemble_scheduling.step if s.model_name == "decoder_front")
    assert dec_step.input_map["prompt_table_extra_ids"] == "_prompt_table_extra_ids"

    # GPU preprocessing kernels on (af3trt.kernels): log-mel and prompt table on the device, fusion inputs left there
    assert cfgs["preprocess"].parameters["gpu_kernels"].string_value == "true"
    assert cfgs["fusion"].parameters["gpu_kernels"].string_value == "true"
    assert cfgs["fusion"].parameters["FORCE_CPU_ONLY_INPUT_TENSORS"].string_value == "no"


def test_gpu_repository_without_kv_reuse(checkpoint, limits, tmp_path):
    opts = TrtllmOptions(enable_kv_cache_reuse=False, enable_chunked_context=False, max_tokens_in_paged_kv_cache=65536,
                         kv_cache_free_gpu_mem_fraction=0.8)
    spec, _ = gpu_spec(checkpoint, limits, tmp_path, options=opts)
    assert not spec.prompt_table_extra_ids
    cfgs = {n: configs.parse(configs.render(c)) for n, c in configs.all_configs(spec).items()}
    check_repository(cfgs)
    p = {k: v.string_value for k, v in cfgs["decoder"].parameters.items()}
    assert (p["enable_kv_cache_reuse"], p["max_tokens_in_paged_kv_cache"], p["kv_cache_free_gpu_mem_fraction"]) == \
        ("false", "65536", "0.8")
    assert "prompt_table_extra_ids" not in {o.name for o in cfgs["fusion"].output}
    dec_step = next(s for s in cfgs["af3"].ensemble_scheduling.step if s.model_name == "decoder_front")
    assert "prompt_table_extra_ids" not in dec_step.input_map


def test_kv_reuse_without_extra_ids_is_refused(checkpoint, limits, tmp_path):
    spec, _ = gpu_spec(checkpoint, limits, tmp_path)
    for params in (spec.decoder_params, {k: v for k, v in spec.decoder_params.items() if k != "enable_kv_cache_reuse"}):
        bad = dataclasses.replace(spec, prompt_table_extra_ids=False, decoder_params=params)  # absent = backend's true
        with pytest.raises(ValueError, match="prompt_table_extra_ids"):
            configs.decoder_config(bad)


@pytest.mark.parametrize("engine_kw, options, match", [
    (dict(max_input_len=1000), TrtllmOptions(), "max_input_len 1000"),
    (dict(max_seq_len=15550), TrtllmOptions(), "max_seq_len 15550 < 15576"),
    (dict(mbs=2), TrtllmOptions(), "max_batch_size 2"),
    (dict(table=15000), TrtllmOptions(), "max_prompt_embedding_table_size 15000 < 60000"),
    (dict(paged_context_fmha=False), TrtllmOptions(), "use_paged_context_fmha"),
])
def test_engine_that_cannot_serve_the_limits_is_refused(checkpoint, limits, tmp_path, engine_kw, options, match):
    with pytest.raises(GpuRepoError, match=match):
        gpu_spec(checkpoint, limits, tmp_path, options=options, **engine_kw)


def test_paged_context_off_is_fine_without_reuse_and_chunking(checkpoint, limits, tmp_path):
    spec, _ = gpu_spec(checkpoint, limits, tmp_path, paged_context_fmha=False,
                       options=TrtllmOptions(enable_kv_cache_reuse=False, enable_chunked_context=False))
    assert spec.decoder_params["enable_chunked_context"] == "false"


def test_engine_info_and_parameter_errors(checkpoint, limits, tmp_path):
    ckpt = write_engine(tmp_path / "ckpt", {"architecture": "Qwen2ForCausalLM", "dtype": "bfloat16",
                                            "vocab_size": 151672, "hidden_size": 3584})
    info = read_decoder_engine(ckpt)  # a TensorRT-LLM checkpoint: no build limits yet
    assert (info.dtype, info.vocab_size, info.hidden_size, info.max_input_len) == ("bfloat16", 151672, 3584, None)
    with pytest.raises(GpuRepoError, match="no config.json"):
        read_decoder_engine(tmp_path / "nowhere")
    write_engine(tmp_path / "bad", {"dtype": "int8", "vocab_size": 1, "hidden_size": 1})
    with pytest.raises(GpuRepoError, match="dtype 'int8'"):
        read_decoder_engine(tmp_path / "bad")
    with pytest.raises(GpuRepoError, match="absolute"):
        decoder_parameters("engines/decoder", TrtllmOptions())
    for bad in (TrtllmOptions(batch_scheduler_policy="fifo"), TrtllmOptions(kv_cache_free_gpu_mem_fraction=1.5),
                TrtllmOptions(gpt_model_type="v2"), TrtllmOptions(executor_worker_path="trtllmExecutorWorker")):
        with pytest.raises(GpuRepoError):
            decoder_parameters("/engines/decoder", bad)
    wide = write_engine(tmp_path / "wide", engine_config("bfloat16", vocab=checkpoint.vocab_size, hidden=128))
    with pytest.raises(GpuRepoError, match="hidden_size 128 != checkpoint 64"):
        gpu_repo_spec(checkpoint, limits, engine_dir=wide, tokenizer_dir="t", encoder_max_windows=80)
    engine_dir = write_engine(tmp_path / "e", engine_config("bfloat16", vocab=checkpoint.vocab_size,
                                                            hidden=checkpoint.text_hidden_size))
    with pytest.raises(GpuRepoError, match="at most 4 windows"):
        gpu_repo_spec(checkpoint, limits, engine_dir=engine_dir, tokenizer_dir="t", encoder_max_windows=4)
    spec = gpu_repo_spec(checkpoint, limits, engine_dir=engine_dir, tokenizer_dir="t", encoder_max_windows=20,
                         engine_dir_at_serve="/models/engine")
    assert spec.decoder_params["gpt_model_path"] == "/models/engine"


# ---------------------------------------------------------------------------------------------------------------
# prompt_table_extra_ids: what fusion sends when KV-cache reuse is on

def test_table_extra_ids_semantics():
    vocab = 100
    a = audio_cache.window_keys(audio_cache.audio_digest([b"clip a"]), 2)  # [2, 2] u64: two windows
    ids = np.array([1, 2, 100, 101, 102, 103, 104, 7, 8], np.int32)  # rows 0-2 from window 0, 3-4 from window 1
    x = table_extra_ids(ids, a, vocab, [3, 2])
    assert x.dtype == np.uint64 and x.shape == ids.shape
    assert (x[ids < vocab] == 0).all()  # text tokens
    assert len(set(x[2:5].tolist())) == 1 and len(set(x[5:7].tolist())) == 1 and x[2] != x[5] >= 1  # one per window
    again = audio_cache.window_keys(audio_cache.audio_digest([b"clip a"]), 2)
    assert (table_extra_ids(ids, again, vocab, [3, 2]) == x).all()  # same audio → same ids: the KV cache is shared
    b = audio_cache.window_keys(audio_cache.audio_digest([b"clip b"]), 2)
    assert table_extra_ids(ids, b, vocab, [3, 2])[2] != x[2]  # different audio → different id: never shared
    # a prompt whose audio starts with the same window shares its ids (prefix reuse); the same window at another
    # first row does not (its rows are other fake ids' embeddings)
    assert table_extra_ids(ids[:5], np.stack([a[0], b[1]]), vocab, [3, 2])[2:5].tolist() == x[2:5].tolist()
    assert table_extra_ids(ids, np.stack([b[0], a[0]]), vocab, [3, 3])[5] != x[2]
    assert table_extra_ids(np.array([1, 2], np.int32), a, vocab, [3, 2]).tolist() == [0, 0]  # text-only


@pytest.fixture(scope="module")
def fusion_models(tiny_ckpt, checkpoint, limits, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fusion")
    spec, _ = gpu_spec(checkpoint, limits, tmp, "bfloat16")
    spec = dataclasses.replace(spec, fusion_params={"tokenizer_dir": str(tiny_ckpt)})
    off = dataclasses.replace(spec, prompt_table_extra_ids=False)
    return [(s, fake_pb.load_model("fusion", configs.fusion_config(s))) for s in (spec, off)]


def _fusion_request(embeds, batch, windows, clip=b"clip"):
    return fake_pb.Request({"text_input": np.array([b"What is said?"], object), "audio_embeds": embeds,
                            "input_features_mask": batch.mask, "audio_windows": np.array(windows, np.int32),
                            "audio_digest": audio_cache.window_keys(audio_cache.audio_digest([clip]), sum(windows))})


def test_fusion_sends_extra_ids_with_kv_reuse(fusion_models, speech_bytes):
    from af3trt.runtime.stages.audio import prepare_clips

    (spec, model), (_, model_off) = fusion_models
    batch = prepare_clips([speech_bytes])
    rng = np.random.default_rng(1)
    e1 = rng.standard_normal((1, 750, spec.hidden_size)).astype(np.float32)
    e2 = rng.standard_normal((1, 750, spec.hidden_size)).astype(np.float32)
    r1, r1_again, r2 = model.execute([_fusion_request(e1, batch, [1]), _fusion_request(e1, batch, [1]),
                                      _fusion_request(e2, batch, [1], clip=b"another clip")])
    declared = {o.name for o in configs.fusion_config(spec).output} - set(contract.FUSION_PER_REQUEST)
    for r in (r1, r1_again, r2):
        assert not r.has_error(), r.error
        assert set(r.outputs) == declared
    ids = r1.outputs["input_ids"].as_numpy()[0]
    x1 = r1.outputs["prompt_table_extra_ids"].as_numpy()
    assert x1.dtype == np.uint64 and x1.shape == (1, len(ids))  # one per input token
    fake = ids >= spec.vocab_size
    assert fake.sum() == batch.tokens_per_clip[0]
    assert (x1[0, ~fake] == 0).all() and len(set(x1[0, fake].tolist())) == 1 and x1[0, fake][0] >= 1
    assert (r1_again.outputs["prompt_table_extra_ids"].as_numpy() == x1).all()
    assert r2.outputs["prompt_table_extra_ids"].as_numpy()[0, fake][0] != x1[0, fake][0]

    text_only = fake_pb.Request({"text_input": np.array([b"Hello"], object),
                                 "audio_embeds": np.zeros((1, 750, spec.hidden_size), np.float32),
                                 "input_features_mask": np.zeros((1, 3000), np.int32),
                                 "audio_windows": np.zeros((0,), np.int32),
                                 "audio_digest": audio_cache.window_keys(audio_cache.audio_digest([]), 1)})
    (rt,) = model.execute([text_only])
    assert not rt.has_error() and (rt.outputs["prompt_table_extra_ids"].as_numpy() == 0).all()

    (r_off,) = model_off.execute([_fusion_request(e1, batch, [1])])
    assert "prompt_table_extra_ids" not in r_off.outputs
