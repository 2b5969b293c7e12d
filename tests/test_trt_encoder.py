"""The encoder's TensorRT build (build/trt_encoder.py) against a fake `tensorrt` module that records every call.

Nothing here runs TensorRT: the fake checks that the documented TensorRT 10.14 Python API is called as intended
(strongly typed network, ONNX parser, workspace pool, one window-axis profile, timing cache, serialized build) and
that failures come back as clear errors.
"""

from __future__ import annotations

import json
import sys

import pytest

from af3trt import registry
from af3trt.build import trt_encoder
from af3trt.runtime.engines.trt_runner import TensorRTUnavailable
from af3trt.build.trt_encoder import (EncoderEngineError, build_encoder_engine,
                                      encoder_engine_plan, encoder_max_windows)
from af3trt.runtime.stages import lengths

from fakes import tensorrt as fake_tensorrt

H = 64


def encoder_io(features_dtype="FLOAT", drop_mask=False, frames=-1):
    """The I/O the fake parser presents: the encoder's, or one with a wrong dtype, no mask or a fixed T."""
    inputs = [("input_features", features_dtype, (-1, 128, frames))]
    if not drop_mask:
        inputs.append(("input_features_mask", "INT32", (-1, frames)))
    return inputs, [("audio_embeds", "FLOAT", (-1, -1, H))]


def make_fake_trt(*, io=None, **outcome):
    """The one fake TensorRT (tests/fakes/tensorrt), a private copy whose parser presents `io` (default: the
    encoder's); `trt.calls` lists (api, args) in call order."""
    return fake_tensorrt.fresh(io=io or encoder_io(), **outcome)


@pytest.fixture
def onnx_file(tmp_path):
    p = tmp_path / "encoder.fp16.onnx"
    p.write_bytes(b"not parsed by the fake")
    return p


def names(trt):
    return [c[0] for c in trt.calls]


def only(trt, name):
    return [args for n, args in trt.calls if n == name]


# ---------------------------------------------------------------------------------------------------------------

LIMITS = [  # (max_batch_size, max_audio_windows, opt_windows) → expected (max, opt)
    (8, 20, None, 160, 80),
    (1, 1, None, 1, 1),
    (4, 2, None, 8, 4),
    (3, 20, 20, 60, 20),
    (16, 1, 1, 16, 1),
]


@pytest.mark.parametrize("mbs, windows, opt, want_max, want_opt", LIMITS)
def test_plan_profile_for_limits(mbs, windows, opt, want_max, want_opt):
    max_w = encoder_max_windows(mbs, windows)
    plan = encoder_engine_plan(max_windows=max_w, opt_windows=opt, workspace_gb=2)
    assert (plan.max_windows, plan.opt_windows) == (want_max, want_opt)
    feats, mask = plan.profile
    assert feats.name == "input_features" and feats.dtype == "float32"
    # windows × frames: T from the frame buckets (1 s … 30 s), opt the middle bucket
    assert (feats.min, feats.opt, feats.max) == ((1, 128, 100), (want_opt, 128, 1600), (want_max, 128, 3000))
    assert mask.name == "input_features_mask" and mask.dtype == "int32"
    assert (mask.min, mask.opt, mask.max) == ((1, 100), (want_opt, 1600), (want_max, 3000))
    assert (plan.min_frames, plan.opt_frames, plan.max_frames) == (lengths.FRAME_BUCKETS[0], 1600,
                                                                   lengths.WINDOW_FRAMES)
    assert plan.strongly_typed and plan.precision_flags == () and plan.workspace_bytes == 2 << 30
    assert feats.max[1:] == (lengths.N_MELS, lengths.WINDOW_FRAMES)


def test_plan_opt_frames_must_be_a_bucket():
    assert encoder_engine_plan(max_windows=4, opt_frames=1000).profile[0].opt == (2, 128, 1000)
    with pytest.raises(ValueError, match="frame bucket"):
        encoder_engine_plan(max_windows=4, opt_frames=1001)


