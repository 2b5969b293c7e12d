"""A Python environment holding only what the serving container's Python holds, for the container-half tests.

docker/Dockerfile installs af3trt into the Python of nvcr.io/nvidia/tritonserver:26.04-trtllm-python-py3 with
`--no-deps` plus a short list of serving packages; everything else there comes with the image (TensorRT-LLM
1.2.1 and its torch/numpy). The export side (transformers 5 with AF3's classes, onnxruntime, onnx, modelopt 0.47)
lives in a separate venv. So the engine half (`af3trt build --from-prepared`) and gpu-check must run with exactly:

    the packages named by the Dockerfile's container `pip install` (parsed from docker/Dockerfile, see
    dockerfile_container_requirements) + what the image brings that we use (IMAGE_PACKAGES) + their
    dependency closure as pip would install it + af3trt itself (editable) + a fake `tensorrt` + a fake trtllm-build.

`make_container_env` builds it as a real venv (`python -m venv --without-pip`, no system site-packages) whose
site-packages holds symlinks to those distributions in our own venv: the versions differ from the container's,
the import graph does not. A module that is not there raises ImportError, as it would in the container.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "docker" / "Dockerfile"
FAKES = Path(__file__).resolve().parent / "fakes"

# What the base image's Python brings that af3trt's container half imports: TensorRT-LLM's requirements.txt
# (NVIDIA/TensorRT-LLM, 1.2-era version in the search index, commit 000867d9) lists torch and numpy<2. It also lists
# onnx, transformers (4.57.x) and nvidia-modelopt[torch]~=0.37, which the image therefore holds, but none is ours to
# use there (no AF3 classes in that transformers; another modelopt than the export side's): leaving them out here
# makes any import of them fail, which is stricter than the container and what we want.
IMAGE_PACKAGES = ["torch", "numpy"]

# Export-side packages: the container half must not import them (onnxruntime is absent there; the others are
# TensorRT-LLM's versions, not the export side's): an import of any of these by the container half is a bug.
EXPORT_ONLY = ("onnxruntime", "onnx", "transformers", "modelopt")


def dockerfile_container_installs(text: str | None = None) -> list[list[str]]:
    """The arguments after `install` of each container-Python `pip install` in the `RUN … container-pins` step."""
    text = DOCKERFILE.read_text() if text is None else text
    joined = re.sub(r"\\\n", " ", text)
    installs = []
    for line in joined.splitlines():
        if not line.startswith("RUN") or "container-pins" not in line:
            continue
        for cmd in line.split("&&"):
            tokens = cmd.replace('"', " ").split()
            if "install" in tokens and "pip" in " ".join(tokens[:3]):
                installs.append(tokens[tokens.index("install") + 1:])
    if not installs:
        raise AssertionError("docker/Dockerfile: no container `pip install -c <pins> …` line found")
    return installs


def dockerfile_container_requirements(text: str | None = None) -> list[str]:
    """The requirements the Dockerfile's container-Python `pip install … -c <pins>` lines name (not the -e one)."""
    reqs = []
    for args in dockerfile_container_installs(text):
        if "-e" in args:
            continue
        skip = False
        for tok in args:
            if skip:
                skip = False
            elif tok in ("-c", "--constraint", "-r"):
                skip = True
            elif not tok.startswith("-"):
                reqs.append(tok)
    return reqs


def _closure(roots: list[str]) -> dict[str, metadata.Distribution]:
    """Distributions of our venv that pip would install for `roots` (extras and markers evaluated)."""
    seen: dict[str, metadata.Distribution] = {}
    todo = [Requirement(r) for r in roots]
    while todo:
        req = todo.pop()
        key = canonicalize_name(req.name)
        if key in seen:
            continue
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError as e:
            raise AssertionError(f"{req.name} (needed in the container env) is not installed in this venv") from e
        seen[key] = dist
        for dep in dist.requires or []:
            d = Requirement(dep)
            envs = [{"extra": e} for e in req.extras] or [{"extra": ""}]
            if d.marker is None or any(d.marker.evaluate(env) for env in envs):
                todo.append(d)
    return seen


def _top_levels(dist: metadata.Distribution) -> set[str]:
    """The entries a distribution put into site-packages (packages, modules, .pth, its .dist-info)."""
    out = set()
    for f in dist.files or []:
        first = f.parts[0]
        if first not in ("..", "__pycache__") and not first.endswith(".data"):
            out.add(first)
    return out


def make_container_env(dest: Path, extra_bin: Path | None = None) -> dict:
    """A venv at `dest` with the container's packages; returns {"python": …, "env": …} to run commands in it."""
    dest = Path(dest)
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--without-pip", str(dest)], check=True)
    site = next((dest / "lib").glob("python3*/site-packages"))
    roots = dockerfile_container_requirements() + IMAGE_PACKAGES
    dists = _closure(roots)
    # installed --no-deps: its editable finder + .pth, as this venv holds it (not a source tree's af3trt.egg-info, which
    # `python -m pytest` from the checkout puts first on sys.path)
    dists["af3trt"] = next(metadata.distributions(name="af3trt", path=[sysconfig.get_paths()["purelib"]]))
    for dist in dists.values():
        where = Path(dist.locate_file(""))
        for name in _top_levels(dist):
            src = where / name
            if src.exists() and not (site / name).exists():
                (site / name).symlink_to(src)
    (site / "tensorrt").symlink_to(FAKES / "tensorrt")
    leaked = [m for m in EXPORT_ONLY if (site / m).exists()]
    if leaked:
        raise AssertionError(f"the container env would hold export-only packages {leaked}")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PATH"] = os.pathsep.join([*([str(extra_bin)] if extra_bin else []), str(dest / "bin"), "/usr/bin", "/bin"])
    env["PYTHONNOUSERSITE"] = "1"
    return {"python": str(dest / "bin" / "python"), "env": env, "site": site,
            "distributions": sorted(dists)}
