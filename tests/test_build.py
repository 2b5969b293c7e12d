"""build_engines.py on the tiny checkpoint: the repository, the manifest, and safe re-runs."""

from __future__ import annotations

import json
import os

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


def test_a_truncated_checkpoint_is_one_line_naming_the_file(tmp_path, tiny_ckpt, capsys):
    """A model.safetensors cut short (a download or copy interrupted) ended the build in safetensors' traceback
    ("incomplete metadata"); now it is one line naming the file, exit status 2, before any work."""
    import shutil

    for cut in (0.6, 4 / 1e9):  # the data cut short; the header itself cut short
        ckpt = tmp_path / f"ckpt-{cut}"
        shutil.copytree(tiny_ckpt, ckpt)
        weights = ckpt / "model.safetensors"
        data = weights.read_bytes()
        weights.write_bytes(data[: max(4, int(len(data) * cut))])
        with pytest.raises(SystemExit) as e:
            main(["--hf-model", str(ckpt), "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err
        assert str(weights) in err and "not a whole safetensors file" in err
        assert not (tmp_path / "o").exists()


def test_stale_scratch_folders_are_removed_and_a_running_builds_reported(tmp_path, capsys):
    import subprocess
    import sys

    from af3trt.build.build_engines import clean_stale_scratch

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a PID no process has now
    stale, other = tmp_path / f".af3.building-{gone.pid}", tmp_path / f".af3.old-{gone.pid}"
    running = tmp_path / f".af3.building-{os.getppid()}"  # a live process: another build's folder
    for d in (stale, other, running):
        (d / "artifacts").mkdir(parents=True)
    assert clean_stale_scratch(tmp_path / "af3") == [stale, other]
    assert not stale.exists() and not other.exists() and running.exists()
    out = capsys.readouterr().out
    assert f"removed {stale}" in out and "still running" in out


@pytest.mark.slow
def test_sigterm_removes_the_scratch_folder_as_ctrl_c_does(tmp_path, tiny_ckpt):
    """`af3trt build` stopped by SIGTERM left `.OUT.building-PID` behind (with the real checkpoint, an ONNX encoder and
    a 15-GB language model each time); now SIGTERM unwinds like Ctrl-C and removes it. The same build first
    removes a stale folder that a SIGKILLed build left."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "af3"
    stale = tmp_path / ".af3.building-999999999"
    (stale / "artifacts").mkdir(parents=True)
    proc = subprocess.Popen([sys.executable, "-m", "af3trt.cli", "build", "--hf-model", str(tiny_ckpt), "--out",
                             str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    scratch = tmp_path / f".af3.building-{proc.pid}"
    deadline = time.monotonic() + 600
    while not (scratch / "artifacts").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, log  # stopped by the signal, mid-build
    assert not scratch.exists() and not out.exists(), log
    assert not stale.exists() and f"removed {stale}" in log