@pytest.mark.parametrize("kw, match", [(dict(max_windows=0), "max_windows"),
                                       (dict(max_windows=4, opt_windows=5), "opt"),
                                       (dict(max_windows=4, opt_windows=0), "opt"),
                                       (dict(max_windows=4, workspace_gb=0), "workspace")])
def test_plan_rejects_bad_limits(kw, match):
    with pytest.raises(ValueError, match=match):
        encoder_engine_plan(**kw)
    with pytest.raises(ValueError):
        encoder_max_windows(0, 20)


@pytest.mark.parametrize("mbs, windows, opt, want_max, want_opt", LIMITS)
def test_build_calls_the_tensorrt_api(monkeypatch, onnx_file, tmp_path, mbs, windows, opt, want_max, want_opt):
    trt = make_fake_trt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    plan_path = tmp_path / "repo" / "encoder" / "1" / "model.plan"
    report = build_encoder_engine(onnx_file, plan_path, max_windows=encoder_max_windows(mbs, windows),
                                  opt_windows=opt, workspace_gb=4)

    assert names(trt) == [
        "Logger", "Builder", "create_network", "OnnxParser", "parse_from_file", "create_builder_config",
        "set_memory_pool_limit", "create_optimization_profile", "set_shape", "set_shape", "add_optimization_profile",
        "create_timing_cache", "set_timing_cache", "build_serialized_network"]
    assert only(trt, "Logger") == [(trt.Logger.WARNING,)]
    assert only(trt, "create_network") == [(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED),)] == [(2,)]
    assert only(trt, "parse_from_file") == [(str(onnx_file),)]  # from the file: external weights resolve beside it
    assert only(trt, "set_memory_pool_limit") == [(trt.MemoryPoolType.WORKSPACE, 4 << 30)]
    assert only(trt, "set_shape") == [
        ("input_features", (1, 128, 100), (want_opt, 128, 1600), (want_max, 128, 3000)),
        ("input_features_mask", (1, 100), (want_opt, 1600), (want_max, 3000))]
    assert only(trt, "set_flag") == []  # no FP16/BF16/INT8/FP8 builder flags: the precision is in the ONNX
    assert only(trt, "create_timing_cache") == [(b"",)]  # no cache file: a fresh one
    (_, ignore_mismatch), = only(trt, "set_timing_cache")
    assert ignore_mismatch is False
    network = only(trt, "OnnxParser")[0][0]
    assert only(trt, "build_serialized_network")[0][0] is network

    (plan,) = trt.built_plans
    assert plan_path.read_bytes() == plan and report["plan_bytes"] == len(plan)
    assert json.loads(plan)["onnx"] == str(onnx_file)  # the engine of the parsed network
    assert report["tensorrt_version"] == "10.14.1.48"
    assert report["engine_plan"]["max_windows"] == want_max and report["engine_plan"]["opt_windows"] == want_opt
    assert report["network"]["inputs"]["input_features"] == {"dtype": str(trt.float32), "shape": [-1, 128, -1]}
    assert report["timing_cache"] == {"path": None, "loaded_bytes": 0, "saved_bytes": 0}
    assert not list(plan_path.parent.glob(".*tmp*"))  # written atomically


def test_timing_cache_is_loaded_and_saved(monkeypatch, onnx_file, tmp_path):
    cache = tmp_path / "artifacts" / "encoder.timing.cache"
    trt = make_fake_trt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    r1 = build_encoder_engine(onnx_file, tmp_path / "a.plan", max_windows=8, timing_cache=cache)
    assert only(trt, "create_timing_cache") == [(b"",)]
    assert cache.read_bytes() == b"+timings" and r1["timing_cache"]["saved_bytes"] == len(b"+timings")
    assert names(trt)[-1] == "serialize_cache"  # serialized after the build, with what the build measured

    trt2 = make_fake_trt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt2)
    r2 = build_encoder_engine(onnx_file, tmp_path / "b.plan", max_windows=8, timing_cache=cache)
    assert only(trt2, "create_timing_cache") == [(b"+timings",)]  # the previous build's cache is reused
    assert cache.read_bytes() == b"+timings+timings"
    assert r2["timing_cache"]["loaded_bytes"] == len(b"+timings")


