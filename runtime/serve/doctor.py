"""`af3trt doctor [--repository DIR]`: will this machine serve (or build) that repository? Each failure says what
to do. Run by `af3trt serve` before it starts tritonserver, and by the GPU build before its first long step.

    af3trt doctor --repository out/af3-h100/model_repository [--backend-directory /opt/tritonserver/backends]

Checks, with the facts they rely on (re-verify before relying on a detail):
- GPU: SM and memory (nvidia-smi, else torch.cuda) against the repository's precisions (af3trt/registry.py:
  check_precision; FP8 needs SM 8.9+), the SM its TensorRT engines were built for (a plan runs only on the
  architecture it was built on), its tensor-parallel size (one GPU per rank) and its memory plan (manifest
  `gpu.memory_plan`, build/memory_plan.py). A CPU repository needs no GPU.
- backends: every model's `backend` (or the backend its `platform` needs: tensorrt_plan -> tensorrt,
  onnxruntime_onnx -> onnxruntime) must be a directory `<backend dir>/<name>/` holding `libtriton_<name>.so`
  (Triton's backend layout). `nvcr.io/nvidia/tritonserver:<yy.mm>-trtllm-python-py3` ships the tensorrtllm and
  python backends only (triton-inference-server/tensorrtllm_backend r26.04 docs/build.md; Triton maintainers in
  triton-inference-server/server issue #7346: "-trtllm-python-py3 only has TRTLLM and Python backends").
- python stub: python-backend models run in `<backend dir>/python/triton_python_backend_stub`, a binary linked
  against one libpython3.X (python_backend builds it for the container's Python; the nvidia-pytriton wheel ships
  one per Python in python_backend_stubs/3.X/). Models import af3trt, numpy and torch from this interpreter, so
  the stub's Python must be this one's.
- versions: torch (the python models), TensorRT (a plan loads only in the TensorRT version that built it: the
  manifest's encoder_engine.tensorrt_version), TensorRT-LLM (the engine's config.json `version`; this project
  targets the 1.2 line), nvidia-modelopt (the export half only).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from af3trt.registry import TENSORRT_LINE, TRTLLM_LINE, GpuInfo, PrecisionError, check_encoder_precision, check_precision
from af3trt.runtime.engines import gpus as gpu_detection
from af3trt.runtime.triton.model_config import repository_configs
from af3trt.runtime.serve.triton_install import ServerError, find_tritonserver, prepare_backends

PLATFORM_BACKENDS = {"tensorrt_plan": "tensorrt", "onnxruntime_onnx": "onnxruntime", "pytorch_libtorch": "pytorch",
                     "tensorflow_savedmodel": "tensorflow", "tensorflow_graphdef": "tensorflow"}
CONTAINER_BACKENDS = "/opt/tritonserver/backends"


class DoctorError(RuntimeError):
    """Some check failed; the message lists them with what to do."""


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""

    def line(self) -> str:
        return f"[{'ok' if self.ok else 'FAIL'}] {self.name}: {self.detail}" + ("" if self.ok else f"\n       -> {self.fix}")


def detect_gpus(torch_fallback: bool = True) -> list[GpuInfo]:
    """GPUs from nvidia-smi, else (torch_fallback) torch.cuda; [] when there is none."""
    return gpu_detection.detect_gpus(torch_fallback=torch_fallback)


def gpu_repository(manifest: dict, models: dict[str, dict]) -> bool:
    """A repository built for the GPU target (a tensorrtllm decoder, or the manifest says so)."""
    return any(m["backend"] == "tensorrtllm" for m in models.values()) or manifest.get("target") == "gpu"


def installed_versions() -> dict[str, str | None]:
    out = {}
    for pkg, dists in (("torch", ("torch",)), ("tensorrt", ("tensorrt", "tensorrt-cu12", "tensorrt-cu13")),
                       ("tensorrt_llm", ("tensorrt_llm", "tensorrt-llm")), ("modelopt", ("nvidia-modelopt",))):
        out[pkg] = None
        for d in dists:
            try:
                out[pkg] = metadata.version(d)
                break
            except metadata.PackageNotFoundError:
                continue
    return out


def default_backend_dir() -> Path:
    """The backend directory `af3trt serve` would give tritonserver (runtime/serve/triton_install.py), else the
    container's."""
    try:
        return prepare_backends(find_tritonserver())
    except ServerError:
        return Path(CONTAINER_BACKENDS)


