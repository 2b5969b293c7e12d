"""docker/Dockerfile's install into the container's Python, run for real where it can be.

- The pinning step (docker/container-pins.sh) is run, with the pip of a throwaway venv, against an environment
  holding an editable install and a direct-URL (`name @ file://`) install, as the NGC images do; the constraint file
  it writes must then be accepted by `pip install -c` the way the Dockerfile uses it. `pip freeze` output is refused
  there (pip 23.2: "Unnamed requirements are not allowed as constraints" / "Editable requirements are not allowed
  as constraints"); the test shows that too, so it proves the script is what makes the difference.
- tritonclient is pinned to the server's release: Triton 2.68.0 is the 26.04 container
  (triton-inference-server/server branch r26.04: TRITON_VERSION = 2.68.0, build.py DEFAULT_TRITON_VERSION_MAP
  {"release_version": "2.68.0", "triton_container_version": "26.04"}).
"""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from container_env import DOCKERFILE, ROOT, dockerfile_container_requirements

PINS_SCRIPT = ROOT / "docker" / "container-pins.sh"
CONTAINER_TAG, TRITON_RELEASE = "26.04", "2.68.0"

# A PEP 660 build backend in a dozen lines, so that pip can make an editable (and a regular) install offline,
# without setuptools or wheel in the throwaway venv.
BACKEND = '''\
import base64, hashlib, os, zipfile
NAME = os.path.basename(os.path.dirname(os.path.abspath(__file__)))
def _wheel(directory, files):
    di = f"{NAME}-0.1.dist-info"
    files = dict(files, **{f"{di}/METADATA": f"Metadata-Version: 2.1\\nName: {NAME}\\nVersion: 0.1\\n",
                           f"{di}/WHEEL": "Wheel-Version: 1.0\\nGenerator: t\\nRoot-Is-Purelib: true\\nTag: py3-none-any\\n"})
    name, record = f"{NAME}-0.1-py3-none-any.whl", []
    with zipfile.ZipFile(os.path.join(directory, name), "w") as z:
        for path, text in files.items():
            z.writestr(path, text)
            h = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
            record.append(f"{path},sha256={h},{len(text.encode())}")
        z.writestr(f"{di}/RECORD", "\\n".join(record + [f"{di}/RECORD,,"]) + "\\n")
    return name
def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    return _wheel(wheel_directory, {f"{NAME}.pth": os.path.dirname(os.path.abspath(__file__)) + "\\n"})
def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    return _wheel(wheel_directory, {f"{NAME}/__init__.py": ""})
'''


def _package(root: Path, name: str) -> Path:
    d = root / name
    (d / name).mkdir(parents=True)
    (d / name / "__init__.py").write_text("")
    (d / "backend.py").write_text(BACKEND)
    (d / "pyproject.toml").write_text(f'[build-system]\nrequires = []\nbuild-backend = "backend"\nbackend-path = ["."]\n'
                                      f'[project]\nname = "{name}"\nversion = "0.1"\n')
    return d


@pytest.fixture(scope="module")
def image_python(tmp_path_factory):
    """A venv standing in for the image's Python: pip, one editable install, one installed from a local path."""
    root = tmp_path_factory.mktemp("image")
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--without-pip", str(root / "venv")], check=True)
    py = str(root / "venv" / "bin" / "python")
    # pip from the interpreter's bundled wheel (what ensurepip installs: pip 23.2.1 for Python 3.11.7), unpacked
    # directly: the same pip, without ensurepip's byte-compilation
    wheel = subprocess.run([base, "-c", "import ensurepip, pathlib; print(next(pathlib.Path(ensurepip.__file__)"
                            ".parent.glob('_bundled/pip-*.whl')))"], capture_output=True, text=True, check=True)
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    zipfile.ZipFile(wheel.stdout.strip()).extractall(site)
    pip = [py, "-m", "pip", "install", "-q", "--no-index", "--no-build-isolation", "--disable-pip-version-check"]
    subprocess.run([*pip, "-e", str(_package(root, "editpkg"))], check=True)
    subprocess.run([*pip, str(_package(root, "pathpkg"))], check=True)
    freeze = subprocess.run([py, "-m", "pip", "freeze"], capture_output=True, text=True, check=True).stdout
    assert re.search(r"^-e ", freeze, re.M) and "pathpkg @ file://" in freeze  # what the Dockerfile meets
    return {"python": py, "root": root, "pip": pip}


@pytest.mark.slow
def test_container_pins_accept_an_image_with_editable_installs(image_python, tmp_path):
    pins = tmp_path / "container-pins.txt"
    subprocess.run(["sh", str(PINS_SCRIPT), str(pins), image_python["python"]], check=True)
    lines = pins.read_text().split()
    assert "pathpkg==0.1" in lines and not any("editpkg" in x or "@" in x or x.startswith("-") for x in lines)
    assert all(re.fullmatch(r"[A-Za-z0-9_.\-]+==\S+", x) for x in lines), lines
    # the Dockerfile's next step: install our (editable) package under those constraints
    ours = _package(tmp_path, "ourpkg")
    run = subprocess.run([*image_python["pip"], "-c", str(pins), "--no-deps", "-e", str(ours)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr

    # what the Dockerfile did before: `pip freeze` as constraints is refused by pip
    frozen = tmp_path / "frozen.txt"
    frozen.write_text(subprocess.run([image_python["python"], "-m", "pip", "freeze"], capture_output=True, text=True,
                                     check=True).stdout)
    old = subprocess.run([*image_python["pip"], "-c", str(frozen), "--no-deps", "-e", str(ours)],
                         capture_output=True, text=True)
    assert old.returncode != 0 and "not allowed as constraints" in old.stderr


def test_dockerfile_uses_the_pins_script_and_pins_tritonclient_to_the_server():
    text = DOCKERFILE.read_text()
    assert f"FROM nvcr.io/nvidia/tritonserver:{CONTAINER_TAG}-trtllm-python-py3" in text
    assert "pip freeze" not in text.split("# Export side.")[0].replace("`pip freeze` cannot", "")
    assert "docker/container-pins.sh /opt/af3trt/container-pins.txt" in text
    reqs = dockerfile_container_requirements(text)
    assert f"tritonclient[grpc]=={TRITON_RELEASE}" in reqs
    assert not any(r.split("[")[0].split("=")[0] in ("onnxruntime", "transformers", "nvidia-modelopt") for r in reqs)
