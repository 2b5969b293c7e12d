"""Kubernetes overlays for the GPU target, sized by our sizing code, and the pod's engine-build init step.

deploy/base holds the hand-written Kustomize base (Deployment, Services, PVC, PodMonitor, HPA); the optional parts are
Kustomize components (deploy/components/openai, deploy/components/build-engines). An overlay is what differs per
GPU, precision, KV cache and TP size, and it is computed here, not typed:

    nvidia.com/gpu        = TP size (TensorRT-LLM's world size; `af3trt serve --world-size` starts one rank per GPU)
    /dev/shm sizeLimit    python-backend tensors of max_batch_size requests in flight (log-mel windows, audio
                          embeddings, prompt table), each counted where a python stub holds it
    memory                /dev/shm (memory-backed, charged to the container) + the engines staged in host memory
                          while they load + a base for tritonserver, the python stubs and the tokenizer
    startupProbe budget   loading the weights from the volume at a conservative rate + a fixed start-up allowance
    nodeSelector          nvidia.com/gpu.product as NVIDIA's GPU feature discovery labels the target GPU

    af3trt k8s overlay --hf-model af3trt/reference --name h100-fp8 --gpu h100 --precision fp8 --kv-cache fp8 \\
        --openai --out deploy/overlays/h100-fp8
    af3trt k8s overlays                      # regenerate every committed overlay (STANDARD_OVERLAYS)
    af3trt k8s init --build-dir /models/af3  # in the pod: check the prepared build, build the engines if absent

The sizes come from build/sizing.py through `pod_resources()` only: one place to repoint when the sizing grows.
Every number here is an estimate for a GPU we have not run on; measure on the GPU before trusting a limit.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from af3trt.build import sizing
from af3trt.build.common import add_flags, flag, from_flags
from af3trt.registry import AF3_REFERENCE_DIR, DECODER_PRECISIONS, KNOWN_GPUS, KV_CACHES, GpuInfo, check_precision
from af3trt.runtime.stages.lengths import MAX_WINDOWS, N_MELS, WINDOW_FRAMES, WINDOW_SECONDS

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
REFERENCE_CONFIG = AF3_REFERENCE_DIR  # the published AF3 sizes (package data)
GIB = 1024**3

# Assumptions of the estimates (not measured on a GPU).
PYTHON_SHM_DEFAULT_BYTES = 1024**2  # python_backend r26.04 src/python_be.cc: shm-default-byte-size = 1 MB per instance
HOST_BASE_BYTES = 8 * GIB  # tritonserver, python stubs (numpy, tokenizers), the OpenAI-less pod's baseline
LOAD_BYTES_PER_SECOND = 100 * 1000**2  # engines read from a network volume (conservative)
STARTUP_ALLOWANCE_SECONDS = 600  # CUDA context, KV-cache allocation, python models, the encoder plan
PROBE_PERIOD_SECONDS = 10


class DeployError(ValueError):
    pass


@dataclass(frozen=True)
class DeployOptions:
    """What an overlay is for (the 'values' of the deployment)."""

    name: str = field(metadata=flag("the overlay's name (deploy/overlays/<name>)"))
    gpu: str = field(default="h100", metadata=flag("the GPU it runs on", choices=sorted(KNOWN_GPUS)))
    precision: str = field(default="bf16", metadata=flag("decoder precision", choices=DECODER_PRECISIONS))
    kv_cache: str = field(default="auto", metadata=flag("KV cache", choices=KV_CACHES))
    tp_size: int = field(default=1, metadata=flag("GPUs per replica (TensorRT-LLM's world size)"))
    max_batch_size: int = field(default=8, metadata=flag("the engine's --max_batch_size (requests in flight per "
                                                         "replica)"))
    max_audio_seconds: int = field(default=600, metadata=flag("audio per request"))
    python_instances: int = 4  # preprocess, encoder, fusion, postprocess (one instance each by default)
    cpus_per_gpu: int = 4
    min_replicas: int = field(default=1, metadata=flag("HPA minReplicas"))
    max_replicas: int = field(default=4, metadata=flag("HPA maxReplicas"))
    queue_compute_target: str = field(default="1000m", metadata=flag(
        "HPA averageValue of af3trt_queue_compute_ratio (1000m = 1.0)"))
    openai: bool = field(default=False, metadata=flag("add the OpenAI-compatible sidecar (port 9000)"))
    build_on_start: bool = field(default=True, metadata=flag("no init container: the engines are built beforehand"))
    build_dir: str = field(default="af3", metadata=flag("/models/<build_dir> on the PVC"))
    storage: str = field(default="200Gi", metadata=flag("the model volume's size"))

    def check(self) -> GpuInfo:
        if self.gpu not in KNOWN_GPUS:
            raise DeployError(f"unknown GPU {self.gpu!r}; known: {', '.join(sorted(KNOWN_GPUS))}")
        if self.precision not in DECODER_PRECISIONS or self.kv_cache not in KV_CACHES:
            raise DeployError(f"precision must be one of {tuple(DECODER_PRECISIONS)} and kv_cache one of {KV_CACHES}")
        if self.tp_size < 1 or self.max_batch_size < 1:
            raise DeployError("tp_size and max_batch_size must be >= 1")
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise DeployError(f"need 1 <= min_replicas <= max_replicas, got {self.min_replicas}, {self.max_replicas}")
        if not 0 < self.max_audio_seconds <= MAX_WINDOWS * WINDOW_SECONDS:
            raise DeployError(f"max_audio_seconds must be in (0, {MAX_WINDOWS * WINDOW_SECONDS}]")
        gpu = KNOWN_GPUS[self.gpu]
        check_precision(self.precision, self.kv_cache, gpu)  # FP8 on an A100 is refused here, as in the build
        return gpu


@dataclass(frozen=True)
class PodResources:
    """One replica's resources, in bytes / counts (rendered as Kubernetes quantities by the overlay)."""

    gpus: int
    gpu_product: str  # nvidia.com/gpu.product label value
    shm_bytes: int
    memory_bytes: int
    cpus: int
    startup_seconds: int
    weights_bytes: int
    fits: bool  # the weights fit in tp_size GPUs with the runtime reserve
    max_concurrent_600s: int  # per replica, from sizing.max_concurrent (capped by max_batch_size at serving)


