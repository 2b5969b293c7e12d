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

import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from container_env import DOCKERFILE, ROOT, dockerfile_container_installs, dockerfile_container_requirements

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
    assert f"tritonclient=={TRITON_RELEASE}" in reqs
    assert not any(r.split("[")[0].split("=")[0] in ("onnxruntime", "transformers", "nvidia-modelopt") for r in reqs)


# tritonclient 2.68.0's wheel metadata (registry: tritonclient-2.68.0-py3-none-manylinux1_x86_64.whl, METADATA),
# the extras the Dockerfile could ask for: base, grpc.
TRITONCLIENT_268_REQUIRES = [
    "numpy>=1.19.1", "python-rapidjson>=0.9.1", "urllib3>=2.0.7",
    'grpcio<1.68,>=1.63.0; extra == "grpc"', 'numpy>=1.19.1; extra == "grpc"', 'packaging>=14.1; extra == "grpc"',
    'protobuf<7.0,>=6.30.0; extra == "grpc"', 'python-rapidjson>=0.9.1; extra == "grpc"',
]
IMAGE_PINS = ROOT / "tests" / "data" / "trtllm-1.2.1-image-pins.txt"


def _stub_wheel(index: Path, name: str, version: str, requires: list[str]) -> None:
    """A wheel holding only METADATA: what pip's resolver reads."""
    extras = sorted({m for r in requires for m in re.findall(r'extra == "([^"]+)"', r)})
    meta = "".join([f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
                    *(f"Provides-Extra: {e}\n" for e in extras), *(f"Requires-Dist: {r}\n" for r in requires)])
    dist = f"{re.sub(r'[-_.]+', '_', name).lower()}-{version}"
    with zipfile.ZipFile(index / f"{dist}-py3-none-any.whl", "w") as z:
        z.writestr(f"{dist}.dist-info/METADATA", meta)
        z.writestr(f"{dist}.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: t\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{dist}.dist-info/RECORD", "")


def image_index(index: Path, roots: list[str], pins: dict[str, str]) -> None:
    """A local package index for `roots`: pinned packages at the image's version (their own requirements are
    already met in the image), tritonclient 2.68.0 with its published requirements, the rest at our venv's
    versions with their declared requirements."""
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    written, seen, todo = set(), set(), [Requirement(r) for r in roots]
    while todo:
        req = todo.pop()
        key = canonicalize_name(req.name)
        if (key, frozenset(req.extras)) in seen:
            continue
        seen.add((key, frozenset(req.extras)))
        if key in pins:
            version, requires = pins[key], []
        elif key == "tritonclient":
            version, requires = "2.68.0", TRITONCLIENT_268_REQUIRES
        else:
            dist = metadata.distribution(req.name)
            version, requires = dist.version, dist.requires or []
        if key not in written:
            _stub_wheel(index, key, version, requires)
            written.add(key)
        for dep in map(Requirement, requires):
            envs = [{"extra": e} for e in req.extras] or [{"extra": ""}]
            if dep.marker is None or any(dep.marker.evaluate(env) for env in envs):
                todo.append(dep)


def _resolve(args: list[str], index: Path, pins: Path, report: Path) -> subprocess.CompletedProcess:
    args = [str(pins) if a == "/opt/af3trt/container-pins.txt" else a for a in args]
    return subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-index",
                           "--find-links", str(index), "--disable-pip-version-check", "--report", str(report), *args],
                          capture_output=True, text=True)


@pytest.mark.slow
def test_container_installs_resolve_against_a_trtllm_121_image(tmp_path):
    pins = dict(line.split("==") for line in IMAGE_PINS.read_text().split("\n") if line and not line.startswith("#"))
    installs = [a for a in dockerfile_container_installs() if "-e" not in a]
    index = tmp_path / "index"
    index.mkdir()
    image_index(index, [*dockerfile_container_requirements(), "tritonclient[grpc]==2.68.0"], pins)
    for n, args in enumerate(installs):
        assert "-c" in args, args  # every container install keeps the image's versions
        run = _resolve(args, index, IMAGE_PINS, tmp_path / f"report{n}.json")
        assert run.returncode == 0, f"{args}\n{run.stderr}"
        got = {i["metadata"]["name"]: i["metadata"]["version"]
               for i in json.loads((tmp_path / f"report{n}.json").read_text())["install"]}
        assert all(got.get(k, v) == v for k, v in pins.items()), got  # nothing moved off the image's version
    assert any("tritonclient==2.68.0" in a for a in installs)
    # the Dockerfile's old install, `tritonclient[grpc]==2.68.0` under the same pins: grpcio 1.85 is outside the
    # wheel's grpcio<1.68, so pip cannot resolve it
    old = _resolve(["-c", "/opt/af3trt/container-pins.txt", "tritonclient[grpc]==2.68.0"], index, IMAGE_PINS,
                   tmp_path / "old.json")
    assert old.returncode != 0 and "ResolutionImpossible" in old.stderr, old.stderr
