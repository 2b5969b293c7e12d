"""Encoder precision variants for the TensorRT build (export/onnx_quant.py) on the tiny checkpoint's encoder:
fp16/bf16 casts with float32 I/O, INT8/FP8 Q/DQ from nvidia-modelopt calibrated on real speech, each measured on
held-out real-audio windows against the float32 graph.

Thresholds. The tiny encoder has random weights, so its figures say that each path is wired right, not how AF3 will
fare; the bounds are the registry's acceptance bounds (min_cosine), which the tiny model passes with margin:
  fp16  0.999  (seen 0.9999997: fp16 storage error only)
  bf16  0.995  (torch estimate, seen 0.99996)
  int8  0.99   (seen 0.9990; the same bound as the CPU target's INT8 dynamic quantization)
  fp8   0.97   (seen 0.993; FP8 also quantizes the attention BMMs, and e4m3 keeps 3 mantissa bits)
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from af3trt.export import onnx_quant as oq
from af3trt.export.onnx_export import export_encoder
from af3trt.registry import GPU_ENCODER_PRECISIONS
from af3trt.runtime import assets
from af3trt.runtime.stages.audio import decode_audio, prepare_clips
from af3trt.runtime.engines.encoder import OnnxEncoder


@pytest.fixture(scope="module")
def fp32(tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("quant") / "encoder.onnx"
    export_encoder(tiny_ckpt, out)
    return out


@pytest.fixture(scope="module")
def calib():
    return oq.calibration_set()


def io_signature(path):
    m = onnx.load(str(path), load_external_data=False)
    return [(v.name, v.type.tensor_type.elem_type, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim])
            for v in (*m.graph.input, *m.graph.output)]


def test_calibration_uses_real_audio(calib):
    calib_clips, held_clips = oq.bundled_clips()
    speech = decode_audio(assets.speech_path().read_bytes())
    half = len(speech) // 2
    # the clips are cut from the bundled recording: first half for calibration, second half held out
    np.testing.assert_allclose(decode_audio(calib_clips[0]), speech[:half], atol=1e-7)
    np.testing.assert_allclose(decode_audio(held_clips[0]), speech[half:], atol=1e-7)
    # and featurised by the serving front end
    want = prepare_clips([calib_clips[0]])
    T = want.features.shape[2]  # cropped to its frame bucket, then padded to the full window of the batch
    assert T == 300
    np.testing.assert_array_equal(calib.features[0, :, :T], want.features[0])
    np.testing.assert_array_equal(calib.features[0, :, T:], np.repeat(want.features[0, :, -1:], 3000 - T, axis=1))
    np.testing.assert_array_equal(calib.mask[0, :T], want.mask[0])
    assert calib.mask[0, T:].sum() == 0
    assert calib.features.shape == (3, 128, 3000) and calib.held_features.shape == (3, 128, 3000)
    assert calib.mask.sum(1).tolist() == [251, 251, 3000] == calib.held_mask.sum(1).tolist()  # padded and full
    for h in calib.held_features:  # no held-out window is a calibration window
        assert all(not np.array_equal(h, c) for c in calib.features)
    assert "bundled" in calib.describe()["source"]


def test_user_audio_is_split_by_file(speech_bytes):
    s = oq.calibration_set([speech_bytes] * 4)
    assert (len(s.features), len(s.held_features)) == (3, 1)
    with pytest.raises(oq.OnnxQuantError, match="at least 2"):
        oq.calibration_set([speech_bytes])


@pytest.mark.slow
def test_fp16_cast_parity(fp32, calib, tmp_path):
    path, fig = oq.prepare_encoder(fp32, tmp_path, "fp16", calib=calib)
    assert io_signature(path) == io_signature(fp32)  # float32 features/mask in, float32 audio_embeds out
    assert fig["initializer_types"].get("FLOAT16", 0) > 0 and "FLOAT" not in fig["initializer_types"]
    assert len(fig["clamped_constants"]) == 1  # the -3.4e38 mask bias (AudioEmbedder.forward), now -65504
    model = onnx.load(str(path))
    consts = [onnx.numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node if n.op_type == "Constant"]
    assert all(np.isfinite(c.astype(np.float32)).all() for c in consts if c.dtype == np.float16)
    v = fig["validation"]
    assert v["method"] == "ort-cpu" and not v["estimate"] and v["all_finite"]
    assert v["cosine"] > 0.9999 and v["min_row_cosine"] > 0.999 and v["max_abs_diff"] < 0.01 * v["max_abs_ref"]
    enc = OnnxEncoder(path)  # the CPU runner takes it too
    assert enc.metadata["af3trt.export_dtype"] == "float16" and enc.hidden_size == 64


@pytest.mark.slow
def test_bf16_cast_and_torch_estimate(fp32, calib, tiny_ckpt, tmp_path):
    path, fig = oq.prepare_encoder(fp32, tmp_path, "bf16", calib=calib, hf_dir=tiny_ckpt)
    assert io_signature(path) == io_signature(fp32)
    assert fig["initializer_types"].get("BFLOAT16", 0) > 0 and fig["opset"] >= 22
    v = fig["validation"]
    assert v["method"] == "torch-bf16" and v["estimate"]  # labelled: the bf16 graph itself cannot run on ORT CPU
    assert v["cosine"] > GPU_ENCODER_PRECISIONS["bf16"].min_cosine and v["all_finite"]
    with pytest.raises(oq.OnnxQuantError, match="hf_dir"):
        oq.validate_variant(path, fp32, "bf16", calib)


def quantized_weights(path) -> list[tuple[str, np.ndarray, np.ndarray, int, int]]:
    """(name, float weight, scale, axis, zero-point type) for every QuantizeLinear of a float initializer: modelopt's
    ONNX PTQ keeps the weights float and quantizes them in the graph, per channel along `axis`."""
    m = onnx.load(str(path))
    inits = {i.name: i for i in m.graph.initializer}
    out = []
    for n in m.graph.node:
        if n.op_type == "QuantizeLinear" and n.input[0] in inits:
            w = onnx.numpy_helper.to_array(inits[n.input[0]]).astype(np.float32)
            scale = onnx.numpy_helper.to_array(inits[n.input[1]]).astype(np.float32)
            axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
            out.append((n.input[0], w, scale, axis % w.ndim, inits[n.input[2]].data_type))
    return out


def per_channel(x: np.ndarray, axis: int) -> np.ndarray:
    """x: [.., C (axis), ..] -> the channel axis last, flattened: [N, C]."""
    return np.moveaxis(x, axis, -1).reshape(-1, x.shape[axis])


@pytest.mark.slow
def test_int8_qdq_runs_in_ort(fp32, calib, tmp_path):
    path, fig = oq.prepare_encoder(fp32, tmp_path, "int8", calib=calib)
    assert io_signature(path) == io_signature(fp32)
    assert fig["qdq_nodes"].get("INT8", 0) > 0 and fig["calibration"]["calibration_windows"] == 3
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    v = fig["validation"]
    assert v["method"] == "ort-cpu" and not v["estimate"] and v["held_out_windows"] == 3
    assert v["cosine"] > GPU_ENCODER_PRECISIONS["int8"].min_cosine and v["all_finite"]
    assert v["max_abs_diff"] > 0  # really quantized
    assert OnnxEncoder(path).quantization == "int8-qdq"
    # every quantized weight at the scale its own range gives: per channel amax / 127 (symmetric INT8), so the
    # rounded weight reaches +-127 in every channel and uses more than half of the 255 levels (measured on the 16
    # weights: scale / (amax / 127) 0.999-1.001, 246-255 levels)
    weights = quantized_weights(path)
    assert len(weights) >= 10
    for name, w, scale, axis, zp in weights:
        assert zp == TensorProto.INT8 and scale.shape == (w.shape[axis],), name
        cols = per_channel(w, axis)  # [N, C]
        np.testing.assert_allclose(scale, np.abs(cols).max(0) / 127, rtol=1e-2, err_msg=name)
        q = np.clip(np.round(cols / scale), -127, 127)
        assert (np.abs(q).max(0) >= 126).all() and len(np.unique(q)) > 255 // 2, name
        assert np.mean(q * scale != cols) > 0.5, name  # rounded, not stored as is


@pytest.mark.slow
def test_fp8_qdq_runs_at_opset_21(fp32, calib, tmp_path):
    path, fig = oq.prepare_encoder(fp32, tmp_path, "fp8", calib=calib)
    assert io_signature(path) == io_signature(fp32)
    assert fig["qdq_nodes"].get("FLOAT8E4M3FN", 0) > 0 and fig["opset"] == oq.FP8_OPSET
    onnx.checker.check_model(str(path), full_check=True)
    v = fig["validation"]
    assert v["method"] == "ort-cpu-fp8-qdq" and not v["estimate"]
    assert v["cosine"] > GPU_ENCODER_PRECISIONS["fp8"].min_cosine and v["all_finite"]
    assert v["max_abs_diff"] > 0  # really quantized
    # every quantized weight in e4m3 at a per-channel scale of its own: no weight saturates (|w| / scale <= 448), the
    # rounded weights are not the float ones and use many e4m3 codes (measured on the 16 weights: 144-189 codes).
    # The scale follows the data's spread (ORT's float8 rule, not amax / 448: measured amax / scale = 36), hence no amax
    # check here.
    import ml_dtypes

    weights = quantized_weights(path)
    assert len(weights) >= 10
    for name, w, scale, axis, zp in weights:
        assert zp == TensorProto.FLOAT8E4M3FN and scale.shape == (w.shape[axis],), name
        assert np.isfinite(scale).all() and (scale > 0).all() and not np.allclose(scale, 1.0), name
        cols = per_channel(w, axis) / scale  # [N, C] in e4m3 units
        assert np.abs(cols).max() <= 448, name
        q = cols.astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
        assert np.mean(q != cols) > 0.5 and len(np.unique(q)) > 64, name


def test_ort_fp8_qdq_rounds_like_e4m3():
    """The FP8 figures rest on ORT CPU's QuantizeLinear/DequantizeLinear to float8e4m3fn: check that it really
    rounds to e4m3 (and saturates at 448) rather than passing values through."""
    import ml_dtypes

    scale = np.float32(0.05)
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"]),
         helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"])],
        "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])],
        [helper.make_tensor("s", TensorProto.FLOAT, [], [float(scale)]),
         helper.make_tensor("zp", TensorProto.FLOAT8E4M3FN, [], [0.0])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", oq.FP8_OPSET)])
    x = np.random.default_rng(0).standard_normal(1000).astype(np.float32) * 10
    x[:2] = [100.0, -100.0]  # beyond 448 * scale: saturated
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    y = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    want = np.clip(x / scale, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * scale
    np.testing.assert_array_equal(y, want)
    assert not np.array_equal(y, x) and y[0] == np.float32(448) * scale and y[1] == -y[0]


def test_clamp_float_constants():
    model = helper.make_model(helper.make_graph(
        [helper.make_node("Constant", [], ["c"],
                          value=helper.make_tensor("v", TensorProto.FLOAT, [2], [-3.4e38, 1.0]))],
        "g", [], [helper.make_tensor_value_info("c", TensorProto.FLOAT, [2])]))
    assert oq.clamp_float_constants(model, 65504.0) == ["c"]
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(model.graph.node[0].attribute[0].t), [-65504.0, 1.0])


@pytest.mark.slow
def test_bad_requests(fp32, calib, tmp_path):
    with pytest.raises(oq.OnnxQuantError, match="precision"):
        oq.prepare_encoder(fp32, tmp_path, "int4", calib=calib)
    with pytest.raises(oq.OnnxQuantError, match="bf16 remainder"):
        oq.quantize_encoder(fp32, tmp_path / "x.onnx", "int8", calib, high_precision="bf16")
    assert oq.prepare_encoder(fp32, tmp_path, "fp32") == (fp32, {"precision": "fp32", "onnx_path": str(fp32)})