def shm_bytes_per_request(dec: sizing.DecoderDims, max_audio_seconds: int) -> int:
    """Tensors one request puts through python stubs' shared memory at its largest, counted in both the producing
    and the consuming stub: log-mel windows (preprocess → encoder), audio embeddings (encoder → fusion), and the
    prompt table (fusion → decoder; the C++ decoder reads it once)."""
    windows = math.ceil(max_audio_seconds / WINDOW_SECONDS)
    mel = windows * N_MELS * WINDOW_FRAMES * 4  # [W, 128, 3000] float32
    table = sizing.prompt_table_bytes(dec, sizing.audio_tokens(max_audio_seconds))  # [N, H] engine dtype
    embeddings = sizing.prompt_table_bytes(dec, windows * sizing.audio_tokens(WINDOW_SECONDS))  # [W, 750, H]
    return 2 * mel + 2 * embeddings + table


def _round_up(n: int, unit: int) -> int:
    return -(-n // unit) * unit


def pod_resources(config: dict | Path, opts: DeployOptions) -> PodResources:
    """The sizing plan of one replica for `opts`, from the checkpoint config (build/sizing.py's functions)."""
    gpu = opts.check()
    dec, enc = sizing.dims_from_config(config)
    weights = sizing.decoder_weight_bytes(dec, opts.precision) + (sizing.encoder_weight_bytes(enc) if enc else 0)
    shm = _round_up(opts.max_batch_size * shm_bytes_per_request(dec, opts.max_audio_seconds)
                    + opts.python_instances * PYTHON_SHM_DEFAULT_BYTES, GIB)
    memory = _round_up(shm + weights + HOST_BASE_BYTES, GIB)
    startup = _round_up(STARTUP_ALLOWANCE_SECONDS + math.ceil(weights / LOAD_BYTES_PER_SECOND), 60)
    per_gpu_weights = sizing.decoder_weight_bytes(dec, opts.precision) / opts.tp_size
    fits = per_gpu_weights + sizing.DEFAULT_RESERVE_BYTES < gpu.memory_bytes
    concurrent = sizing.max_concurrent(dec, enc, opts.precision, opts.kv_cache, 600.0,
                                       gpu_bytes=gpu.memory_bytes * opts.tp_size)
    return PodResources(gpus=opts.tp_size, gpu_product=gpu.name.replace(" ", "-"), shm_bytes=shm,
                        memory_bytes=memory, cpus=opts.cpus_per_gpu * opts.tp_size, startup_seconds=startup,
                        weights_bytes=weights, fits=fits, max_concurrent_600s=concurrent)


# ---------------------------------------------------------------------------------------------- overlay files

def _gi(n: int) -> str:
    return f"{n // GIB}Gi"


class _NoAliases(yaml.SafeDumper):
    def ignore_aliases(self, data) -> bool:  # a shared dict is written out twice, never as &anchor / *alias
        return True


def _dump(doc: dict) -> str:
    return yaml.dump(doc, Dumper=_NoAliases, sort_keys=False, default_flow_style=False)


def overlay_files(opts: DeployOptions, res: PodResources) -> dict[str, str]:
    """kustomization.yaml + patches of one overlay (file name → text)."""
    if not res.fits:
        raise DeployError(f"{opts.name}: {opts.precision} weights ({res.weights_bytes / 1e9:.1f} GB) do not fit on "
                          f"{opts.tp_size} x {opts.gpu}: raise the TP size")
    gpu_resources = {"requests": {"cpu": str(res.cpus), "memory": _gi(res.memory_bytes), "nvidia.com/gpu": res.gpus},
                     "limits": {"memory": _gi(res.memory_bytes), "nvidia.com/gpu": res.gpus}}
    pod = {
        "nodeSelector": {"nvidia.com/gpu.product": res.gpu_product},
        "containers": [{
            "name": "triton", "resources": gpu_resources,
            "startupProbe": {"failureThreshold": res.startup_seconds // PROBE_PERIOD_SECONDS,
                             "periodSeconds": PROBE_PERIOD_SECONDS},
        }],
        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": _gi(res.shm_bytes)}}],
    }
    if opts.build_on_start:
        pod["initContainers"] = [{"name": "build-engines", "resources": gpu_resources}]
    deployment = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "af3trt"},
                  "spec": {"template": {"spec": pod}}}
    hpa = {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": "af3trt"},
           "spec": {"minReplicas": opts.min_replicas, "maxReplicas": opts.max_replicas,
                    "metrics": [{"type": "Pods", "pods": {"metric": {"name": "af3trt_queue_compute_ratio"},
                                 "target": {"type": "AverageValue", "averageValue": opts.queue_compute_target}}}]}}
    pvc = {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "af3trt-models"},
           "spec": {"resources": {"requests": {"storage": opts.storage}}}}
    components = (["../../components/build-engines"] if opts.build_on_start else []) + \
                 (["../../components/openai"] if opts.openai else [])
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": ["../../base"],
        **({"components": components} if components else {}),
        "labels": [{"pairs": {"af3trt.io/overlay": opts.name}, "includeSelectors": False}],
        "configMapGenerator": [{"name": "af3trt-plan", "behavior": "merge", "literals": [
            f"AF3TRT_BUILD_DIR={opts.build_dir}", f"AF3TRT_PRECISION={opts.precision}",
            f"AF3TRT_KV_CACHE={opts.kv_cache}", f"AF3TRT_TP_SIZE={opts.tp_size}",
            f"AF3TRT_START_TIMEOUT={res.startup_seconds}"]}],
        "patches": [{"path": "deployment-patch.yaml"}, {"path": "hpa-patch.yaml"}, {"path": "pvc-patch.yaml"}],
    }
    header = (f"# Generated by `af3trt k8s overlay` (build/k8s.py) from {json.dumps(asdict(opts))}.\n"
              f"# Sizing plan (estimates, not measured on a GPU): {json.dumps(asdict(res))}\n")
    return {"kustomization.yaml": header + _dump(kustomization), "deployment-patch.yaml": _dump(deployment),
            "hpa-patch.yaml": _dump(hpa), "pvc-patch.yaml": _dump(pvc)}