def stub_python(stub: Path) -> str | None:
    """The Python (e.g. "3.12") a triton_python_backend_stub links against, from the libpython soname it names."""
    try:
        found = set(re.findall(rb"libpython(3\.\d+)", stub.read_bytes()))
    except OSError:
        return None
    return found.pop().decode() if len(found) == 1 else None


# ---------------------------------------------------------------------------------------------- the checks

def repository_models(repo: Path) -> dict[str, dict]:
    """model name -> {"backend": name or None (ensemble), "config": ModelConfig} for every config.pbtxt."""
    models = {}
    for dirname, cfg in repository_configs(repo).items():
        backend = cfg.backend or PLATFORM_BACKENDS.get(cfg.platform) or (None if cfg.platform == "ensemble"
                                                                          else cfg.platform or None)
        models[cfg.name or dirname] = {"backend": backend, "config": cfg}
    return models


def check_backends(models: dict[str, dict], backend_dir: Path) -> list[Check]:
    checks = []
    for name in sorted({m["backend"] for m in models.values() if m["backend"]}):
        users = sorted(k for k, m in models.items() if m["backend"] == name)
        lib = Path(backend_dir) / name / f"libtriton_{name}.so"
        have = sorted(p.name for p in Path(backend_dir).iterdir() if p.is_dir()) if Path(backend_dir).is_dir() else []
        fix = (f"{backend_dir} has the backends {have or 'none'}. "
               + ("The -trtllm-python-py3 containers ship only tensorrtllm and python: rebuild the repository with "
                  "this af3trt (its GPU encoder is a python model running the TensorRT plan), or serve from a "
                  "Triton image that has the tensorrt backend."
                  if name == "tensorrt" else
                  f"Install the {name} backend there or point --backend-directory at a Triton install that has it."))
        checks.append(Check(f"backend {name}", lib.is_file(),
                            f"{lib} ({'present' if lib.is_file() else 'missing'}; needed by {', '.join(users)})", fix))
    return checks


def check_python_stub(backend_dir: Path, python: str | None = None) -> Check:
    python = python or f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = Path(backend_dir) / "python" / "triton_python_backend_stub"
    if not stub.is_file():
        return Check("python stub", False, f"{stub} is missing",
                     "the python backend is incomplete: use the Triton install's backends directory (af3trt serve "
                     "prepares one from the nvidia-pytriton wheel)")
    built_for = stub_python(stub)
    ok = built_for == python
    return Check("python stub", ok, f"{stub} links libpython{built_for or '?'}; this is Python {python}",
                 f"run af3trt with Python {built_for} (the container's own python3), or give tritonserver a stub built "
                 f"for Python {python}")


def check_gpu(gpus: list[GpuInfo], manifest: dict, models: dict[str, dict]) -> list[Check]:
    if not gpu_repository(manifest, models):
        return [Check("GPU", True, f"CPU repository: no GPU needed ({len(gpus)} visible)")]
    if not gpus:
        return [Check("GPU", False, "no GPU visible (nvidia-smi / torch.cuda found none)",
                      "run on the GPU host, inside the container with `docker run --gpus all`")]
    gpu, checks = gpus[0], []
    checks.append(Check("GPU", True, f"{len(gpus)} x {gpu.name}, SM {gpu.sm / 10:.1f}, {gpu.memory_bytes / 1024**3:.1f} GiB"))
    g = manifest.get("gpu") or {}
    opts, target = g.get("options") or {}, g.get("target") or {}
    if opts:
        try:
            check_precision(opts.get("precision", "bf16"), opts.get("kv_cache", "auto"), gpu)
            check_encoder_precision(opts.get("encoder_precision", "fp16"), gpu.sm)
            checks.append(Check("precisions", True, f"{opts.get('precision')} weights, KV {opts.get('kv_cache')}, "
                                                    f"{opts.get('encoder_precision')} encoder run on SM {gpu.sm}"))
        except (PrecisionError, ValueError) as e:
            checks.append(Check("precisions", False, str(e), "rebuild for this GPU with a precision it runs"))
        tp = int(opts.get("tp_size", 1))
        checks.append(Check("tensor parallel", len(gpus) >= tp, f"tp {tp}, {len(gpus)} GPU(s) visible",
                            f"make {tp} GPUs visible (docker run --gpus all / CUDA_VISIBLE_DEVICES) or rebuild with a "
                            f"smaller --tp-size"))
    cc = target.get("compute_capability")
    if cc:
        built_sm = int(cc[0]) * 10 + int(cc[1])
        checks.append(Check("engine architecture", built_sm == gpu.sm,
                            f"engines built for SM {built_sm / 10:.1f} ({target.get('name')}), this GPU is "
                            f"SM {gpu.sm / 10:.1f}",
                            "TensorRT engines run only on the architecture they were built on: rebuild them here "
                            "(`af3trt build --from-prepared`)"))
    plan = g.get("memory_plan")
    if plan:
        ok = plan["total"] <= gpu.memory_bytes
        checks.append(Check("memory plan", ok, f"the plan needs {plan['total'] / 1024**3:.1f} GiB on GPU 0 "
                                               f"(KV {plan['kv_cache_tokens']:,} tokens); {gpu.name} has "
                                               f"{gpu.memory_bytes / 1024**3:.1f} GiB",
                            "rebuild with a smaller --max-batch-size / --max-audio-seconds, a quantized precision, or "
                            "for this GPU (--gpu)"))
    return checks


