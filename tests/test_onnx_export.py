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
from af3trt.runtime.engines.encoder import OnnxEncoder
from af3trt.runtime.stages import lengths
from af3trt.runtime.stages.lengths import embeds_valid_per_window


@pytest.fixture(scope="module")
def exported(tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("encoder") / "encoder.onnx"
    return out, export_encoder(tiny_ckpt, out)


def test_export_figures_within_tolerance(exported):
    path, fig = exported
    assert fig["opset"] == 18 and fig["hidden_size"] == 64 and fig["checkpoint_dtype"] == "float32"
    assert fig["windows_tested"] == 4 != fig["export_windows"]
    assert fig["valid_rows"] == [750, 175, 375, 24]  # full, 700 frames, 1501 frames, 98 frames
    # validation covers several T: the full window, and each shorter window's bucket (none is the traced 1200)
    assert fig["frames_tested"] == [3000, 1600, 800, 100] and onnx_export.TRACE_FRAMES not in fig["frames_tested"]
    assert set(fig["per_frames"]) == {"3000", "1600", "800", "100"}
    assert all(f["max_abs_diff"] <= fig["atol"] + fig["rtol"] * fig["max_abs_ref"] for f in fig["per_frames"].values())
    assert fig["max_abs_diff"] <= fig["atol"] + fig["rtol"] * fig["max_abs_ref"]
    assert fig["cosine"] >= 0.99999 and fig["min_row_cosine"] > 0.9999 and fig["all_finite"]
    assert fig["onnx_bytes"] == path.stat().st_size and not fig["external_data"]
    json.dumps(fig)  # goes into the build manifest


def test_onnx_io_contract(exported):
    path, _ = exported
    model = onnx.load(str(path))
    io = [(v.name, v.type.tensor_type.elem_type, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim])
          for v in (*model.graph.input, *model.graph.output)]
    assert io == [("input_features", onnx.TensorProto.FLOAT, ["W", 128, "T"]),
                  ("input_features_mask", onnx.TensorProto.INT32, ["W", "T"]),
                  ("audio_embeds", onnx.TensorProto.FLOAT, ["W", "R", 64])]
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [18]
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["af3trt.hidden_size"] == "64" and meta["af3trt.checkpoint_dtype"] == "float32"
    assert meta["af3trt.max_frames"] == "3000"

    enc = OnnxEncoder(path, intra_op_threads=1)
    assert (enc.hidden_size, enc.num_mel_bins, enc.max_frames, enc.dynamic_frames) == (64, 128, 3000, True)
    assert enc.rows(3000) == 750 and enc.rows(100) == 25
    assert enc.checkpoint_dtype == "float32" and enc.quantization is None


def test_matches_transformers_get_audio_features(exported, ref):
    frames = [700, 3000, 3]  # partial, full, a 3-frame tail (1 row)
    features, mask = make_inputs(128, 3000, frames, seed=7)
    got = OnnxEncoder(exported[0]).run(features, mask)  # [3, 750, 64]
    got = np.concatenate([got[w, :embeds_valid_per_window(n)] for w, n in enumerate(frames)])

    model = ref.model  # transformers' AF3, loaded once per session (conftest)
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
    assert enc.run(np.zeros((0, 128, 400), np.float32), np.zeros((0, 400), np.int32)).shape == (0, 100, 64)


@pytest.mark.parametrize("features, mask, match", [
    (np.zeros((1, 128, 3000), np.float64), np.ones((1, 3000), np.int32), "float32"),
    (np.zeros((1, 128, 3000), np.float32), np.ones((1, 3000), np.int64), "int32"),
    (np.zeros((1, 80, 3000), np.float32), np.ones((1, 3000), np.int32), r"\[W, 128, T\]"),
    (np.zeros((128, 3000), np.float32), np.ones((1, 3000), np.int32), r"\[W, 128, T\]"),
    (np.zeros((2, 128, 3000), np.float32), np.ones((1, 3000), np.int32), r"\[W=2, T=3000\]"),
    (np.zeros((1, 128, 800), np.float32), np.ones((1, 900), np.int32), r"\[W=1, T=800\]"),
    (np.zeros((1, 128, 3002), np.float32), np.ones((1, 3002), np.int32), r"even number of frames T in 2..3000"),
    (np.zeros((1, 128, 801), np.float32), np.ones((1, 801), np.int32), r"even number of frames"),
    ([[0.0]], np.ones((1, 3000), np.int32), "numpy"),
])
def test_run_rejects_bad_inputs(exported, features, mask, match):
    with pytest.raises(ValueError, match=match):
        OnnxEncoder(exported[0]).run(features, mask)


@pytest.mark.slow
def test_validation_raises_on_perturbed_weights(exported, tiny_ckpt):
    model, _ = load_audio_embedder(tiny_ckpt)
    spec = onnx_export.encoder_spec(model.config)
    with torch.no_grad():
        model.multi_modal_projector.linear_2.bias += 0.05
    with pytest.raises(ExportValidationError, match="above tolerance") as err:
        validate_encoder(exported[0], model, spec)
    assert err.value.figures["max_abs_diff"] > 0.04