def test_refused_timing_cache_is_an_error(monkeypatch, onnx_file, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", make_fake_trt(accept_cache=False))
    with pytest.raises(EncoderEngineError, match="refused the timing cache"):
        build_encoder_engine(onnx_file, tmp_path / "a.plan", max_windows=8, timing_cache=tmp_path / "c")


def test_parser_errors_are_reported(monkeypatch, onnx_file, tmp_path):
    trt = make_fake_trt(parse_ok=False)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    with pytest.raises(EncoderEngineError) as err:
        build_encoder_engine(onnx_file, tmp_path / "a.plan", max_windows=8)
    msg = str(err.value)
    assert "rejected" in msg and "2 error(s)" in msg and str(onnx_file) in msg
    for part in ("Unsupported operator Foo", "/audio_tower/Foo", "(Foo)", "UNSUPPORTED_NODE", "onnxOpImporters.cpp:123"):
        assert part in msg
    assert "build_serialized_network" not in names(trt) and not (tmp_path / "a.plan").exists()


@pytest.mark.parametrize("io_kw, match", [
    (dict(features_dtype="HALF"), "input_features is DataType.HALF, expected float32"),
    (dict(drop_mask=True), "inputs are"),
    (dict(frames=3000), r"dims \[-1, 128, 3000\], expected \[-1, 128, -1\]"),  # an ONNX with a fixed T
])
def test_network_that_is_not_the_encoder_is_refused(monkeypatch, onnx_file, tmp_path, io_kw, match):
    trt = make_fake_trt(io=encoder_io(**io_kw))
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    with pytest.raises(EncoderEngineError, match=match):
        build_encoder_engine(onnx_file, tmp_path / "a.plan", max_windows=8)
    assert "build_serialized_network" not in names(trt)


def test_failed_build_is_an_error(monkeypatch, onnx_file, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", make_fake_trt(build_ok=False))
    with pytest.raises(EncoderEngineError, match="could not build"):
        build_encoder_engine(onnx_file, tmp_path / "a.plan", max_windows=8)
    assert not (tmp_path / "a.plan").exists()


def test_missing_onnx_is_an_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", make_fake_trt())
    with pytest.raises(EncoderEngineError, match="no such ONNX"):
        build_encoder_engine(tmp_path / "nope.onnx", tmp_path / "a.plan", max_windows=8)


@pytest.mark.parametrize("precision, sm, ok", [("fp8", 89, True), ("fp8", 90, True), ("fp8", 80, False),
                                               ("fp8", 86, False), ("bf16", 80, True), ("bf16", 75, False),
                                               ("int8", 75, True), ("fp16", 100, True), ("fp8", None, True)])
def test_encoder_precision_against_the_gpu(precision, sm, ok):
    if ok:
        registry.check_encoder_precision(precision, sm)
    else:
        with pytest.raises(ValueError, match=precision):
            registry.check_encoder_precision(precision, sm)
    with pytest.raises(ValueError, match="one of"):
        registry.check_encoder_precision("int4", 90)


def test_clear_error_when_tensorrt_is_missing(monkeypatch, onnx_file, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError
    with pytest.raises(TensorRTUnavailable, match=r"TensorRT 10\.14") as err:
        build_encoder_engine(onnx_file, tmp_path / "a.plan", max_windows=8)
    assert "tritonserver" in str(err.value) and "CPU target" in str(err.value)
    assert isinstance(err.value, ImportError) and not (tmp_path / "a.plan").exists()
    # the module itself and the pure plan need no TensorRT
    assert trt_encoder.encoder_engine_plan(max_windows=2).max_windows == 2
