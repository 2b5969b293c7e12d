"""Each python stage's parameters are one typed record (runtime/stages/params.py): what the build renders into
config.pbtxt is what the stage parses back, a bad parameter fails the model's load with a message naming it, and no
stage keeps a default of its own that could differ from the build's. Before the records, each model.py read strings
with its own defaults: the CPU decoder max_queue_size "0" and stream_interval_ms "0" where the build's defaults were
32 and 50, the encoder max_windows_per_run "0" where the build's was 2."""

from __future__ import annotations

import dataclasses
from dataclasses import MISSING

import pytest

from af3trt.build import build_engines
from af3trt.build.build_engines import options_from_args, parser
from af3trt.build.plan import ServingConfig, make_plan
from af3trt.build.repository import serving_params
from af3trt.runtime.stages import params as P
from af3trt.runtime.stages.contract import DECODER
from af3trt.triton_repo import configs

from fakes import pb_utils as fake_pb
from helpers import gpu_spec


def as_text(cfg) -> dict[str, str]:
    return {k: v.string_value for k, v in cfg.parameters.items()}


def drift(record: type[P.StageParams]) -> list[str]:
    """Where a stage's default could differ from the build's: a field that a ServingConfig setting sets whose default
    is not the setting's default (on every target the record serves), or a field named as a ServingConfig setting
    that the build sets from the repository (max_queue_size, max_input_len, ...) and the stage gives a default."""
    build = ServingConfig()
    found = []
    for f in dataclasses.fields(record):
        names = f.metadata.get("serving") or ()
        assert all(hasattr(build, n) for n in names), (record.__name__, f.name, names)
        if names and set(record.TARGETS) <= set(ServingConfig.targets(names[0])) \
                and f.default != build.setting(*names):
            found.append(f"{record.__name__}.{f.name}: {f.default!r}, the build's {build.setting(*names)!r}")
        elif not names and hasattr(build, f.name) and f.default is not MISSING:
            found.append(f"{record.__name__}.{f.name}: {f.default!r}, the build's {getattr(build, f.name)!r}")
    return found


def test_no_stage_default_differs_from_the_builds():
    assert P.RECORDS and [r for r in P.RECORDS if drift(r)] == []
    # the check catches the drift the string parameters had: the old CPU decoder's own defaults, as a record
    old = dataclasses.make_dataclass(
        "OldDecoderParams", [("max_queue_size", int, dataclasses.field(default=0)),
                             ("stream_interval_ms", int, P.param(default=0, serving=("stream_interval_ms",)))],
        bases=(P.StageParams,), frozen=True, namespace={"MODEL": DECODER, "TARGETS": ("cpu",)})
    assert drift(old) == ["OldDecoderParams.max_queue_size: 0, the build's 32",
                          "OldDecoderParams.stream_interval_ms: 0, the build's 50"]


def cpu_configs(tiny_ckpt, tmp_path, *flags: str) -> dict:
    args = parser().parse_args(["--hf-model", str(tiny_ckpt), "--out", str(tmp_path / "o"), *flags])
    plan = make_plan(options_from_args(args))
    lm = {"dtype": plan.checkpoint.dtype, "vocab_size": plan.checkpoint.vocab_size}
    return configs.all_configs(build_engines.cpu_repo_spec(plan, lm, "artifacts/encoder.onnx"))


def records(cfgs: dict, target: str) -> dict[str, P.StageParams]:
    """Each python stage's record as the stage parses it, checked to render back to the same parameters."""
    out = {}
    for model, cfg in cfgs.items():
        record = P.record_of(model, target)
        if record is None:
            continue
        text = {k: v for k, v in as_text(cfg).items() if k not in P.PYTHON_BACKEND_PARAMETERS}
        out[model] = record.parse(text)
        assert out[model].render() == text, model
    return out


