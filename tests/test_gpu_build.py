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
from af3trt.build.gpu_build import GpuOptions
from af3trt.triton_repo import configs

from test_trt_encoder import make_fake_trt

# trtllm-build stand-in: tests/fake_trtllm_build.py (reproduces the 1.2 builder's plugin_config, sources there)
FAKE_TRTLLM_BUILD = """#!{python}
import sys
sys.path.insert(0, {tests!r})
import fake_trtllm_build
sys.exit(fake_trtllm_build.main(sys.argv[1:]))
"""


@pytest.fixture
def fake_gpu_tools(monkeypatch, tmp_path):
    trt = make_fake_trt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    exe = bindir / "trtllm-build"
    exe.write_text(FAKE_TRTLLM_BUILD.format(python=sys.executable, tests=str(Path(__file__).parent)))
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    return trt


def test_full_gpu_build_renders_the_gpu_ensemble(tiny_ckpt, tmp_path, fake_gpu_tools):
    out = tmp_path / "gpu"
    build(BuildOptions(hf_model=tiny_ckpt, out=out, target="gpu", max_batch_size=4, max_audio_seconds=60,
                       max_text_len=256, max_output_len=64,
                       gpu=GpuOptions(precision="fp8", kv_cache="fp8", gpu="h100", encoder_precision="fp16")))
    repo = out / "model_repository"
    enc = configs.parse((repo / "encoder" / "config.pbtxt").read_text())
    dec = configs.parse((repo / "decoder" / "config.pbtxt").read_text())
    # the encoder takes what the decoder can take per iteration: max_num_tokens 1759 (= 256 + 2 x 750 + 3) -> 3
    # windows, at least one request's 2 windows (build/memory_plan.encoder_profile_windows), not 4 x 2
    assert enc.platform == "tensorrt_plan" and enc.max_batch_size == 3
    assert (repo / "encoder" / "1" / "model.plan").read_bytes() == b"PLAN-BYTES"
    assert dec.backend == "tensorrtllm" and dec.model_transaction_policy.decoupled
    assert dec.parameters["gpt_model_path"].string_value == str(out / "artifacts" / "engine")  # where it ends up
    assert (out / "artifacts" / "engine" / "rank0.engine").exists()
    ckpt_cfg = json.loads((out / "artifacts" / "trtllm_checkpoint" / "config.json").read_text())
    table = next(i for i in dec.input if i.name == "prompt_embedding_table")
    assert configs.mc.DataType.Name(table.data_type) == configs.mc.DataType.Name(configs.DTYPES[ckpt_cfg["dtype"]])
    fusion = configs.parse((repo / "fusion" / "config.pbtxt").read_text())
    assert fusion.parameters["vocab_size"].string_value == str(ckpt_cfg["vocab_size"])  # the engine's vocab
    assert ckpt_cfg["rotary_base"] == 1e6 and ckpt_cfg["quantization"]["quant_algo"] == "FP8"

    argv = json.loads((out / "artifacts" / "engine" / "argv.json").read_text())
    assert argv[argv.index("--max_prompt_embedding_table_size") + 1] == str(4 * 2 * 750)
    assert argv[argv.index("--max_input_len") + 1] == str(256 + 2 * 750)
    assert argv[argv.index("--use_fp8_context_fmha") + 1] == "enable"

    m = json.loads((out / "manifest.json").read_text())
    assert m["target"] == "gpu" and m["precisions"]["decoder"] == "fp8" and m["precisions"]["kv_cache"] == "fp8"
    acc = m["validation"]["decoder_accuracy"]
    assert 0 <= acc["token_agreement"] <= 1 and acc["mean_kl"] >= 0
    assert m["validation"]["encoder_engine_onnx"]["validation"]["cosine"] > 0.999
    assert m["encoder_engine"]["engine_plan"]["max_windows"] == 3
    plan = m["gpu"]["memory_plan"]
    assert plan["encoder_windows"] == 3 and plan["fits"] and plan["gpu"] == "NVIDIA H100 80GB HBM3"
    assert plan["kv_cache_tokens"] == 4 * -(-int(argv[argv.index("--max_seq_len") + 1]) // 32) * 32
    assert dec.parameters["max_tokens_in_paged_kv_cache"].string_value == str(plan["kv_cache_tokens"])
    names = [c[0] for c in fake_gpu_tools.calls]
    assert "build_serialized_network" in names and "set_flag" not in names


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
    monkeypatch.setitem(sys.modules, "tensorrt", make_fake_trt())
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    with pytest.raises(Exception, match="trtllm-build"):
        build(BuildOptions(hf_model=tiny_ckpt, out=tmp_path / "x", target="gpu", max_audio_seconds=30,
                           gpu=GpuOptions(precision="bf16", gpu="h100", accuracy_report=False)))
    assert not (tmp_path / "x").exists() and list(tmp_path.iterdir()) == []