def check_versions(versions: dict[str, str | None], manifest: dict, models: dict[str, dict],
                   engine_version: str | None) -> list[Check]:
    checks = []
    python_models = any(m["backend"] == "python" for m in models.values())
    checks.append(Check("torch", versions["torch"] is not None or not python_models,
                        f"torch {versions['torch'] or 'not installed'}",
                        "pip install torch (the python models import it)"))
    built_trt = (manifest.get("encoder_engine") or {}).get("tensorrt_version")
    if built_trt:
        have = versions["tensorrt"]
        ok = have is not None and have.split(".")[:2] == built_trt.split(".")[:2]
        checks.append(Check("TensorRT", ok, f"the encoder plan was built with TensorRT {built_trt}; "
                                            f"here: {have or 'not installed'}",
                            f"serve where TensorRT {'.'.join(built_trt.split('.')[:2])} is (a plan loads only in the "
                            f"TensorRT version that built it), or rebuild the plan here"))
    else:
        checks.append(Check("TensorRT", True, f"{versions['tensorrt'] or 'not installed'} (no TensorRT plan here)"))
    if engine_version:
        have = versions["tensorrt_llm"]
        ok = have is None or have.split(".")[:2] == engine_version.split(".")[:2]
        checks.append(Check("TensorRT-LLM", ok, f"decoder engine built by TensorRT-LLM {engine_version}; "
                                                f"here: {have or 'not importable (the C++ backend carries its own)'}",
                            f"serve with the tensorrtllm backend of TensorRT-LLM {engine_version} (e.g. "
                            f"tritonserver:26.04-trtllm-python-py3 for 1.2.1) or rebuild the engine here"))
        if not engine_version.startswith(TRTLLM_LINE):
            checks.append(Check("TensorRT-LLM line", False, f"engine version {engine_version}",
                                f"af3trt targets the TensorRT-LLM {TRTLLM_LINE} engine flow: rebuild with 1.2"))
    checks.append(Check("modelopt", True, f"nvidia-modelopt {versions['modelopt'] or 'not installed'} "
                                          f"(needed only to prepare quantized checkpoints)"))
    return checks


def diagnose(repository: Path, *, backend_dir: Path | None = None, gpus: list[GpuInfo] | None = None,
             versions: dict | None = None, python: str | None = None) -> list[Check]:
    """Every check for serving `repository` here (arguments other than the repository: for tests)."""
    repository = Path(repository)
    if not repository.is_dir():
        return [Check("repository", False, f"{repository} is not a directory",
                      "point --repository at OUT/model_repository of an af3trt build")]
    models = repository_models(repository)
    if not models:
        return [Check("repository", False, f"{repository} has no */config.pbtxt", "build it with `af3trt build`")]
    manifest_path = repository.parent / "manifest.json"
    manifest = json.loads(manifest_path.read_text(encoding="utf-8")) if manifest_path.is_file() else {}
    engine_version = None
    decoder = next((m for m in models.values() if m["backend"] == "tensorrtllm"), None)
    if decoder is not None and "gpt_model_path" in decoder["config"].parameters:
        engine_cfg = Path(decoder["config"].parameters["gpt_model_path"].string_value) / "config.json"
        if engine_cfg.is_file():
            engine_version = json.loads(engine_cfg.read_text(encoding="utf-8")).get("version")
    backend_dir = Path(backend_dir) if backend_dir is not None else default_backend_dir()
    checks = [Check("repository", True, f"{repository}: {', '.join(sorted(models))}")]
    # a CPU repository asks nvidia-smi only: torch.cuda's fallback imports torch (1.9 s of CPU, measured), which
    # `af3trt serve` paid before tritonserver started
    gpus = detect_gpus(torch_fallback=gpu_repository(manifest, models)) if gpus is None else gpus
    checks += check_gpu(gpus, manifest, models)
    checks += check_backends(models, backend_dir)
    if any(m["backend"] == "python" for m in models.values()):
        checks.append(check_python_stub(backend_dir, python))
    checks += check_versions(installed_versions() if versions is None else versions, manifest, models,
                             engine_version)
    return checks


