"""build_engines.py on the tiny checkpoint: the repository, the manifest, and safe re-runs."""

from __future__ import annotations

import json

import pytest

from af3trt.build.build_engines import BuildError, BuildOptions, ServingConfig, build, main
from af3trt.triton_repo import configs


@pytest.fixture(scope="module")
def built(tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("b") / "af3"
    build(BuildOptions(hf_model=tiny_ckpt, out=out, serving=ServingConfig(max_audio_seconds=60, max_text_len=256)))
    return out


@pytest.mark.slow
def test_repository_and_manifest(built, tiny_ckpt):
    repo = built / "model_repository"
    assert sorted(p.name for p in repo.iterdir()) == sorted([configs.ENSEMBLE, *configs.STAGES, configs.CANCEL])
    for stage in (*configs.STAGES, configs.CANCEL):
        cfg = configs.parse((repo / stage / "config.pbtxt").read_text())
        assert cfg.name == stage
        assert (repo / stage / "1" / "model.py").read_text().startswith('"""Triton adapter')
    m = json.loads((built / "manifest.json").read_text())
    assert m["target"] == "cpu"
    assert {"torch", "transformers", "onnxruntime", "numpy", "af3trt"} <= set(m["versions"])
    assert len(m["checkpoint"]["sha256"]) == 64 and "model.safetensors" in m["checkpoint"]["files"]
    cfg = json.loads((tiny_ckpt / "config.json").read_text())
    assert m["checkpoint"]["config"]["vocab_size"] == cfg["text_config"]["vocab_size"]
    assert m["limits"]["max_audio_windows"] == 2 and m["limits"]["max_input_len"] == 256 + 2 * 750
    onnx = m["validation"]["encoder_onnx"]
    assert onnx["max_abs_diff"] < 1e-3 and onnx["cosine"] > 0.99999
    assert m["precisions"]["prompt_table"] == m["language_model"]["dtype"] == "float32"
    fusion = configs.parse((repo / "fusion" / "config.pbtxt").read_text())
    assert fusion.parameters["vocab_size"].string_value == str(cfg["text_config"]["vocab_size"])
    assert fusion.parameters["max_input_len"].string_value == str(256 + 2 * 750)
    assert (built / fusion.parameters["tokenizer_dir"].string_value / "tokenizer.json").exists()
    assert set(m["timings_s"]) and not list(built.parent.glob(".af3.*"))
    preprocess = configs.parse((repo / "preprocess" / "config.pbtxt").read_text())
    assert preprocess.parameters["crop_frames"].string_value == "true"  # windows cropped to their frame bucket
    assert [list(o.dims) for o in preprocess.output][:2] == [[-1, 128, -1], [-1, -1]]  # [W, 128, T], [W, T]


def test_no_crop_frames_option():
    from af3trt.build.build_engines import parser

    assert parser().parse_args(["--no-crop-frames"]).crop_frames is False
    assert parser().parse_args([]).crop_frames is True


@pytest.mark.slow
def test_existing_output_is_refused_then_replaced_atomically(built, tiny_ckpt, monkeypatch):
    with pytest.raises(BuildError, match="exists"):
        build(BuildOptions(hf_model=tiny_ckpt, out=built))
    before = json.loads((built / "manifest.json").read_text())["created_unix"]

    # a failing --force build leaves the previous output untouched and no scratch directory behind
    def boom(*a, **k):
        raise RuntimeError("extraction failed")

    monkeypatch.setattr("af3trt.export.extract_lm.extract_language_model", boom)
    with pytest.raises(RuntimeError, match="extraction failed"):
        build(BuildOptions(hf_model=tiny_ckpt, out=built, force=True))
    assert json.loads((built / "manifest.json").read_text())["created_unix"] == before
    assert [p.name for p in built.parent.iterdir()] == ["af3"]
    monkeypatch.undo()

    build(BuildOptions(hf_model=tiny_ckpt, out=built, force=True,
                       serving=ServingConfig(max_audio_seconds=60, max_text_len=256)))
    assert (built / "model_repository" / "af3" / "config.pbtxt").exists()
    assert [p.name for p in built.parent.iterdir()] == ["af3"]


def test_bad_inputs_are_clear(tmp_path, tiny_ckpt, capsys):
    with pytest.raises(BuildError, match="not a directory"):
        build(BuildOptions(hf_model=tmp_path / "nope", out=tmp_path / "o"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(BuildError, match="no config.json"):
        build(BuildOptions(hf_model=tmp_path / "empty", out=tmp_path / "o"))
    with pytest.raises(ValueError, match="max-audio-seconds"):
        ServingConfig(max_audio_seconds=601)
    with pytest.raises(SystemExit):  # the same check, as a usage error
        main(["--hf-model", str(tiny_ckpt), "--out", str(tmp_path / "o"), "--max-audio-seconds", "601"])
    with pytest.raises(SystemExit):
        main(["--hf-model", str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
    assert "error:" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
