"""The container half in an environment holding only what the serving container's Python holds.

`af3trt build --from-prepared OUT` and the rendered repository's python models run in the container's Python,
which has no onnxruntime, onnx, AF3-capable transformers or modelopt 0.47 (docker/Dockerfile installs af3trt there
--no-deps, plus a short list parsed by tests/container_env.py). Here they run in a real venv built from exactly
that list (plus a fake `tensorrt` and a fake `trtllm-build`), in a subprocess: real import isolation, nothing
patched in sys.modules. The prepared output comes from the export side, as in the container flow.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

from af3trt.triton_repo import configs

from container_env import EXPORT_ONLY, make_container_env
from fakes import trtllm_build

TESTS = Path(__file__).resolve().parent
pytestmark = pytest.mark.slow  # builds a venv and runs the container half in it


@pytest.fixture(scope="module")
def container(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("container")
    bindir = root / "fake-bin"
    bindir.mkdir()
    env = make_container_env(root / "venv", extra_bin=bindir)
    trtllm_build.install(bindir, env["python"])
    return env


def run_in(container: dict, *args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([container["python"], *args], env=container["env"], capture_output=True, text=True,
                          timeout=600, **kw)


def test_the_container_env_is_isolated(container):
    for module in (*EXPORT_ONLY, "transformers", "pytriton"):
        r = run_in(container, "-c", f"import {module}")
        assert r.returncode != 0 and "ModuleNotFoundError" in r.stderr, module
    r = run_in(container, "-c", "import tensorrt, torch, numpy, tokenizers, tritonclient.grpc, af3trt.build.gpu_build; "
                                "print(tensorrt.PLAN_MAGIC, tensorrt.__version__)")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["af3trt-fake-tensorrt-plan", "10.14.1.48"]


def test_from_prepared_and_the_repository_run_in_the_container_python(prepared, container, tmp_path):
    out = tmp_path / "af3-gpu"
    shutil.copytree(prepared, out, symlinks=True)
    r = run_in(container, "-m", "af3trt.cli", "build", "--from-prepared", str(out))
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    repo = out / "model_repository"
    assert configs.parse((repo / "encoder" / "config.pbtxt").read_text()).backend == "python"
    assert (repo / "encoder" / "1" / "model.plan").is_file()
    m = json.loads((out / "manifest.json").read_text())
    assert "transformers" not in m["engines_built"]["versions"] and "onnxruntime" not in m["engines_built"]["versions"]

    # gpu-check runs there too; with no GPU and the tiny preset's head size it refuses, saying why
    r = run_in(container, "-m", "af3trt.cli", "gpu-check", str(out))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "head size is 16" in r.stderr and "no NVIDIA GPU is visible" in r.stderr

    # every python model of the repository imports there (Triton's utils module faked, as in the unit tests)
    script = textwrap.dedent(f"""
        import importlib.util, pathlib, sys
        sys.path.insert(0, {str(TESTS)!r})
        from fakes import pb_utils as fake_pb
        sys.modules["triton_python_backend_utils"] = fake_pb
        for path in sorted(pathlib.Path({str(repo)!r}).glob("*/1/model.py")):
            spec = importlib.util.spec_from_file_location("m_" + path.parent.parent.name, path)
            spec.loader.exec_module(importlib.util.module_from_spec(spec))
            print("imported", path.parent.parent.name)
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in {EXPORT_ONLY!r})
        assert not leaked, leaked
    """)
    r = run_in(container, "-c", script)
    assert r.returncode == 0, r.stderr
    # (the GPU decoder is the C++ tensorrtllm backend: no model.py; the decoder front in front of it is python)
    assert r.stdout.split()[1::2] == ["cancel", "decoder_front", "encoder", "fusion", "postprocess", "preprocess"]


def test_the_documented_gpu_acceptance_command_collects_in_the_container_python(container):
    """The GPU acceptance command of docs/gpu.md, `pytest tests/test_gpu_acceptance.py -m gpu -s`, runs in the container's
    Python: pytest must be installed there (the base image has none; docker/Dockerfile installs it) and the test
    module with conftest.py must import with only the container's packages."""
    page = (TESTS.parent / "docs" / "gpu.md").read_text()
    command = next(line.split("#")[0].split("pytest ", 1)[1].split() for line in page.splitlines()
                   if "pytest tests/test_gpu_acceptance.py" in line and not line.startswith(("The", "`")))
    r = run_in(container, "-m", "pytest", *command, "--collect-only", "-q", "-p", "no:cacheprovider", cwd=TESTS.parent)
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    assert "test_gpu_acceptance.py::test_gpu_check_passes" in r.stdout