def write_overlay(config: dict | Path, opts: DeployOptions, out: Path) -> PodResources:
    res = pod_resources(config, opts)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in overlay_files(opts, res).items():
        (out / name).write_text(text, encoding="utf-8")
    return res


# The overlays committed under deploy/overlays (regenerated by `af3trt k8s overlays`, checked by tests).
STANDARD_OVERLAYS = (
    DeployOptions(name="h100-fp8", gpu="h100", precision="fp8", kv_cache="fp8", max_batch_size=16, openai=True),
    DeployOptions(name="h100-bf16-tp2", gpu="h100", precision="bf16", kv_cache="auto", tp_size=2, max_batch_size=16,
                  max_replicas=2),
    DeployOptions(name="a100-int8wo", gpu="a100", precision="int8_wo", kv_cache="int8", max_batch_size=8,
                  build_on_start=False),
)


# ---------------------------------------------------------------------------------------------- init step

def check_prepared(build_dir: Path, precision: str, kv_cache: str, tp_size: int) -> dict:
    """The prepared build's GPU options, refused unless they are the overlay's (an engine built for another
    precision or TP size would load with the wrong resources, or not at all)."""
    manifest_path = Path(build_dir) / "manifest.json"
    if not manifest_path.exists():
        raise DeployError(f"{manifest_path} is missing: copy the output of `af3trt build --target gpu --prepare-only` "
                          f"to {build_dir}")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    options = (manifest.get("gpu") or {}).get("options") or {}
    found = {"precision": options.get("precision"), "kv_cache": options.get("kv_cache"),
             "tp_size": options.get("tp_size")}
    wanted = {"precision": precision, "kv_cache": kv_cache, "tp_size": tp_size}
    if manifest.get("target") != "gpu" or found != wanted:
        raise DeployError(f"{build_dir} was prepared for {found} (target {manifest.get('target')!r}), "
                          f"this deployment is for {wanted}: prepare again or use the matching overlay")
    return options