def require_ready(repository: Path, backend_dir: Path | None = None) -> list[Check]:
    """The serve hook: DoctorError listing the failed checks (with what to do), else the checks."""
    checks = diagnose(repository, backend_dir=backend_dir)
    failed = [c for c in checks if not c.ok]
    if failed:
        raise DoctorError("af3trt doctor: this machine cannot serve the repository:\n"
                          + "\n".join(c.line() for c in failed))
    return checks


def preflight_or_exit(repository: Path) -> None:
    """`af3trt serve`'s hook: print the failed checks with what to do and exit 2, before tritonserver starts."""
    try:
        require_ready(repository)
    except DoctorError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def build_checks(prepare_only: bool, versions: dict | None = None) -> list[Check]:
    """The GPU build's preflight for the tools of its engine half (when it builds the engines here)."""
    if prepare_only:
        return []
    from af3trt.runtime.engines.trt_runner import TensorRTUnavailable, import_tensorrt

    versions = installed_versions() if versions is None else versions
    checks = []
    try:
        trt = import_tensorrt("the encoder engine build")
        have = getattr(trt, "__version__", "unknown")
        checks.append(Check("TensorRT", have.startswith(TENSORRT_LINE) or have == "unknown", f"tensorrt {have}",
                            f"install TensorRT {TENSORRT_LINE} (the version of tritonserver:26.04-trtllm-python-py3)"))
    except TensorRTUnavailable as e:
        checks.append(Check("TensorRT", False, "`import tensorrt` failed", str(e)))
    exe = shutil.which("trtllm-build")
    checks.append(Check("trtllm-build", exe is not None, exe or "not on PATH",
                        "trtllm-build comes with TensorRT-LLM 1.2 (pip install tensorrt-llm==1.2.1 on a CUDA machine, "
                        "or build inside nvcr.io/nvidia/tritonserver:26.04-trtllm-python-py3); or build with "
                        "--prepare-only here and `af3trt build --from-prepared` there"))
    llm = versions.get("tensorrt_llm")
    if llm is not None:
        checks.append(Check("TensorRT-LLM", llm.startswith(TRTLLM_LINE), f"tensorrt_llm {llm}",
                            f"install TensorRT-LLM {TRTLLM_LINE}.x: the last line with trtllm-build"))
    failed = [c for c in checks if not c.ok]
    if failed:
        raise DoctorError("af3trt doctor: the engines cannot be built here:\n" + "\n".join(c.line() for c in failed))
    return checks


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="af3trt doctor", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repository", type=Path, default=None, help="OUT/model_repository of an af3trt build")
    ap.add_argument("--backend-directory", type=Path, default=None,
                    help="tritonserver's --backend-directory (default: what `af3trt serve` uses, else "
                         f"{CONTAINER_BACKENDS})")
    args = ap.parse_args(argv)
    if args.repository is None:  # the machine only: GPUs and versions
        gpus = detect_gpus()
        print("\n".join([f"GPU: {g.name}, SM {g.sm / 10:.1f}, {g.memory_bytes / 1024**3:.1f} GiB" for g in gpus]
                        or ["GPU: none visible"]))
        print("\n".join(f"{k}: {v or 'not installed'}" for k, v in installed_versions().items()))
        return 0
    checks = diagnose(args.repository, backend_dir=args.backend_directory)
    print("\n".join(c.line() for c in checks))
    failed = sum(not c.ok for c in checks)
    print(f"{len(checks) - failed} ok, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