@pytest.mark.slow
def test_export_raises_on_tiny_tolerance(tiny_ckpt, tmp_path, monkeypatch):
    strict = onnx_export.encoder_spec
    monkeypatch.setattr(onnx_export, "encoder_spec",
                        lambda config, **kw: dataclasses.replace(strict(config, **kw), atol=0.0, rtol=0.0))
    with pytest.raises(ExportValidationError, match="max abs diff"):
        export_encoder(tiny_ckpt, tmp_path / "encoder.onnx")


def test_check_io_rejects_undeclared_dynamic_axis(exported, tiny_ckpt, tmp_path):
    from transformers import AudioFlamingo3Config

    model = onnx.load(str(exported[0]))
    model.graph.output[0].type.tensor_type.shape.dim[2].dim_param = "hidden"
    onnx.save(model, str(tmp_path / "loose.onnx"))
    spec = onnx_export.encoder_spec(AudioFlamingo3Config.from_pretrained(tiny_ckpt))
    with pytest.raises(ExportValidationError, match="outputs"):
        onnx_export.check_io(tmp_path / "loose.onnx", spec)


@pytest.mark.slow
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


@pytest.mark.slow
def test_int8_dynamic_quantization(exported, tmp_path):
    out = tmp_path / "encoder.int8.onnx"
    fig = quantize_encoder_dynamic(exported[0], out)
    assert fig["cosine"] > 0.99 and fig["all_finite"] and fig["quantization"] == "int8-dynamic"
    assert fig["windows_tested"] == 4 and fig["max_abs_diff"] > 0  # it is really quantized
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops or "DynamicQuantizeMatMul" in ops
    enc = OnnxEncoder(out)
    assert enc.quantization == "int8-dynamic" and enc.hidden_size == 64 and enc.checkpoint_dtype == "float32"
    json.dumps(fig)


# ---------------------------------------------------------------------------------------------------------------
# Variable-length encoding: a window cropped to its frame bucket keeps exactly the full window's tokens

def _kept_lengths() -> list[int]:
    """1 sample (1 frame) … 30 s, a few speech-like lengths, and both sides of every bucket edge: L = b - 2 (exactly
    L + 2 = b) and L = b - 1 (the next bucket)."""
    edges = [b + d for b in lengths.FRAME_BUCKETS for d in (-2, -1)]
    return sorted({1, 3, 4, 501, 985, 1000, 2999, 3000, *edges} - {0})


@pytest.mark.slow
def test_cropped_windows_keep_the_full_window_embeddings(exported):
    enc = OnnxEncoder(exported[0], intra_op_threads=1)
    valid = _kept_lengths()
    features, mask = make_inputs(128, 3000, valid, seed=3)  # padded frames hold a constant, as log-mel padding does
    full = enc.run(features, mask)  # [W, 750, H], the fixed-shape computation
    worst = 0.0
    for w, L in enumerate(valid):
        T, rows = lengths.frame_bucket(L), embeds_valid_per_window(L)
        assert T >= min(L + 2, 3000)
        cropped = enc.run(features[w: w + 1, :, :T].copy(), mask[w: w + 1, :T].copy())  # [1, T/4, H]
        assert cropped.shape == (1, T // 4, 64)
        diff = float(np.abs(cropped[0, :rows] - full[w, :rows]).max()) if rows else 0.0
        assert diff <= 1e-5, f"L={L} T={T}: max |diff| {diff:.3g}"
        worst = max(worst, diff)
    print(f"cropped vs full window, {len(valid)} lengths: max |diff| {worst:.3g}")


@pytest.mark.parametrize("L", [501, 985, 1499])
def test_crop_margin_is_two_frames(exported, L):
    """At T = L + 2 (and any larger T) the kept rows are the full window's; one frame less (T = L + 1) is not enough:
    the last valid conv position sees frame L + 1, which the crop replaces by conv1's zero padding."""
    enc = OnnxEncoder(exported[0], intra_op_threads=1)
    features, mask = make_inputs(128, 3000, [L], seed=4)
    rows = embeds_valid_per_window(L)
    full = enc.run(features, mask)[0, :rows]
    diff = {T: float(np.abs(enc.run(features[:, :, :T].copy(), mask[:, :T].copy())[0, :rows] - full).max())
            for T in (L + 1, L + 3)}  # L odd: both even
    assert diff[L + 3] <= 1e-5
    assert diff[L + 1] > 1e-4


def test_windows_of_different_lengths_padded_to_the_longest(exported):
    """One batch at the longest window's bucket (shorter windows padded with an empty mask, as the encoder model
    pads requests of different buckets) gives each window its own bucket's rows."""
    from af3trt.runtime.engines.encoder import pad_frames

    enc = OnnxEncoder(exported[0], intra_op_threads=1)
    valid = [1, 98, 501, 1499]
    features, mask = make_inputs(128, 3000, valid, seed=5)
    parts = [(features[w: w + 1, :, :lengths.frame_bucket(L)], mask[w: w + 1, :lengths.frame_bucket(L)])
             for w, L in enumerate(valid)]
    f, m = pad_frames([p[0] for p in parts], [p[1] for p in parts])
    assert f.shape == (4, 128, 1600) and m.shape == (4, 1600) and m.sum(1).tolist() == valid
    batched = enc.run(f, m)
    for w, (pf, pm) in enumerate(parts):
        rows = embeds_valid_per_window(valid[w])
        alone = enc.run(np.ascontiguousarray(pf), np.ascontiguousarray(pm))[0, :rows]
        assert float(np.abs(batched[w, :rows] - alone).max(initial=0.0)) <= 1e-5
