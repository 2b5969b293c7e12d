"""`af3trt doctor`: each check against fakes that reproduce the facts it relies on (runtime/serve/doctor.py has the
sources), the CPU repository passing here for real, and the hooks in `af3trt serve` and the GPU build."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from af3trt.runtime.serve import doctor
from af3trt.registry import KNOWN_GPUS
from af3trt.runtime.serve.doctor import Check, check_backends, check_python_stub, diagnose, repository_models
from af3trt.triton_repo import configs

GIB = 1024**3
HERE_PY = f"{sys.version_info.major}.{sys.version_info.minor}"
VERSIONS = {"torch": "2.9.1", "tensorrt": "10.14.1.48", "tensorrt_llm": "1.2.1", "modelopt": "0.37.0"}
H100, A100 = KNOWN_GPUS["h100"], KNOWN_GPUS["a100"]


def fake_container_backends(root: Path, python: str = "3.12") -> Path:
    """The backend directory of tritonserver:26.04-trtllm-python-py3: tensorrtllm and python only (no tensorrt),
    with a python stub linked against the container's libpython."""
    d = root / "backends"
    for name in ("tensorrtllm", "python"):
        (d / name).mkdir(parents=True)
        (d / name / f"libtriton_{name}.so").write_bytes(b"\x7fELF")
    (d / "python" / "triton_python_backend_stub").write_bytes(b"\x7fELF...libpython" + python.encode() + b".so.1.0\0")
    return d


def write_repo(root: Path, encoder: str, manifest: dict | None = None, engine_version: str = "1.2.1") -> Path:
    """A GPU repository's configs: the encoder as `tensorrt_plan` (what the GPU target rendered before issue 7) or
    a python model; the decoder as the tensorrtllm backend with an engine directory."""
    repo = root / "model_repository"
    engine = root / "artifacts" / "engine"
    engine.mkdir(parents=True)
    (engine / "config.json").write_text(json.dumps({"version": engine_version}))
    cfgs = {
        "encoder": configs.mc.ModelConfig(name="encoder", **({"platform": "tensorrt_plan"} if encoder == "plan"
                                                              else {"backend": "python"})),
        "decoder": configs.mc.ModelConfig(name="decoder", backend="tensorrtllm"),
        "fusion": configs.mc.ModelConfig(name="fusion", backend="python"),
        "af3": configs.mc.ModelConfig(name="af3", platform="ensemble"),
    }
    cfgs["decoder"].parameters["gpt_model_path"].string_value = str(engine)
    for name, cfg in cfgs.items():
        (repo / name).mkdir(parents=True)
        (repo / name / "config.pbtxt").write_text(configs.render(cfg))
    (root / "manifest.json").write_text(json.dumps(manifest or {"target": "gpu"}))
    return repo


def gpu_manifest(**over) -> dict:
    m = {"target": "gpu",
         "gpu": {"options": {"precision": "fp8", "kv_cache": "fp8", "encoder_precision": "fp16", "tp_size": 1},
                 "target": {"name": H100.name, "compute_capability": [9, 0]},
                 "memory_plan": {"total": 40 * GIB, "kv_cache_tokens": 132352}},
         "encoder_engine": {"tensorrt_version": "10.14.1.48"}}
    m["gpu"].update(over)
    return m


def failed(checks: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks if not c.ok}


def test_plan_encoder_cannot_load_in_the_trtllm_container(tmp_path):
    """Today's GPU encoder (platform tensorrt_plan) needs a tensorrt backend the container does not have."""
    backends = fake_container_backends(tmp_path)
    models = repository_models(write_repo(tmp_path, "plan"))
    assert models["encoder"]["backend"] == "tensorrt" and models["af3"]["backend"] is None
    bad = failed(check_backends(models, backends))
    assert set(bad) == {"backend tensorrt"} and "only tensorrtllm and python" in bad["backend tensorrt"].fix
    python_encoder = repository_models(write_repo(tmp_path / "py", "python"))
    assert failed(check_backends(python_encoder, backends)) == {}


