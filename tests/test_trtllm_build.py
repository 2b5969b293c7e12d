"""The decoder side of the GPU build, checked without a GPU: the checkpoint validator (good and known-bad
checkpoints), the trtllm-build command line derived from serving limits, running the executable, GPU precision
rules, and the CPU accuracy report."""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from af3trt.build.plan import ServingConfig
from af3trt.build.trtllm_engine import (TrtllmBuildError, decoder_accuracy_report, plan_trtllm_build, run_trtllm_build,
                                        trtllm_build_args)
from af3trt.export.trtllm_checkpoint import CheckpointError, validate_checkpoint
from af3trt.registry import KNOWN_GPUS, GpuInfo, PrecisionError, check_precision
from af3trt.runtime.engines.gpus import detect_gpu, detect_gpus, parse_nvidia_smi, target_gpu

pytest.importorskip("modelopt.torch.quantization")

# Every option of tensorrt_llm/commands/build.py + plugin.py's cli_plugin_args in TensorRT-LLM 1.2 that we may use.
TRTLLM_1_2_FLAGS = {
    "--checkpoint_dir", "--output_dir", "--max_batch_size", "--max_input_len", "--max_seq_len", "--max_beam_width",
    "--max_num_tokens", "--opt_num_tokens", "--max_prompt_embedding_table_size", "--kv_cache_type",
    "--input_timing_cache", "--output_timing_cache", "--workers", "--log_level", "--logits_dtype",
    "--gpt_attention_plugin", "--gemm_plugin", "--context_fmha", "--remove_input_padding", "--tokens_per_block",
    "--use_paged_context_fmha", "--use_fp8_context_fmha", "--multiple_profiles", "--use_fused_mlp",
}
GONE_OR_DEPRECATED = {"--paged_kv_cache", "--auto_parallel", "--enable_xqa", "--strongly_typed", "--max_output_len",
                      "--use_custom_all_reduce", "--gather_generation_logits"}


@pytest.fixture(scope="module")
def good(lm_dir, tmp_path_factory):
    """A valid bf16 and fp8 (+ fp8 KV) checkpoint of the tiny decoder."""
    from af3trt.export.quantize import write_trtllm_checkpoint

    root = tmp_path_factory.mktemp("good")
    return {p: write_trtllm_checkpoint(lm_dir, root / p, precision=p, kv_cache=kv, calib_size=2)["checkpoint_dir"]
            for p, kv in (("bf16", "auto"), ("fp8", "fp8"), ("int8_wo", "auto"))}


