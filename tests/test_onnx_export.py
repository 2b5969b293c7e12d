"""Encoder export: ONNX vs transformers on the tiny checkpoint, the validation that guards it, the CPU runner."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import pytest
import torch
from safetensors.torch import load_file, save_file

from af3trt.export import onnx_export
from af3trt.export.onnx_export import (ExportValidationError, export_encoder, load_audio_embedder, make_inputs,
                                       quantize_encoder_dynamic, validate_encoder)
from af3trt.runtime.encoder import OnnxEncoder
from af3trt.runtime.lengths import embeds_valid_per_window


@pytest.fixture(scope="module")
def exported(tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("encoder") / "encoder.onnx"
    return out, export_encoder(tiny_ckpt, out)


def test_export_figures_within_tolerance(exported):
    path, fig = exported
    assert fig["opset"] == 18 and fig["hidden_size"] == 64 and fig["checkpoint_dtype"] == "float32"
    assert fig["windows_tested"] == 3 != fig["export_windows"]
    assert fig["valid_rows"] == [750, 175, 375]  # full, 700 frames, 1501 frames
    assert fig["max_abs_diff"] <= fig["atol"] + fig["rtol"] * fig["max_abs_ref"]
    assert fig["cosine"] >= 0.99999 and fig["min_row_cosine"] > 0.9999 and fig["all_finite"]
    assert fig["onnx_bytes"] == path.stat().st_size and not fig["external_data"]
    json.dumps(fig)  # goes into the build manifest


def test_onnx_io_contract(exported):
    path, _ = exported
    model = onnx.load(str(path))
    io = [(v.name, v.type.tensor_type.elem_type, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim])
          for v in (*model.graph.input, *model.graph.output)]
    assert io == [("input_features", onnx.TensorProto.FLOAT, ["W", 128, 3000]),
                  ("input_features_mask", onnx.TensorProto.INT32, ["W", 3000]),
                  ("audio_embeds", onnx.TensorProto.FLOAT, ["W", 750, 64])]
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [18]
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["af3trt.hidden_size"] == "64" and meta["af3trt.checkpoint_dtype"] == "float32"

    enc = OnnxEncoder(path, intra_op_threads=1)
    assert (enc.hidden_size, enc.num_mel_bins, enc.frames, enc.rows_per_window) == (64, 128, 3000, 750)
    assert enc.checkpoint_dtype == "float32" and enc.quantization is None


def test_matches_transformers_get_audio_features(exported, tiny_ckpt):
    from transformers import AudioFlamingo3ForConditionalGeneration

    frames = [700, 3000, 3]  # partial, full, a 3-frame tail (1 row)
    features, mask = make_inputs(128, 3000, frames, seed=7)
    got = OnnxEncoder(exported[0]).run(features, mask)  # [3, 750, 64]
    got = np.concatenate([got[w, :embeds_valid_per_window(n)] for w, n in enumerate(frames)])

    model = AudioFlamingo3ForConditionalGeneration.from_pretrained(tiny_ckpt).eval()
    with torch.no_grad():
        want = model.get_audio_features(torch.from_numpy(features), torch.from_numpy(mask)).pooler_output.numpy()
    assert got.shape == want.shape == (175 + 750 + 1, 64)
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)
    cos = (got * want).sum() / (np.linalg.norm(got) * np.linalg.norm(want))
    assert cos > 0.99999


def test_zero_windows_do_not_call_ort(exported, monkeypatch):
    enc = OnnxEncoder(exported[0])
    monkeypatch.setattr(enc.session, "run", lambda *a, **k: pytest.fail("ORT called for W=0"))
    out = enc.run(np.zeros((0, 128, 3000), np.float32), np.zeros((0, 3000), np.int32))
    assert out.shape == (0, 750, 64) and out.dtype == np.float32


@pytest.mark.parametrize("features, mask, match", [
    (np.zeros((1, 128, 3000), np.float64), np.ones((1, 3000), np.int32), "float32"),
    (np.zeros((1, 128, 3000), np.float32), np.ones((1, 3000), np.int64), "int32"),
    (np.zeros((1, 80, 3000), np.float32), np.ones((1, 3000), np.int32), r"\[W, 128, 3000\]"),
    (np.zeros((128, 3000), np.float32), np.ones((1, 3000), np.int32), r"\[W, 128, 3000\]"),
    (np.zeros((2, 128, 3000), np.float32), np.ones((1, 3000), np.int32), r"\[W=2, 3000\]"),
    ([[0.0]], np.ones((1, 3000), np.int32), "numpy"),
])
def test_run_rejects_bad_inputs(exported, features, mask, match):
    with pytest.raises(ValueError, match=match):
        OnnxEncoder(exported[0]).run(features, mask)


def test_validation_raises_on_perturbed_weights(exported, tiny_ckpt):
    model, _ = load_audio_embedder(tiny_ckpt)
    spec = onnx_export.encoder_spec(model.config)
    with torch.no_grad():
        model.multi_modal_projector.linear_2.bias += 0.05
    with pytest.raises(ExportValidationError, match="above tolerance") as err:
        validate_encoder(exported[0], model, spec)
    assert err.value.figures["max_abs_diff"] > 0.04


def test_export_raises_on_tiny_tolerance(tiny_ckpt, tmp_path, monkeypatch):
    strict = onnx_export.encoder_spec
    monkeypatch.setattr(onnx_export, "encoder_spec",
                        lambda config, **kw: dataclasses.replace(strict(config, **kw), atol=0.0, rtol=0.0))
    with pytest.raises(ExportValidationError, match="max abs diff"):
        export_encoder(tiny_ckpt, tmp_path / "encoder.onnx")


def test_check_io_rejects_undeclared_dynamic_axis(exported, tiny_ckpt, tmp_path):
    from transformers import AudioFlamingo3Config

    model = onnx.load(str(exported[0]))
    model.graph.output[0].type.tensor_type.shape.dim[1].dim_param = "rows"
    onnx.save(model, str(tmp_path / "loose.onnx"))
    spec = onnx_export.encoder_spec(AudioFlamingo3Config.from_pretrained(tiny_ckpt))
    with pytest.raises(ExportValidationError, match="outputs"):
        onnx_export.check_io(tmp_path / "loose.onnx", spec)


def test_sharded_bf16_checkpoint_with_external_data(exported, tiny_ckpt, tmp_path):
    """The real checkpoint's shape of things: bf16, sharded with an index, and here the `model.`-prefixed layout."""
    ckpt = tmp_path / "sharded"
    ckpt.mkdir()
    (ckpt / "config.json").write_text((tiny_ckpt / "config.json").read_text())
    tensors = {f"model.{k}": v.to(torch.bfloat16) for k, v in load_file(tiny_ckpt / "model.safetensors").items()}
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, ckpt / file)
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: file for file, keys in shards.items() for k in keys}}))

    out = tmp_path / "onnx" / "encoder.onnx"
    fig = export_encoder(ckpt, out, external_data=True)
    assert fig["checkpoint_dtype"] == "bfloat16" and fig["export_dtype"] == "float32" and fig["external_data"]
    assert (out.parent / "encoder.onnx.data").is_file() and sorted(p.name for p in out.parent.iterdir()) == [
        "encoder.onnx", "encoder.onnx.data"]
    enc = OnnxEncoder(out)
    assert enc.checkpoint_dtype == "bfloat16" and enc.hidden_size == 64


def test_int8_dynamic_quantization(exported, tmp_path):
    out = tmp_path / "encoder.int8.onnx"
    fig = quantize_encoder_dynamic(exported[0], out)
    assert fig["cosine"] > 0.99 and fig["all_finite"] and fig["quantization"] == "int8-dynamic"
    assert fig["windows_tested"] == 3 and fig["max_abs_diff"] > 0  # it is really quantized
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops or "DynamicQuantizeMatMul" in ops
    enc = OnnxEncoder(out)
    assert enc.quantization == "int8-dynamic" and enc.hidden_size == 64 and enc.checkpoint_dtype == "float32"
    json.dumps(fig)