def test_python_stub_must_be_for_this_python(tmp_path):
    backends = fake_container_backends(tmp_path, python="3.12")
    assert check_python_stub(backends, "3.12").ok
    other = check_python_stub(backends, "3.11")
    assert not other.ok and "Python 3.12" in other.fix


def test_gpu_checks(tmp_path):
    backends = fake_container_backends(tmp_path, python=HERE_PY)
    repo = write_repo(tmp_path, "python", gpu_manifest())
    ok = diagnose(repo, backend_dir=backends, gpus=[H100], versions=VERSIONS)
    assert failed(ok) == {}, [c.line() for c in ok]
    # no GPU visible
    assert "GPU" in failed(diagnose(repo, backend_dir=backends, gpus=[], versions=VERSIONS))
    # FP8 on an A100, and engines built for SM 9.0
    bad = failed(diagnose(repo, backend_dir=backends, gpus=[A100], versions=VERSIONS))
    assert {"precisions", "engine architecture"} <= set(bad) and "SM 8.9" in bad["precisions"].detail
    # the memory plan does not fit; tp 2 on one GPU
    (tmp_path / "big").mkdir()
    big = write_repo(tmp_path / "big", "python", gpu_manifest(
        memory_plan={"total": 100 * GIB, "kv_cache_tokens": 1}, options={
            "precision": "bf16", "kv_cache": "auto", "encoder_precision": "fp16", "tp_size": 2}))
    bad = failed(diagnose(big, backend_dir=backends, gpus=[H100], versions=VERSIONS))
    assert {"memory plan", "tensor parallel"} <= set(bad)


def test_version_checks(tmp_path):
    backends = fake_container_backends(tmp_path, python=HERE_PY)
    repo = write_repo(tmp_path, "python", gpu_manifest(), engine_version="1.3.0")
    bad = failed(diagnose(repo, backend_dir=backends, gpus=[H100],
                          versions={**VERSIONS, "tensorrt": "10.13.0", "torch": None}))
    assert {"TensorRT", "TensorRT-LLM", "TensorRT-LLM line", "torch"} <= set(bad)
    assert "TensorRT 10.14" in bad["TensorRT"].fix


@pytest.fixture(scope="module")
def cpu_repo(tiny_repo):
    return tiny_repo / "model_repository"  # the session's CPU build (conftest)


@pytest.mark.slow
def test_cpu_repository_passes_here_without_gpu(cpu_repo, capsys):
    """Real checks on this machine (no GPU): the launcher's backend directory, its stub for this Python."""
    checks = diagnose(cpu_repo)
    assert failed(checks) == {}, [c.line() for c in checks]
    assert doctor.main(["--repository", str(cpu_repo)]) == 0
    assert "0 failed" in capsys.readouterr().out


def test_serve_runs_doctor_before_starting(tmp_path, monkeypatch, capsys):
    """`af3trt serve` on a repository this machine cannot serve exits with the doctor's advice; tritonserver is
    never started."""
    from af3trt.runtime.serve import server

    repo = write_repo(tmp_path, "plan", gpu_manifest())
    monkeypatch.setattr(server.TritonServer, "start", lambda self, *a, **k: pytest.fail("server started"))
    with pytest.raises(SystemExit) as e:
        server.main(["--model-repository", str(repo)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "backend tensorrt" in err and "->" in err


def test_gpu_build_runs_doctor_before_any_long_step(tiny_ckpt, tmp_path, monkeypatch, capsys):
    """Building the engines here without trtllm-build is refused before the ONNX export, saying what to do."""
    from af3trt.build.build_engines import BuildError, BuildOptions, ServingConfig, build
    from af3trt.build.plan import GpuOptions

    from fakes import tensorrt as fake_tensorrt

    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt.fresh())
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    with pytest.raises(BuildError, match="trtllm-build.*prepare-only"):
        build(BuildOptions(hf_model=tiny_ckpt, out=tmp_path / "x", target="gpu",
                           gpu=GpuOptions(precision="bf16", gpu="h100", accuracy_report=False),
                           serving=ServingConfig(max_audio_seconds=30)))
    assert "exporting" not in capsys.readouterr().out