def test_what_the_build_writes_is_what_each_stage_reads(tiny_ckpt, checkpoint, limits, tmp_path):
    cpu = records(cpu_configs(tiny_ckpt, tmp_path), "cpu")
    assert sorted(cpu) == ["cancel", "decoder", "encoder", "fusion", "postprocess", "preprocess"]
    build = ServingConfig()
    dec, enc, pre = cpu["decoder"], cpu["encoder"], cpu["preprocess"]
    assert (dec.max_queue_size, dec.queue_timeout_ms, dec.stream_interval_ms, dec.max_batch_size) == \
        (build.max_queue_size, build.queue_timeout_ms, build.stream_interval_ms, build.max_batch_size) == \
        (32, 120000, 50, 8)
    assert (enc.max_windows_per_run, pre.threads, pre.max_audio_windows) == (2, 1, build.max_audio_windows)
    assert cpu["fusion"].default_max_tokens == build.served_default_max_tokens
    # the GPU target's python stages use the same records (its decoder is the tensorrtllm backend's)
    spec, _ = gpu_spec(checkpoint, limits, tmp_path)
    gpu = records(configs.all_configs(spec), "gpu")
    assert sorted(gpu) == ["cancel", "decoder_front", "encoder", "fusion", "postprocess", "preprocess"]
    assert isinstance(gpu["encoder"], P.EncoderTrtParams) and gpu["fusion"].gpu_kernels
    # the decoder front coalesces the tensorrtllm backend's streams at the build's interval
    assert isinstance(gpu["decoder_front"], P.DecoderFrontParams)
    assert gpu["decoder_front"].stream_interval_ms == limits.stream_interval_ms
    assert gpu["preprocess"].threads == 0 and gpu["cancel"].stop_model == DECODER  # CPU settings stay off the GPU


def test_serving_settings_reach_the_records(tiny_ckpt, tmp_path):
    got = records(cpu_configs(tiny_ckpt, tmp_path, "--max-queue-size", "5", "--stream-interval-ms", "0",
                              "--cpu-threads", "3", "--encoder-threads", "2", "--encoder-windows-per-run", "0",
                              "--no-crop-frames", "--cpu-decoder-precision", "bf16"), "cpu")
    dec, enc, pre = got["decoder"], got["encoder"], got["preprocess"]
    assert (dec.max_queue_size, dec.stream_interval_ms, dec.threads, dec.precision) == (5, 0, 3, "bf16")
    assert (enc.intra_op_threads, enc.max_windows_per_run) == (2, 0)  # its own over --cpu-threads
    assert (pre.threads, pre.crop_frames) == (1, False)  # --preprocess-threads keeps its default of 1
    assert serving_params(ServingConfig(), P.PreprocessParams, "gpu") == {"crop_frames": True}


def test_a_bad_parameter_fails_the_load_and_names_itself(tiny_ckpt, tmp_path):
    cfgs = cpu_configs(tiny_ckpt, tmp_path)
    cfg = cfgs["decoder"]
    for key, value, needle in (("max_queue_size", "lots", "parameter max_queue_size must be an integer, got 'lots'"),
                               ("max_queue_sise", "4", "unknown parameter(s) max_queue_sise"),
                               ("precision", "int3", "precision must be one of auto, fp32, bf16, int8_dyn"),
                               ("queue_timeout_ms", "-1", "queue_timeout_ms must be >= 0")):
        bad = configs.mc.ModelConfig()
        bad.CopyFrom(cfg)
        bad.parameters[key].string_value = value
        with pytest.raises(P.ParamError, match=f"^decoder: .*{needle}".replace("(", r"\(").replace(")", r"\)")):
            fake_pb.load_model("decoder", bad)
    missing = configs.mc.ModelConfig()
    missing.CopyFrom(cfg)
    del missing.parameters["max_batch_size"]
    with pytest.raises(P.ParamError, match="parameter max_batch_size is required"):
        fake_pb.load_model("decoder", missing)
    for record, text, needle in ((P.FusionParams, {**as_text(cfgs["fusion"]), "think": "yes"},
                                  "think must be true or false"),
                                 (P.PostprocessParams, {"stop_ids": "1,x"}, "integers separated by commas")):
        with pytest.raises(P.ParamError, match=needle):
            record.parse(text)
    assert P.PostprocessParams.parse({"stop_ids": ""}).stop_ids == ()


def test_the_build_checks_a_stages_own_parameters():
    spec = configs.RepoSpec(target="cpu", hidden_size=8, decoder_dtype="float32", vocab_size=10, end_id=1, pad_id=1)
    with pytest.raises(ValueError, match="EncoderParams.*onnx_pth"):
        configs.encoder_config(dataclasses.replace(spec, encoder_params={"onnx_pth": "e.onnx"}))
    with pytest.raises(P.ParamError, match="encoder: parameter cache_bytes must be int, got '1'"):
        configs.encoder_config(dataclasses.replace(spec, encoder_params={"cache_bytes": "1"}))
