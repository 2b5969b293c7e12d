"""`build_engines.py --target gpu` end to end without a GPU: everything that runs anywhere runs for real
(ONNX export and cast, LM extraction, modelopt TRT-LLM checkpoint, CPU accuracy report); the two engine builders
are stand-ins (a fake `tensorrt` module and a fake `trtllm-build` on PATH) so the orchestration, the engine
build commands and the rendered repository are checked against their contracts."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from af3trt.build.build_engines import BuildError, BuildOptions, build, main
from af3trt.build.plan import CheckpointFacts, GpuOptions, ServingConfig
from af3trt.triton_repo import configs

from fakes import tensorrt as fake_tensorrt
from fakes import trtllm_build

# trtllm-build stand-in: tests/fakes/trtllm_build.py (reproduces the 1.2 builder's plugin_config, sources there)


@pytest.fixture
def fake_gpu_tools(monkeypatch, tmp_path):
    trt = fake_tensorrt.fresh()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    trtllm_build.install(bindir, sys.executable)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    return trt


@pytest.mark.slow
def test_full_gpu_build_renders_the_gpu_ensemble(tiny_ckpt, tmp_path, fake_gpu_tools):
    out = tmp_path / "gpu"
    build(BuildOptions(hf_model=tiny_ckpt, out=out, target="gpu",
                       gpu=GpuOptions(precision="fp8", kv_cache="fp8", gpu="h100", encoder_precision="fp16"),
                       serving=ServingConfig(max_batch_size=4, max_audio_seconds=60, max_text_len=256,
                                             max_output_len=64)))
    repo = out / "model_repository"
    enc = configs.parse((repo / "encoder" / "config.pbtxt").read_text())
    dec = configs.parse((repo / "decoder" / "config.pbtxt").read_text())
    # the encoder takes what the decoder can take per iteration: max_num_tokens 1759 (= 256 + 2 x 750 + 3) -> 3
    # windows, at least one request's 2 windows (build/memory_plan.encoder_profile_windows), not 4 x 2
    assert enc.backend == "python" and enc.max_batch_size == 3
    assert (repo / "encoder" / "1" / "model.plan").read_bytes() == fake_gpu_tools.built_plans[-1]
    assert dec.backend == "tensorrtllm" and dec.model_transaction_policy.decoupled
    assert dec.parameters["gpt_model_path"].string_value == str(out / "artifacts" / "engine")  # where it ends up
    assert (out / "artifacts" / "engine" / "rank0.engine").exists()
    ckpt_cfg = json.loads((out / "artifacts" / "trtllm_checkpoint" / "config.json").read_text())
    table = next(i for i in dec.input if i.name == "prompt_embedding_table")
    assert configs.mc.DataType.Name(table.data_type) == configs.mc.DataType.Name(configs.DTYPES[ckpt_cfg["dtype"]])
    fusion = configs.parse((repo / "fusion" / "config.pbtxt").read_text())
    assert fusion.parameters["vocab_size"].string_value == str(ckpt_cfg["vocab_size"])  # the engine's vocab
    assert ckpt_cfg["rotary_base"] == 1e6 and ckpt_cfg["quantization"]["quant_algo"] == "FP8"
    # the memory plan's stub caps reach the stubs (build/memory_plan.py stub_caps, runtime/engines/gpus.py cap_cuda_memory)
    caps = json.loads((out / "manifest.json").read_text())["gpu"]["memory_plan"]["stub_caps"]
    for model, cfg in (("encoder", enc), ("fusion", fusion),
                       ("preprocess", configs.parse((repo / "preprocess" / "config.pbtxt").read_text()))):
        assert cfg.parameters["cuda_memory_cap_bytes"].string_value == str(caps[model]), model
    # the encoder's audio cache is the plan's, inside its cap (round 3, item 3); the ensemble's decoder step is the
    # decoder front, coalescing at the build's stream interval (item 7)
    plan_d = json.loads((out / "manifest.json").read_text())["gpu"]["memory_plan"]
    assert enc.parameters["cache_bytes"].string_value == str(plan_d["encoder_cache"])
    assert plan_d["encoder_cache"] == 2 * 750 * 64 * 4 and caps["encoder"] > plan_d["encoder_cache"]
    front = configs.parse((repo / "decoder_front" / "config.pbtxt").read_text())
    assert front.parameters["stream_interval_ms"].string_value == "50"
    steps = [s.model_name for s in configs.parse((repo / "af3" / "config.pbtxt").read_text()).ensemble_scheduling.step]
    assert steps == ["preprocess", "encoder", "fusion", "decoder_front", "postprocess"]

    argv = json.loads((out / "artifacts" / "engine" / "argv.json").read_text())
    assert argv[argv.index("--max_prompt_embedding_table_size") + 1] == str(4 * 2 * 750)
    assert argv[argv.index("--max_input_len") + 1] == str(256 + 2 * 750)
    assert argv[argv.index("--use_fp8_context_fmha") + 1] == "enable"

    m = json.loads((out / "manifest.json").read_text())
    assert m["target"] == "gpu" and m["precisions"]["decoder"] == "fp8" and m["precisions"]["kv_cache"] == "fp8"
    acc = m["validation"]["decoder_accuracy"]
    assert 0 <= acc["token_agreement"] <= 1 and acc["mean_kl"] >= 0
    # fake-quantized FP8 moves the logits beyond the bf16 cast alone (measured on this checkpoint: cast 0.0014, fp8
    # 0.13 mean KL, 96 positions, 54 % greedy agreement), and the greedy tokens still mostly agree
    assert acc["mean_kl"] > 0.01 and acc["token_agreement"] >= 0.4
    assert m["validation"]["encoder_engine_onnx"]["validation"]["cosine"] > 0.999
    assert m["encoder_engine"]["engine_plan"]["max_windows"] == 3
    plan = m["gpu"]["memory_plan"]
    assert plan["encoder_windows"] == 3 and plan["fits"] and plan["gpu"] == "NVIDIA H100 80GB HBM3"
    assert plan["kv_cache_tokens"] == 4 * -(-int(argv[argv.index("--max_seq_len") + 1]) // 32) * 32
    assert dec.parameters["max_tokens_in_paged_kv_cache"].string_value == str(plan["kv_cache_tokens"])
    names = [c[0] for c in fake_gpu_tools.calls]
    assert "build_serialized_network" in names and "set_flag" not in names
    # guided decoding (build/trtllm_guided.py): the tokenizer info file beside the engine, the backend turned on,
    # fusion compiling guides first
    info = out / "artifacts" / "engine" / "xgrammar_tokenizer_info.json"
    assert dec.parameters["guided_decoding_backend"].string_value == "xgrammar"
    assert dec.parameters["xgrammar_tokenizer_info_path"].string_value == str(info) and info.is_file()
    assert fusion.parameters["guide_check"].string_value == "true"
    assert m["gpu"]["guided_decoding"]["stop_token_ids"] == json.loads(info.read_text())["stop_token_ids"]


@pytest.mark.slow
def test_prepare_only_writes_the_engine_plan(tiny_ckpt, tmp_path):
    out = tmp_path / "prep"
    main(["--hf-model", str(tiny_ckpt), "--out", str(out), "--target", "gpu", "--precision", "int8_wo",
          "--gpu", "a100", "--prepare-only", "--no-accuracy-report", "--max-audio-seconds", "30"])
    plan = json.loads((out / "artifacts" / "gpu_build_plan.json").read_text())
    cmd = plan["trtllm_build_command"]
    assert cmd.startswith("trtllm-build --checkpoint_dir " + str(out / "artifacts" / "trtllm_checkpoint"))
    assert ".building-" not in json.dumps(plan)  # paths are the final ones, not the scratch directory's
    # max_num_tokens 1781 (1024 + 750 + 7) -> 3 windows per decoder iteration, not max_batch_size 8 x 1 window
    assert plan["encoder"]["profile"]["max_windows"] == 3
    assert not (out / "model_repository").exists()
    assert plan["encoder"]["onnx"] == "artifacts/encoder.fp16.onnx"
    m = json.loads((out / "manifest.json").read_text())
    assert m["trtllm_checkpoint"]["quant_algo"] == "W8A16" and "decoder_accuracy" not in m["validation"]


@pytest.mark.slow
def test_from_prepared_builds_engines_then_the_repository(tiny_ckpt, tmp_path, fake_gpu_tools):
    """The container flow: prepare with the export environment, build engines where TensorRT lives."""
    out = tmp_path / "prep"
    main(["--hf-model", str(tiny_ckpt), "--out", str(out), "--target", "gpu", "--precision", "bf16",
          "--gpu", "h100", "--prepare-only", "--no-accuracy-report", "--max-audio-seconds", "30"])
    plan = json.loads((out / "artifacts" / "gpu_build_plan.json").read_text())
    main(["--from-prepared", str(out)])
    argv = json.loads((out / "artifacts" / "engine" / "argv.json").read_text())
    assert "trtllm-build " + " ".join(argv) == plan["trtllm_build_command"]  # what the plan said is what ran
    dec = configs.parse((out / "model_repository" / "decoder" / "config.pbtxt").read_text())
    assert dec.backend == "tensorrtllm"
    assert (out / "model_repository" / "encoder" / "1" / "model.plan").exists()
    m = json.loads((out / "manifest.json").read_text())
    assert m["engines_built"]["unix"] > 0 and m["precisions"]["prompt_table"] == "bfloat16"
    with pytest.raises(SystemExit):  # a second run refuses: the repository exists
        main(["--from-prepared", str(out)])


def test_fp8_refused_on_a100_before_any_work(tiny_ckpt, tmp_path):
    with pytest.raises(BuildError, match="SM 8.9"):
        build(BuildOptions(hf_model=tiny_ckpt, out=tmp_path / "x", target="gpu",
                           gpu=GpuOptions(precision="fp8", gpu="a100")))
    assert list(tmp_path.iterdir()) == []


def test_missing_trtllm_build_is_a_clear_error(tiny_ckpt, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt.fresh())
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    with pytest.raises(Exception, match="trtllm-build"):
        build(BuildOptions(hf_model=tiny_ckpt, out=tmp_path / "x", target="gpu",
                           gpu=GpuOptions(precision="bf16", gpu="h100", accuracy_report=False),
                           serving=ServingConfig(max_audio_seconds=30)))
    assert not (tmp_path / "x").exists() and list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ every precision x KV cache x tp size

MATRIX = [(p, kv, tp) for p in ("bf16", "fp16", "fp8", "int8_sq", "int8_wo", "int4_awq")
          for kv in ("auto", "fp8", "int8") for tp in (1, 2)]


@pytest.fixture(scope="module")
def exported_encoder(tiny_ckpt, tmp_path_factory):
    """The fp32 encoder ONNX of the tiny checkpoint, exported once for the matrix: every combination below differs
    only in the decoder, and export_encoder is deterministic, so later builds get a copy of the same files."""
    from af3trt.export.onnx_export import export_encoder

    cache = tmp_path_factory.mktemp("encoder-cache")
    report = export_encoder(tiny_ckpt, cache / "encoder.onnx")
    return cache, report


@pytest.fixture
def reuse_encoder_export(exported_encoder, monkeypatch):
    import shutil

    from af3trt.export import onnx_export

    cache, report = exported_encoder

    def export_copy(hf_dir, out_path, **_):
        out_path = Path(out_path)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        for f in cache.iterdir():
            shutil.copy2(f, out_path.parent / f.name)
        return json.loads(json.dumps(report).replace(str(cache), str(out_path.parent)))

    monkeypatch.setattr(onnx_export, "export_encoder", export_copy)


def _paged_context_fmha(precision: str, kv: str) -> bool:
    """What TensorRT-LLM 1.2's builder.py leaves of --use_paged_context_fmha enable on an SM 9.0 GPU (see
    tests/fakes/trtllm_build.py): off with an INT8 KV cache, and with an FP8 KV cache under non-FP8 weights."""
    return kv != "int8" and not (kv == "fp8" and precision != "fp8")


@pytest.fixture
def short_calibration(monkeypatch):
    """4 calibration prompts instead of the default set (AWQ's search took 5 min per build on 2 shared cores): the
    amount of calibration changes scale values, not the checkpoint's format, which is what the matrix checks."""
    import functools

    from af3trt.export import quantize

    monkeypatch.setattr(quantize, "write_trtllm_checkpoint",
                        functools.partial(quantize.write_trtllm_checkpoint, calib_size=4))


@pytest.mark.slow
@pytest.mark.parametrize("precision,kv,tp", MATRIX, ids=[f"{p}-kv_{k}-tp{t}" for p, k, t in MATRIX])
def test_gpu_build_every_combination(precision, kv, tp, tiny_ckpt, tmp_path, fake_gpu_tools, reuse_encoder_export,
                                     short_calibration):
    """The whole GPU build (real quantization and checkpoint, fake engine builders) for each combination: either it
    completes with backend options the built engine supports, or it is refused before any work, saying why."""
    text = json.loads((tiny_ckpt / "config.json").read_text())["text_config"]
    # weight-only layers are padded to multiples of 64 x tp by trtllm-build (and AWQ groups of 64/128 must divide a
    # rank's widths): the tiny preset's 64-wide layers cannot be split over 2 ranks
    refused = precision in ("int8_wo", "int4_awq") and text["hidden_size"] % (64 * tp) != 0
    out = tmp_path / "gpu"
    opts = BuildOptions(hf_model=tiny_ckpt, out=out, target="gpu",
                        gpu=GpuOptions(precision=precision, kv_cache=kv, tp_size=tp, gpu="h100",
                                       encoder_precision="fp32", accuracy_report=False),
                        serving=ServingConfig(max_batch_size=2, max_audio_seconds=30, max_text_len=64,
                                              max_output_len=16))
    if refused:
        with pytest.raises(BuildError, match=f"cannot work: {precision}.*(padded to multiples of|AWQ group size)"):
            build(opts)
        assert list(tmp_path.iterdir()) == [tmp_path / "bin"]  # nothing was written
        return
    build(opts)
    engine_cfg = json.loads((out / "artifacts" / "engine" / "config.json").read_text())
    paged = engine_cfg["build_config"]["plugin_config"]["use_paged_context_fmha"]
    assert paged == _paged_context_fmha(precision, kv)
    assert sorted(p.name for p in (out / "artifacts" / "engine").glob("rank*.engine")) == \
        [f"rank{r}.engine" for r in range(tp)]
    repo = out / "model_repository"
    dec = configs.parse((repo / "decoder" / "config.pbtxt").read_text())
    fusion = configs.parse((repo / "fusion" / "config.pbtxt").read_text())
    flag = "true" if paged else "false"
    assert dec.parameters["enable_kv_cache_reuse"].string_value == flag
    assert dec.parameters["enable_chunked_context"].string_value == flag
    fusion_sends_extra_ids = any(o.name == "prompt_table_extra_ids" for o in fusion.output)
    assert fusion_sends_extra_ids == paged  # extra ids exactly when reuse is on
    m = json.loads((out / "manifest.json").read_text())
    assert m["gpu"]["backend_options"]["enable_kv_cache_reuse"] is paged
    assert m["gpu"]["memory_plan"]["fits"] and m["gpu"]["memory_plan"]["tp_size"] == tp


def test_chunked_context_without_paged_fmha_is_refused_before_any_work(tiny_ckpt, tmp_path):
    """10-min audio + 2,000 text tokens need chunked context (max_num_tokens is capped at 16,384), which an INT8 KV
    cache rules out (no paged context FMHA): refused with the reason, nothing written."""
    with pytest.raises(BuildError, match="chunked context.*paged context FMHA"):
        build(BuildOptions(hf_model=tiny_ckpt, out=tmp_path / "x", target="gpu",
                           gpu=GpuOptions(precision="int8_wo", kv_cache="int8", gpu="h100"),
                           serving=ServingConfig(max_audio_seconds=600, max_text_len=2000)))
    assert list(tmp_path.iterdir()) == []


def test_backend_options_follow_the_engine(tmp_path):
    """Today's failure: an engine built without paged context FMHA with the default options raised GpuRepoError
    after both engines were built; the options derived from its config.json render."""
    from af3trt.build.gpu_repo import GpuRepoError, backend_options, gpu_repo_spec, read_decoder_engine

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({
        "dtype": "bfloat16", "vocab_size": 1000, "hidden_size": 64, "mapping": {"world_size": 1},
        "quantization": {"quant_algo": None, "kv_cache_quant_algo": "INT8"}}))
    trtllm_build.main(["--checkpoint_dir", str(ckpt), "--output_dir", str(tmp_path / "engine"),
                            "--max_batch_size", "2", "--max_input_len", "800", "--max_seq_len", "900",
                            "--max_num_tokens", "801", "--max_beam_width", "1",
                            "--max_prompt_embedding_table_size", "1500", "--use_paged_context_fmha", "enable"])
    engine = read_decoder_engine(tmp_path / "engine")
    assert engine.paged_context_fmha is False  # the builder turned it off for the INT8 KV cache
    checkpoint = CheckpointFacts(path=ckpt, config={}, text_hidden_size=64, text_layers=1, vocab_size=1000,
                                 audio_hidden_size=32, audio_layers=1, audio_token_id=None, dtype="bfloat16", end_id=1,
                                 eos_ids=[1], pad_id=1)
    limits = ServingConfig(max_batch_size=2, max_audio_seconds=30, max_text_len=50, max_output_len=100,
                           default_max_tokens=50)
    assert (limits.max_input_len, limits.window_tokens_per_request) == (800, 750)
    kw = dict(engine_dir=tmp_path / "engine", tokenizer_dir="lm", encoder_max_windows=2, engine=engine)
    with pytest.raises(GpuRepoError, match="use_paged_context_fmha"):
        gpu_repo_spec(checkpoint, limits, **kw)  # the defaults (reuse + chunked context on) cannot load
    spec = gpu_repo_spec(checkpoint, limits, options=backend_options(engine), **kw)
    assert spec.decoder_params["enable_kv_cache_reuse"] == "false" and not spec.prompt_table_extra_ids