def init_engines(build_dir: Path, precision: str, kv_cache: str, tp_size: int) -> bool:
    """Check the prepared build; build the engines and the repository unless they exist. True when it built."""
    check_prepared(build_dir, precision, kv_cache, tp_size)
    if (Path(build_dir) / "model_repository").is_dir():
        print(f"{build_dir}/model_repository exists: engines already built", flush=True)
        return False
    from af3trt.build.gpu_build import build_from_prepared  # TensorRT / trtllm-build are needed from here on

    build_from_prepared(Path(build_dir))
    return True


# ---------------------------------------------------------------------------------------------- CLI

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="af3trt k8s", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    ov = sub.add_parser("overlay", help="write one Kustomize overlay sized for a GPU, precision and TP size")
    ov.add_argument("--hf-model", type=Path, default=REFERENCE_CONFIG, help="checkpoint (config.json) to size from")
    ov.add_argument("--out", type=Path, required=True)
    add_flags(ov, DeployOptions)
    al = sub.add_parser("overlays", help="regenerate the committed overlays under deploy/overlays")
    al.add_argument("--out", type=Path, default=DEPLOY / "overlays")
    it = sub.add_parser("init", help="in the pod: check the prepared build and build the engines if absent")
    it.add_argument("--build-dir", type=Path, required=True)
    it.add_argument("--precision", default=os.environ.get("AF3TRT_PRECISION", "bf16"))
    it.add_argument("--kv-cache", default=os.environ.get("AF3TRT_KV_CACHE", "auto"))
    it.add_argument("--tp-size", type=int, default=int(os.environ.get("AF3TRT_TP_SIZE", "1")))
    args = ap.parse_args(argv)
    try:
        if args.cmd == "overlay":
            config, out = args.hf_model, args.out
            res = write_overlay(config, from_flags(DeployOptions, args), out)
            print(f"wrote {out}: {json.dumps(asdict(res))}")
        elif args.cmd == "overlays":
            for opts in STANDARD_OVERLAYS:
                write_overlay(REFERENCE_CONFIG, opts, args.out / opts.name)
                print(f"wrote {args.out / opts.name}")
        else:
            init_engines(args.build_dir, args.precision, args.kv_cache, args.tp_size)
    except (DeployError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