def mutate(src, dst, config_fn=None, tensors_fn=None):
    shutil.copytree(src, dst)
    if config_fn:
        cfg = json.loads((dst / "config.json").read_text())
        config_fn(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    if tensors_fn:
        t = load_file(dst / "rank0.safetensors")
        tensors_fn(t)
        save_file(t, dst / "rank0.safetensors")
    return dst


def problems_of(ckpt, **kw):
    with pytest.raises(CheckpointError) as e:
        validate_checkpoint(ckpt, **kw)
    return e.value.problems


# ---------------------------------------------------------------------------------------------- validator

def test_good_checkpoints_pass(good, lm_dir):
    for ckpt in good.values():
        report = validate_checkpoint(ckpt, hf_config=lm_dir)
        assert report.rotary_base == 1e6 and report.qwen_type == "qwen2"
    assert validate_checkpoint(good["bf16"]).warnings  # no HF config: rope theta not cross-checked, said so


def test_missing_rotary_base_fails(good, tmp_path):
    ckpt = mutate(good["bf16"], tmp_path / "c", config_fn=lambda c: c.pop("rotary_base"))
    (problem,) = problems_of(ckpt)
    assert "rotary_base" in problem and "10000" in problem


def test_rotary_base_must_equal_hf_rope_theta(good, lm_dir, tmp_path):
    ckpt = mutate(good["bf16"], tmp_path / "c", config_fn=lambda c: c.update(rotary_base=10000.0))
    validate_checkpoint(ckpt)  # well-formed on its own...
    (problem,) = problems_of(ckpt, hf_config=lm_dir)  # ...but not the model it came from
    assert "rotary_base = 10000.0" in problem and "1000000.0" in problem


def test_wrong_quant_algo_string_fails(good, tmp_path):
    ckpt = mutate(good["fp8"], tmp_path / "c", config_fn=lambda c: c["quantization"].update(quant_algo="FP8_E4M3"))
    assert any("FP8_E4M3" in p and "QuantAlgo" in p for p in problems_of(ckpt))
    ckpt = mutate(good["fp8"], tmp_path / "d",
                  config_fn=lambda c: c["quantization"].update(kv_cache_quant_algo="fp8"))
    assert any("kv_cache_quant_algo" in p for p in problems_of(ckpt))


def test_unknown_quantization_key_fails(good, tmp_path):
    ckpt = mutate(good["fp8"], tmp_path / "c", config_fn=lambda c: c["quantization"].update(awq_block_size=128))
    assert any("QuantConfig" in p and "awq_block_size" in p for p in problems_of(ckpt))


def test_missing_scale_tensor_fails(good, tmp_path):
    name = "transformer.layers.1.mlp.fc.activation_scaling_factor"
    ckpt = mutate(good["fp8"], tmp_path / "c", tensors_fn=lambda t: t.pop(name))
    (problem,) = problems_of(ckpt)
    assert name in problem and "missing 1 required" in problem
    kv = "transformer.layers.0.attention.kv_cache_scaling_factor"

    def drop_kv(t):
        for k in [k for k in t if k.startswith("transformer.layers.0.attention.") and "cache_scaling" in k]:
            t.pop(k)

    ckpt = mutate(good["fp8"], tmp_path / "d", tensors_fn=drop_kv)
    assert any(kv in p for p in problems_of(ckpt))


def test_tp_mismatch_fails(good, tmp_path):
    def tp2(c):
        c["mapping"].update(world_size=2, tp_size=2)

    problems = problems_of(mutate(good["bf16"], tmp_path / "c", config_fn=tp2))
    assert any("rank1.safetensors is missing" in p for p in problems)
    assert any("qkv.weight has shape [128, 64], expected [64, 64]" in p for p in problems)
    problems = problems_of(mutate(good["bf16"], tmp_path / "d", config_fn=lambda c: c["mapping"].update(tp_size=2)))
    assert any("world_size 1 != tp_size 2" in p for p in problems)


def test_wrong_dtype_and_shape_fail(good, tmp_path):
    def damage(t):
        t["transformer.layers.0.mlp.gate.weight"] = t["transformer.layers.0.mlp.gate.weight"].float()
        dense = "transformer.layers.1.attention.dense.weight"
        t[dense] = t[dense][:, :32].contiguous()

    problems = problems_of(mutate(good["bf16"], tmp_path / "c", tensors_fn=damage))
    assert any("mlp.gate.weight is float32, expected bfloat16" in p for p in problems)
    assert any("attention.dense.weight has shape [64, 32]" in p for p in problems)


def test_modelopt_int8_weight_only_layout_fails(good, tmp_path):
    """modelopt's INT8_WEIGHT_ONLY export ([out, in] int8 + weights_scaling_factor) is not what W8A16 loads."""
    def as_modelopt(t):
        for k in [k for k in t if k.endswith(".weight") and ".layers." in k and "layernorm" not in k]:
            w = t[k].float()
            scale = w.abs().amax(1) / 127
            t[k] = (w / scale[:, None]).round().to(torch.int8)
            t[k.replace(".weight", ".weights_scaling_factor")] = scale

    problems = problems_of(mutate(good["int8_wo"], tmp_path / "c", tensors_fn=as_modelopt))
    assert any("INT8_WEIGHT_ONLY" in p and "qkv" in p for p in problems)


def test_every_problem_is_listed(good, tmp_path):
    def many(c):
        c.pop("rotary_base")
        c["qwen_type"] = "qwen"
        c["hidden_act"] = "gelu"
        c["quantization"]["quant_algo"] = "W8A8"

    problems = problems_of(mutate(good["bf16"], tmp_path / "c", config_fn=many))
    assert len(problems) >= 4
    assert {"rotary_base", "qwen_type", "hidden_act", "quant_algo"} <= {
        w for p in problems for w in ("rotary_base", "qwen_type", "hidden_act", "quant_algo") if w in p}


def test_extra_keys_and_tensors_are_tolerated(good, tmp_path):
    ckpt = mutate(good["bf16"], tmp_path / "c", config_fn=lambda c: c.update(producer={"name": "x"}, foo=1),
                  tensors_fn=lambda t: t.update(extra=torch.zeros(3)))
    validate_checkpoint(ckpt)


def test_missing_files(tmp_path):
    assert problems_of(tmp_path) == ["config.json is missing"]


# ---------------------------------------------------------------------------------------------- trtllm-build args

def as_dict(args):
    assert len(args) % 2 == 0, "every flag takes a value"
    flags = args[0::2]
    assert all(f.startswith("--") for f in flags) and len(set(flags)) == len(flags)
    assert set(flags) <= TRTLLM_1_2_FLAGS, set(flags) - TRTLLM_1_2_FLAGS
    assert not set(flags) & GONE_OR_DEPRECATED
    return dict(zip(flags, args[1::2]))


@pytest.mark.parametrize("batch,seconds,audio,table", [(1, 30, 750, 750), (8, 30, 750, 6000),
                                                       (1, 600, 15000, 15000), (8, 600, 15000, 120000)])
def test_bf16_args_follow_limits(tmp_path, batch, seconds, audio, table):
    limits = ServingConfig(max_batch_size=batch, max_audio_seconds=seconds, max_text_len=1024,
                           max_output_len=512)
    a = as_dict(trtllm_build_args(tmp_path / "ckpt", tmp_path / "engine", limits, "bf16"))
    assert a["--max_batch_size"] == str(batch)
    assert a["--max_input_len"] == str(1024 + audio)
    assert a["--max_seq_len"] == str(1024 + audio + 512)
    assert a["--max_num_tokens"] == str(1024 + audio + batch - 1)
    assert a["--max_prompt_embedding_table_size"] == str(table)
    assert a["--kv_cache_type"] == "paged" and a["--remove_input_padding"] == "enable"
    assert a["--gpt_attention_plugin"] == "auto" and a["--gemm_plugin"] == "auto"
    assert a["--context_fmha"] == "enable" and a["--use_paged_context_fmha"] == "enable"
    assert a["--use_fp8_context_fmha"] == "disable"
    assert a["--workers"] == "1" and a["--logits_dtype"] == "float32"
    assert a["--input_timing_cache"] == a["--output_timing_cache"] == str(tmp_path / "trtllm.timing.cache")
    assert a["--checkpoint_dir"] == str(tmp_path / "ckpt") and a["--output_dir"] == str(tmp_path / "engine")


@pytest.mark.parametrize("batch,gemm", [(1, "fp8"), (4, "fp8"), (8, "disable")])
def test_fp8_args(tmp_path, batch, gemm):
    limits = ServingConfig(max_batch_size=batch, max_audio_seconds=30, tp_size=2)
    plan = plan_trtllm_build(tmp_path / "ckpt", tmp_path / "engine", limits, "fp8", "fp8",
                             gpu=KNOWN_GPUS["h100"])
    a = as_dict(plan.args)
    assert a["--gemm_plugin"] == gemm  # FP8 GEMM plugin only for small batches
    assert a["--use_fp8_context_fmha"] == "enable" and a["--use_paged_context_fmha"] == "enable"
    assert a["--workers"] == "2"
    assert plan.derived["kv_cache_reuse_possible"] and not plan.derived["enable_chunked_context"]


def test_kv_cache_variants_follow_the_builder(tmp_path):
    limits = ServingConfig(max_batch_size=4, max_audio_seconds=30)
    fp8_only_weights = plan_trtllm_build(tmp_path / "c", tmp_path / "e", limits, "fp8", "auto")
    assert as_dict(fp8_only_weights.args)["--use_fp8_context_fmha"] == "disable"  # needs an FP8 KV cache too
    for precision, kv in (("int8_sq", "int8"), ("bf16", "fp8"), ("int8_wo", "int8")):
        plan = plan_trtllm_build(tmp_path / "c", tmp_path / "e", limits, precision, kv)
        assert as_dict(plan.args)["--use_paged_context_fmha"] == "disable"
        assert not plan.derived["kv_cache_reuse_possible"] and plan.notes


def test_chunked_context_when_the_prompt_exceeds_max_num_tokens(tmp_path):
    limits = ServingConfig(max_batch_size=2, max_audio_seconds=600, max_text_len=4096)
    plan = plan_trtllm_build(tmp_path / "c", tmp_path / "e", limits, "bf16")
    assert plan.derived["max_num_tokens"] == 16384 < plan.derived["max_input_len"] == 19096
    assert plan.derived["enable_chunked_context"]
    with pytest.raises(ValueError, match="chunked context"):
        plan_trtllm_build(tmp_path / "c", tmp_path / "e", limits, "int8_sq", "int8")


def test_args_are_checked_against_the_checkpoint(good, tmp_path):
    limits = ServingConfig(max_batch_size=2, max_audio_seconds=30)
    assert as_dict(trtllm_build_args(good["fp8"], tmp_path / "e", limits, "fp8", "fp8"))
    with pytest.raises(ValueError, match="quant_algo"):
        trtllm_build_args(good["fp8"], tmp_path / "e", limits, "bf16")
    with pytest.raises(ValueError):
        trtllm_build_args(good["bf16"], tmp_path / "e", ServingConfig(tp_size=2, max_audio_seconds=30), "bf16")


def test_limits_are_validated():
    with pytest.raises(ValueError):
        ServingConfig(max_audio_seconds=601)
    with pytest.raises(ValueError):
        ServingConfig(max_batch_size=0)
    assert ServingConfig(max_audio_seconds=600).audio_tokens_per_request == 15000
    assert ServingConfig(max_audio_seconds=5).audio_tokens_per_request == 125


# ---------------------------------------------------------------------------------------------- running trtllm-build

def fake_executable(tmp_path, name, body):
    path = tmp_path / name
    path.write_text(f"#!{sys.executable}\nimport sys\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def test_run_trtllm_build_streams_and_fails_clearly(tmp_path, monkeypatch):
    with pytest.raises(TrtllmBuildError, match="not on PATH"):
        run_trtllm_build(["--checkpoint_dir", "x"], tmp_path / "log", executable="no-such-trtllm-build")
    helps = "if sys.argv[1:] == ['--help']: print('usage: trtllm-build [--max_batch_size N]'); sys.exit(0)\n"
    ok = fake_executable(tmp_path, "trtllm-build", helps + "print('[TRT-LLM] [I] Total time of building all engines: "
                                                           "00:00:01'); print(' '.join(sys.argv[1:]))")
    result = run_trtllm_build(["--max_batch_size", "8"], tmp_path / "logs" / "build.log", executable=str(ok))
    text = (tmp_path / "logs" / "build.log").read_text()
    assert result["returncode"] == 0 and "--max_batch_size 8" in text and "Total time" in text
    bad = fake_executable(tmp_path, "bad-build", helps + "print('[TRT-LLM] [E] out of memory'); sys.exit(3)")
    with pytest.raises(TrtllmBuildError, match="exited with 3") as e:
        run_trtllm_build([], tmp_path / "bad.log", executable=str(bad))
    assert "out of memory" in str(e.value)


# ---------------------------------------------------------------------------------------------- GPU rules

def test_gpu_detection_and_declaration(tmp_path):
    text = "NVIDIA H100 80GB HBM3, 9.0, 81559\nNVIDIA H100 80GB HBM3, 9.0, 81559\n"
    (g, _) = parse_nvidia_smi(text)
    assert g.compute_capability == (9, 0) and g.sm == 90 and g.memory_mib == 81559 and not g.declared
    assert detect_gpus("no-such-nvidia-smi") == [] and detect_gpu("no-such-nvidia-smi") is None
    smi = fake_executable(tmp_path, "nvidia-smi", "print('NVIDIA A100-SXM4-80GB, 8.0, 81920')")
    assert detect_gpu(str(smi)).sm == 80
    assert target_gpu("H100", nvidia_smi="no-such-nvidia-smi") == KNOWN_GPUS["h100"]
    with pytest.raises(ValueError, match="architecture"):
        target_gpu("h100", nvidia_smi=str(smi))  # declared target differs from the GPU present
    with pytest.raises(ValueError, match="unknown GPU"):
        target_gpu("rtx9999", nvidia_smi="no-such-nvidia-smi")


def test_fp8_refused_below_sm89():
    a100 = KNOWN_GPUS["a100"]
    with pytest.raises(PrecisionError, match="SM 8.9"):
        check_precision("fp8", "auto", a100)
    with pytest.raises(PrecisionError, match="FP8 KV cache"):
        check_precision("int8_wo", "fp8", a100)
    assert check_precision("int8_sq", "int8", a100) == []
    assert check_precision("fp8", "fp8", KNOWN_GPUS["h100"]) == []
    assert check_precision("fp8", "fp8", KNOWN_GPUS["l40s"]) == []
    with pytest.raises(PrecisionError, match="INT8"):
        check_precision("int4_awq", "auto", KNOWN_GPUS["b200"])
    with pytest.raises(PrecisionError, match="bf16"):
        check_precision("bf16", "auto", KNOWN_GPUS["t4"])
    assert check_precision("fp8", "fp8", None)  # nothing to check against: a note, not an error
    with pytest.raises(PrecisionError):
        plan_trtllm_build("c", "e", ServingConfig(max_audio_seconds=30), "fp8", gpu=KNOWN_GPUS["a100"])
    assert GpuInfo("x", (8, 9), 1).sm == 89


# ---------------------------------------------------------------------------------------------- accuracy on CPU

ACCURACY_PROMPTS = ["<|im_start|>user\nDescribe the music.<|im_end|>\n<|im_start|>assistant\n",
                    "The quick brown fox jumps over"]


@pytest.fixture(scope="module")
def cast_only(lm_dir):
    """The accuracy report of the bf16 cast alone (no quantizer): what a quantizer that does nothing would score."""
    return decoder_accuracy_report(lm_dir, "bf16", prompts=ACCURACY_PROMPTS, max_new_tokens=6)


# (precision, kv cache) -> least greedy-token agreement with the float32 model over the 12 positions. Measured on the
# tiny random-weight decoder: int8_wo 0.83, fp8 0.50 (e4m3 weights, activations and KV cache); the bf16 cast 1.0.
MIN_AGREEMENT = {("int8_wo", "auto"): 0.75, ("fp8", "fp8"): 0.4}


@pytest.mark.slow
@pytest.mark.parametrize("precision,kv_cache", list(MIN_AGREEMENT))
def test_accuracy_report(lm_dir, cast_only, precision, kv_cache):
    r = decoder_accuracy_report(lm_dir, precision, kv_cache, prompts=ACCURACY_PROMPTS, max_new_tokens=6,
                                calib_size=4)
    assert 0.0 <= r["token_agreement"] <= 1.0
    assert r["mean_kl"] >= 0.0 and r["max_kl"] >= r["mean_kl"]
    # the cast alone already moves the logits (bf16 vs the float32 reference) ...
    assert "fake quantization" not in cast_only["method"] and cast_only["mean_kl"] > 0
    # ... the quantizer must move them further (measured: bf16 0.0013, int8_wo 0.0038, fp8 0.11), yet mostly agree
    assert r["mean_kl"] > 2 * cast_only["mean_kl"], (r["mean_kl"], cast_only["mean_kl"])
    assert r["token_agreement"] >= MIN_AGREEMENT[(precision, kv_cache)]
    assert r["positions"] == 12 and len(r["per_prompt"]) == 2
    assert r["reference_dtype"] == "float32" and r["engine_dtype"] == "bfloat16"
    assert "fake quantization" in r["method"]
    json.dumps(r)  # goes into the build output and manifest


def test_our_command_line_is_checked_against_the_installed_trtllm_build_help(tmp_path, monkeypatch):
    """The flags and choices of trtllm-build moved between versions (plugin.py's plugin_options had no fp8 in the
    0.x line; later gemm_plugin offers auto…fp8, nvfp4, disable): before building, run_trtllm_build asks the installed
    trtllm-build's --help and refuses a command line it would not take, naming the flag and what it takes."""
    from af3trt.build.trtllm_engine import check_args_against_help, help_options
    from fakes import trtllm_build as fake

    opts = help_options(fake.help_text())
    assert opts["--gemm_plugin"] == {"auto", "float16", "float32", "bfloat16", "int32", "fp8", "nvfp4", "disable"}
    assert opts["--max_batch_size"] is None and "--help" in opts
    args = ["--gemm_plugin", "disable", "--use_fp8_context_fmha", "enable", "--max_batch_size", "8"]
    assert check_args_against_help(args, fake.help_text()) == []
    assert check_args_against_help(["--enable_xqa", "enable"], fake.help_text()) == [
        "--enable_xqa is not an option of this trtllm-build"]
    monkeypatch.setenv("FAKE_TRTLLM_GEMM_CHOICES", "float16,float32,bfloat16,disable")  # a 0.x-era builder
    old = check_args_against_help(["--gemm_plugin", "fp8"], fake.help_text())
    assert old == ["--gemm_plugin fp8: this trtllm-build takes {bfloat16,disable,float16,float32}"]

    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake.install(bindir, sys.executable)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    with pytest.raises(TrtllmBuildError, match="--gemm_plugin fp8: this trtllm-build takes"):
        run_trtllm_build(["--checkpoint_dir", str(tmp_path / "none"), "--gemm_plugin", "fp8"], tmp_path / "log")
    assert not (tmp_path / "log").exists()  # refused before anything ran
