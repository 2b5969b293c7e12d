"""Where tritonserver comes from, and the environment its python stubs run in.

The binary is found through $AF3TRT_TRITONSERVER, then PATH, then the `nvidia-pytriton` wheel (which carries
Triton 2.51 with the python backend). Python-backend models run in a stub process; we prepare the stub for the
running interpreter and give it this interpreter's site-packages, so the models import `af3trt` exactly as the
caller does. Both the launcher (runtime/serve/server.py) and its preflight (runtime/serve/doctor.py) need this: it sits below
them, so that neither imports the other.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import site
import sys
import sysconfig
from pathlib import Path

CACHE = Path(os.environ.get("AF3TRT_CACHE", Path.home() / ".cache" / "af3trt"))


class ServerError(RuntimeError):
    pass


def _pytriton_root() -> Path | None:
    try:
        import importlib.util

        spec = importlib.util.find_spec("pytriton")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
    return root if (root / "bin" / "tritonserver").exists() else None


def find_tritonserver() -> Path:
    """The tritonserver executable: $AF3TRT_TRITONSERVER, PATH, or the nvidia-pytriton wheel."""
    env = os.environ.get("AF3TRT_TRITONSERVER")
    if env:
        if not Path(env).is_file():
            raise ServerError(f"AF3TRT_TRITONSERVER={env} does not exist")
        return Path(env)
    on_path = shutil.which("tritonserver")
    if on_path:
        return Path(on_path)
    root = _pytriton_root()
    if root:
        return root / "bin" / "tritonserver"
    raise ServerError("tritonserver not found: set AF3TRT_TRITONSERVER, put it on PATH, or "
                      "`pip install nvidia-pytriton==0.7.0` (it carries Triton 2.51 with the python backend)")


def prepare_backends(binary: Path) -> Path:
    """A backend directory whose python backend has the stub for the running Python (copied once, cached)."""
    root = binary.parent.parent
    stubs = root / "python_backend_stubs"
    if not stubs.is_dir():  # a full Triton install (e.g. the NGC container) has its own backends
        return root / "backends"
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = stubs / py / "triton_python_backend_stub"
    if not stub.exists():
        raise ServerError(f"the Triton wheel has no python backend stub for Python {py} (has: "
                          f"{sorted(p.name for p in stubs.iterdir() if p.is_dir())})")
    dest = CACHE / f"tritonserver-backends-py{py}" / "backends"
    marker = dest / ".source"
    if not (marker.exists() and marker.read_text() == str(root)):
        tmp = CACHE / f".tmp-backends-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(root / "backends", tmp / "backends")
        target = tmp / "backends" / "python" / "triton_python_backend_stub"
        shutil.copy2(stub, target)
        target.chmod(0o755)
        (tmp / "backends" / ".source").write_text(str(root))
        shutil.rmtree(dest.parent, ignore_errors=True)
        tmp.rename(dest.parent)
    return dest


def stub_site_digest(dirs: list[str]) -> str:
    """A name for one interpreter's stub site directory that is the same in every process: sha256 of the
    interpreter, its version and its site directories (Python's hash() of a str changes with every process, which
    left a new directory behind on each run)."""
    key = "\n".join([sys.executable, sys.version, *dirs])
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _stub_pythonpath() -> Path:
    """A directory with a sitecustomize that makes the stub's Python see this interpreter's site-packages
    (including .pth files, so editable installs of af3trt import too)."""
    dirs = [p for p in site.getsitepackages() + [sysconfig.get_paths()["purelib"]] if Path(p).is_dir()]
    d = CACHE / f"stub-site-{stub_site_digest(dirs)}"
    d.mkdir(parents=True, exist_ok=True)
    (d / "sitecustomize.py").write_text(
        "import site\n" + "".join(f"site.addsitedir({p!r})\n" for p in dict.fromkeys(dirs)))
    return d


def is_wheel_install(binary: Path) -> bool:
    """The nvidia-pytriton wheel's tritonserver (per-Python stubs beside its backends), not a full Triton install."""
    return (Path(binary).parent.parent / "python_backend_stubs").is_dir()


# Environment the python stubs must not inherit. TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1 "forces TF32 enablement,
# overrides set_float32_matmul_precision setting" (PyTorch docs, cuda_environment_variables.rst); NGC images may set
# it, and the preprocess log-mel's mel matmul must stay full fp32 (kernels/logmel.py: TF32 moves the features by
# ~1e-4). tritonserver's own backends (TensorRT-LLM's C++ runtime) do not read it.
STUB_ENV_DROP = ("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE",)


def server_env(binary: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in STUB_ENV_DROP}
    libs = []
    # Only for the wheel's tritonserver: its stub links libpython3.X.so.1.0, which must be the running
    # interpreter's, and its own libraries sit in the wheel. A full install (the NGC image) resolves its libraries
    # itself, and there the interpreter's LIBDIR is /usr/lib/x86_64-linux-gnu, which holds the host driver's
    # libcuda: first on LD_LIBRARY_PATH it would shadow the image's CUDA forward-compatibility libcuda, which the
    # image wires through ld.so.conf (server r26.04 build.py: `echo ${_CUDA_COMPAT_PATH}/lib >
    # /etc/ld.so.conf.d/00-cuda-compat.conf`; LD_LIBRARY_PATH is searched before ld.so.conf).
    if is_wheel_install(binary):
        libdir, soname = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")
        if libdir and soname and (Path(libdir) / soname).exists():
            libs.append(libdir)
        root = _pytriton_root()
        if root is not None:
            sp = root.parent.parent
            libs += [str(sp / "nvidia_pytriton.libs"), str(sp / "nvidia" / "cuda_runtime" / "lib")]
    if env.get("LD_LIBRARY_PATH"):
        libs.append(env["LD_LIBRARY_PATH"])
    if libs:
        env["LD_LIBRARY_PATH"] = ":".join(libs)
    env["PYTHONPATH"] = os.pathsep.join([str(_stub_pythonpath())] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONUTF8"] = "1"  # the stubs would otherwise decode files with the C locale's ASCII
    # OpenMP threads (torch's, in the decoder and preprocess stubs) sleep at a barrier instead of spinning: the stages
    # share the cores, and a spinning thread burns the core another stage needs. Measured on 2 cores (docs/
    # performance-engine.md): a decode step of the af3 preset at batch 8 with 2 threads took 197 ms of CPU spinning
    # against 28 ms passive; the tiny model at batch 16, 1.6 against 0.08 ms of CPU per token. A value the user set
    # is kept.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env
