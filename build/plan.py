"""The typed build plan: what a build is asked for, checked once, and handed from stage to stage.

    options (CLI / BuildOptions) ──make_plan──▶ BuildPlan ──▶ build_cpu | build_gpu ──▶ BuildReport
                                                    │                                        │
                                                    └────────────── manifest.json ◀──────────┘

BuildPlan holds the checkpoint's facts (CheckpointFacts), the one ServingConfig every stage derives its sizes and
queues from (the repository configs of both targets, trtllm-build's flags, the memory plan, the encoder profile),
the precisions, the paths and the target GPU. Stages read the plan and return what they produced;
build_engines.build() collects that in a BuildReport and writes manifest.json from plan + report once, at the end.
Nothing reads the manifest back to learn what to build: a `--prepare-only` GPU build saves its plan as
artifacts/build_plan.json, and `--from-prepared` continues from that file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from af3trt.build.common import BuildError, add_flags, flag, flag_fields, from_flags, versions
from af3trt.registry import (CPU_ENCODER_PRECISIONS, DECODER_PRECISIONS, GPU_ENCODER_PRECISIONS, KV_CACHES,
                             GpuInfo, cpu_decoder_precision, read_config, text_config)
from af3trt.runtime.stages import lengths
from af3trt.runtime.stages.params import DecoderParams, EncoderParams
from af3trt.runtime.stages.stop_words import end_and_stop_ids

MANIFEST_FORMAT = 1
PLAN_FORMAT = 2  # artifacts/build_plan.json; 2: the serving configuration under "serving" (1: "limits")
PLAN_FILE = "artifacts/build_plan.json"
ROOT_FILES = ("config.json",)


# ---------------------------------------------------------------------------------------------- serving config

def _spell(name: str) -> str:
    """A field as an error names it: with its flag, so that both a library caller and a CLI user know it."""
    return f"{name} (--{name.replace('_', '-')})"


CPU = ("cpu",)  # a setting of the CPU target's models only (flag metadata `targets`; default: both targets)


@dataclass(frozen=True)
class ServingConfig:
    """What the served model must take, how its stages queue, and their instances and threads: one frozen record.

    Every field with flag metadata is an `af3trt build` flag (generated: add_serving_flags), reaches the repository
    of each target it is for (metadata `targets`, both by default) through build/repository.repo_spec, and is checked
    by tests/test_serving_config.py; a CPU-only setting other than its default is refused on the GPU target. A stage's
    own setting is named by that stage's record (runtime/stages/params.py `serving`), which has the same default
    (tests/test_stage_params.py). The fields without flag metadata are the decoder engine's (trtllm-build). The repository configs, trtllm-build's flags,
    the memory plan and the encoder profile are all derived from this one object."""

    max_batch_size: int = field(default=8, metadata=flag("concurrent sequences in the decoder"))
    max_audio_seconds: float = field(default=float(lengths.MAX_AUDIO_SECONDS), metadata=flag(
        f"audio per request (AF3 reads at most {lengths.MAX_AUDIO_SECONDS})"))
    max_text_len: int = field(default=1024, metadata=flag(
        "text tokens per request besides the audio tokens (chat markup + question)"))
    max_output_len: int = field(default=512, metadata=flag("generated tokens per request at most"))
    default_max_tokens: int = field(default=128, metadata=flag(
        "generated tokens of a request that names no max_tokens (capped at --max-output-len)"))
    max_queue_size: int = field(default=32, metadata=flag(
        "requests that may wait in each stage's queue; more are rejected at once as busy (0: no bound)"))
    queue_timeout_ms: int = field(default=120000, metadata=flag(
        "a request waiting longer than this in a stage's queue is rejected as busy (0: no timeout)"))
    preprocess_instances: int = field(default=1, metadata=flag("instances of the preprocess model"))
    encoder_instances: int = field(default=1, metadata=flag("instances of the encoder model"))
    fusion_instances: int = field(default=1, metadata=flag("instances of the fusion model"))
    decoder_instances: int = field(default=1, metadata=flag(
        "CPU: instances of the decoder model (each batches its own requests)", targets=CPU))
    encoder_queue_delay_us: int = field(default=2000, metadata=flag(
        "how long the encoder's dynamic batcher waits to gather windows"))
    encoder_batching: bool | None = field(default=None, metadata=flag(
        "Triton batches the windows of concurrent requests of one frame bucket into one encoder execution, or not "
        "(--no-...: one request per execution). Default: the target's, off on CPU (measured slower there), on on GPU "
        "(triton_repo/configs.py ENCODER_BATCHING, with the measurements)", type=bool))
    # preprocess crops each request's windows to its frame bucket (runtime/stages/lengths.py); False sends full 30-s windows
    # (what af3trt did before the frame axis was dynamic: the benchmark's "full windows" ablation)
    crop_frames: bool = field(default=True, metadata=flag(
        "send full 30-s windows to the encoder instead of each request's frame bucket (slower; the kept audio "
        "tokens are the same)"))
    # the CPU target's encoder (ONNX Runtime) and decoder; the GPU encoder's batch is its engine profile's
    # (build/memory_plan.py), the GPU decoder the tensorrtllm backend's
    encoder_max_batch: int = field(default=64, metadata=flag("CPU: windows per encoder execution", targets=CPU))
    encoder_windows_per_run: int = field(default=EncoderParams.max_windows_per_run, metadata=flag(
        "CPU: windows per ONNX Runtime run (0: all at once; 2-4 keep a 10-min request's attention buffers in cache: "
        "measured 1.3-2x faster per window than 10 at once)", targets=CPU))
    # both targets: the CPU decoder coalesces its own streams, the GPU target's decoder front the tensorrtllm backend's
    stream_interval_ms: int = field(default=DecoderParams.stream_interval_ms, metadata=flag(
        "the CPU decoder and the GPU target's decoder front: streamed tokens that come faster than one per this many "
        "ms share a response (the first token always goes alone; 0: one response per token)"))
    cpu_threads: int = field(default=0, metadata=flag(
        "CPU: threads per ONNX Runtime / torch model: encoder, decoder (0: their defaults)", targets=CPU))
    encoder_threads: int | None = field(default=None, metadata=flag(
        "CPU: ONNX Runtime threads of the encoder (default: --cpu-threads; its idle threads sleep)", type=int,
        targets=CPU))
    decoder_threads: int | None = field(default=None, metadata=flag(
        "CPU: torch threads of the decoder (default: --cpu-threads)", type=int, targets=CPU))
    # (the GPU target's preprocess keeps torch's own: PreprocessParams.threads 0)
    preprocess_threads: int | None = field(default=1, metadata=flag(
        "CPU: torch threads of the log-mel (one request's features are small)", type=int, targets=CPU))
    # the decoder engine's (build/trtllm_engine.py); tp_size comes from --tp-size (GpuOptions)
    tp_size: int = 1
    max_num_tokens: int | None = None  # per-iteration token budget; None: derived (build/trtllm_engine.py)
    tokens_per_block: int = 32
    max_beam_width: int = 1
    multiple_profiles: bool = True

    def __post_init__(self):
        for name in ("max_batch_size", "max_text_len", "max_output_len", "tp_size", "tokens_per_block",
                     "max_beam_width", "default_max_tokens", "preprocess_instances", "encoder_instances",
                     "fusion_instances", "decoder_instances", "encoder_max_batch"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{_spell(name)} must be a positive integer, got {v!r}")
        for name in ("max_queue_size", "queue_timeout_ms", "encoder_queue_delay_us", "encoder_windows_per_run",
                     "stream_interval_ms", "cpu_threads", "encoder_threads", "decoder_threads", "preprocess_threads"):
            v = getattr(self, name)
            if v is None and name in ("encoder_threads", "decoder_threads", "preprocess_threads"):
                continue  # --cpu-threads
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{_spell(name)} must be an integer >= 0, got {v!r}")
        if not 1 <= self.max_audio_seconds <= lengths.MAX_AUDIO_SECONDS:
            raise ValueError(f"{_spell('max_audio_seconds')} must be in [1, {lengths.MAX_AUDIO_SECONDS}] (AF3's cap), "
                             f"got {self.max_audio_seconds}")
        if self.max_num_tokens is not None and self.max_num_tokens < self.tokens_per_block:
            raise ValueError("max_num_tokens must be at least tokens_per_block")

    @property
    def audio_tokens_per_request(self) -> int:
        """Audio tokens of a clip of exactly max_audio_seconds (AF3's arithmetic: 750 per full 30-s window)."""
        return lengths.audio_tokens_for_samples(int(round(self.max_audio_seconds * lengths.SAMPLE_RATE)))

    @property
    def max_audio_windows(self) -> int:
        return math.ceil(self.max_audio_seconds / lengths.WINDOW_SECONDS)

    @property
    def window_tokens_per_request(self) -> int:
        """Prompt-table rows the repository sizes a request for: its windows x 750 (whole windows)."""
        return self.max_audio_windows * lengths.EMBEDS_PER_WINDOW

    @property
    def max_input_len(self) -> int:
        """Text + audio tokens of one request, as the repository and the decoder engine take them."""
        return self.max_text_len + self.window_tokens_per_request

    @property
    def served_default_max_tokens(self) -> int:
        return min(self.default_max_tokens, self.max_output_len)

    def setting(self, *names: str):
        """The first of the named settings that is set (not None): a stage record's `serving` metadata, e.g.
        ("decoder_threads", "cpu_threads")."""
        return next((v for v in (getattr(self, n) for n in names) if v is not None), None)

    @staticmethod
    def targets(name: str) -> tuple[str, ...]:
        """The build targets a setting is for (its flag metadata; both when it names none)."""
        return next(f.metadata.get("targets", ("cpu", "gpu")) for f in fields(ServingConfig) if f.name == name)

    def check_target(self, target: str) -> None:
        """ValueError naming the flags set to other than their defaults that are not for `target`."""
        default = ServingConfig()
        off = [f"--{f.name.replace('_', '-')}" for f in flag_fields(ServingConfig)
               if target not in self.targets(f.name) and getattr(self, f.name) != getattr(default, f.name)]
        if off:
            raise ValueError(f"{', '.join(off)}: not for the {target} target (settings of the other target's models)")

    def as_manifest(self) -> dict:
        """manifest.json `limits` (its keys predate this class: audio_tokens_per_request is the window rows)."""
        return {"max_batch_size": self.max_batch_size, "max_audio_seconds": self.max_audio_seconds,
                "max_audio_windows": self.max_audio_windows,
                "audio_tokens_per_request": self.window_tokens_per_request, "max_input_len": self.max_input_len,
                "max_output_len": self.max_output_len, "default_max_tokens": self.served_default_max_tokens}


def add_serving_flags(ap: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """ServingConfig's flags (generated from its fields: build/common.add_flags), for `af3trt build` and any tool that
    builds a repository; serving_from_args reads them back."""
    add_flags(ap, ServingConfig)


def serving_from_args(args: argparse.Namespace, **extra) -> ServingConfig:
    """The ServingConfig of the flags add_serving_flags added (ValueError for a value out of range)."""
    return from_flags(ServingConfig, args, **extra)


# ---------------------------------------------------------------------------------------------- options

@dataclass
class GpuOptions:
    """The GPU target's options; the fields with flag metadata are `af3trt build`'s GPU flags (generated)."""

    precision: str = field(default="bf16", metadata=flag("decoder weights/activations (af3trt/registry.py)",
                                                          choices=DECODER_PRECISIONS))
    kv_cache: str = field(default="auto", metadata=flag("KV cache (auto: the engine dtype)", choices=KV_CACHES))
    encoder_precision: str = "fp16"  # from the --encoder-precision both targets take
    tp_size: int = field(default=1, metadata=flag("tensor-parallel size: GPUs per decoder engine"))
    gpu: str | None = field(default=None, metadata=flag(
        "declare the target GPU (h100, a100, l40s, …) when building elsewhere", type=str))
    calib_audio: list[Path] = field(default_factory=list, metadata=flag(
        "audio file for the encoder's INT8/FP8 calibration (repeatable; default: bundled clip)", type=Path))
    prepare_only: bool = field(default=False, metadata=flag(
        "stop before the engine builds; write artifacts/gpu_build_plan.json"))
    engine_dir_at_serve: str | None = field(default=None, metadata=flag(
        "absolute path of the decoder engine inside the serving container", type=str))
    accuracy_report: bool = field(default=True, metadata=flag(
        "skip the decoder's CPU accuracy report (fake quantization vs the unquantized LM)"))
    goldens: bool = field(default=True, metadata=flag(
        "skip the reference answers for `af3trt gpu-check` (artifacts/goldens.json; written where transformers is)"))

    def check(self) -> None:
        for name, value, allowed in (("precision", self.precision, DECODER_PRECISIONS),
                                     ("kv-cache", self.kv_cache, KV_CACHES),
                                     ("encoder-precision", self.encoder_precision, GPU_ENCODER_PRECISIONS)):
            if value not in allowed:
                raise BuildError(f"--{name} must be one of {', '.join(allowed)}, got {value!r}")
        if self.tp_size < 1:
            raise BuildError(f"--tp-size must be >= 1, got {self.tp_size}")

    def as_dict(self) -> dict:
        return {k: ([str(p) for p in v] if k == "calib_audio" else v) for k, v in asdict(self).items()}


@dataclass
class BuildOptions:
    hf_model: Path
    out: Path
    target: str = "cpu"
    force: bool = False
    serving: ServingConfig = field(default_factory=ServingConfig)  # both targets
    # CPU backends
    encoder_precision: str | None = None  # cpu: fp32 | int8 (ORT dynamic); gpu: fp16 | bf16 | fp32 | int8 | fp8
    # the CPU decoder's weights and arithmetic (af3trt/registry.py CPU_DECODER_PRECISIONS; auto: the checkpoint's
    # dtype); the GPU target's decoder precision is GpuOptions.precision
    cpu_decoder_precision: str = "auto"
    think: bool = True  # build think/ (AF3's thinking mode) when the checkpoint has it (build/think.py)
    # the serving-path benchmark (runtime/engines/stand_in.py, perf/serving_path.py): > 0 renders stand-ins for the encoder and
    # decoder that cost nothing and make tokens at this many per second per request
    stand_in_tokens_per_s: float = 0.0
    # CPU target with stand-ins: the GPU target's ensemble shape (the decoder front, at the serving
    # stream_interval_ms, calling a decoder that answers one response per token as the tensorrtllm backend does), for
    # `af3trt bench --serving-path`
    decoder_front: bool = False
    # GPU target (build/gpu_build.py)
    gpu: GpuOptions | None = None


def serving_config(opts: BuildOptions) -> ServingConfig:
    """The plan's ServingConfig: the options' own, with the GPU target's tensor-parallel size."""
    return replace(opts.serving, tp_size=opts.gpu.tp_size if opts.gpu is not None else 1)


# ---------------------------------------------------------------------------------------------- the checkpoint

@dataclass(frozen=True)
class CheckpointFacts:
    """What a build needs to know of a Hugging Face AF3 checkpoint, read once."""

    path: Path
    config: dict  # config.json as read
    text_hidden_size: int
    text_layers: int
    vocab_size: int
    audio_hidden_size: int
    audio_layers: int
    audio_token_id: int | None
    dtype: str | None
    end_id: int
    eos_ids: list[int]
    pad_id: int
    sha256: str = ""
    files: list[str] = field(default_factory=list)
    bytes: int = 0

    @property
    def text(self) -> dict:
        return text_config(self.config)

    @property
    def stop_ids(self) -> list[int]:
        """The end ids after end_id (runtime/stages/stop_words.py): generation stops on any of them."""
        return end_and_stop_ids(self.eos_ids or [self.end_id])[1]

    def summary(self) -> dict:
        """manifest.json `checkpoint.config`."""
        return {k: getattr(self, k) for k in ("text_hidden_size", "text_layers", "vocab_size", "audio_hidden_size",
                                              "audio_layers", "audio_token_id", "dtype", "end_id", "eos_ids",
                                              "pad_id")}

    def as_manifest(self) -> dict:
        return {"path": str(self.path), "config": self.summary(), "sha256": self.sha256, "files": self.files,
                "bytes": self.bytes}


def checkpoint_digest(hf_dir: Path) -> dict:
    """sha256 over config.json and the weight files (name order), with sizes: identifies what was built."""
    files = sorted(p for p in Path(hf_dir).iterdir() if p.suffix == ".safetensors" or p.name in ROOT_FILES)
    h = hashlib.sha256()
    total = 0
    for p in files:
        h.update(p.name.encode())
        with open(p, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
                total += len(chunk)
    return {"sha256": h.hexdigest(), "files": [p.name for p in files], "bytes": total}


def check_safetensors(path: Path) -> None:
    """BuildError naming `path` unless it is a whole safetensors file: an 8-byte little-endian header length, that
    many bytes of JSON header, and the data every tensor's data_offsets reach (the safetensors format, huggingface/
    safetensors README "Format"). Reads the header only. A download or copy cut short otherwise ends the build in
    safetensors' own traceback ("incomplete metadata", or a mapped read past the end) minutes later."""
    import struct

    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
            header = f.read(n) if n is not None and 8 + n <= size else b""
    except OSError as e:
        raise BuildError(f"{path}: cannot be read ({e.strerror or e})") from None
    why = None
    if n is None or 8 + n > size:
        why = "its header is cut short"
    else:
        try:
            tensors = {k: v for k, v in json.loads(header).items() if k != "__metadata__"}
            end = max((int(v["data_offsets"][1]) for v in tensors.values()), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            why = "its header is not safetensors JSON"
        else:
            if 8 + n + end > size:
                why = f"its tensors need {8 + n + end} bytes"
    if why:
        raise BuildError(f"{path}: not a whole safetensors file ({size} bytes; {why}): was the download or copy cut "
                         f"short?")


def inspect_checkpoint(hf_dir: Path, *, digest: bool = False) -> CheckpointFacts:
    """The facts of an AF3 checkpoint directory (BuildError when it is not one); with digest, its sha256 too."""
    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").exists():
        raise BuildError(f"{hf_dir} is not a Hugging Face checkpoint directory (no config.json)")
    try:
        cfg = read_config(hf_dir)
    except (OSError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        raise BuildError(f"{hf_dir / 'config.json'}: cannot be read as JSON ({e})") from None
    if cfg.get("model_type") != "audioflamingo3":
        raise BuildError(f"{hf_dir}: model_type is {cfg.get('model_type')!r}, expected 'audioflamingo3'")
    text, audio = cfg["text_config"], cfg["audio_config"]
    if not any(hf_dir.glob("*.safetensors")):
        raise BuildError(f"{hf_dir} has no .safetensors weights")
    for weights in sorted(hf_dir.rglob("*.safetensors")):
        check_safetensors(weights)
    gen_path = hf_dir / "generation_config.json"
    gen = json.loads(gen_path.read_text(encoding="utf-8")) if gen_path.exists() else {}
    eos = gen.get("eos_token_id", text.get("eos_token_id"))
    eos = eos if isinstance(eos, list) else [eos]
    pad = gen.get("pad_token_id", text.get("pad_token_id"))
    return CheckpointFacts(
        path=hf_dir, config=cfg, text_hidden_size=text["hidden_size"], text_layers=text["num_hidden_layers"],
        vocab_size=text["vocab_size"], audio_hidden_size=audio["hidden_size"],
        audio_layers=audio["num_hidden_layers"], audio_token_id=cfg.get("audio_token_id"),
        dtype=text.get("dtype") or text.get("torch_dtype") or cfg.get("dtype") or cfg.get("torch_dtype"),
        end_id=eos[0], eos_ids=eos, pad_id=pad if pad is not None else eos[0],
        **(checkpoint_digest(hf_dir) if digest else {}))


# ---------------------------------------------------------------------------------------------- the plan

@dataclass
class BuildPlan:
    """Everything a build stage may read. Made once by make_plan(); stages do not change it."""

    target: str  # "cpu" | "gpu"
    out: Path  # where the build output lives once it is moved into place
    options: BuildOptions
    checkpoint: CheckpointFacts
    serving: ServingConfig  # its tp_size is the GPU options'
    encoder_precision: str
    gpu: GpuOptions | None = None
    gpu_target: GpuInfo | None = None  # the declared or detected GPU (None: not known; nothing GPU-specific checked)
    notes: list[str] = field(default_factory=list)
    created_unix: int = field(default_factory=lambda: int(time.time()))

    @property
    def hf_model(self) -> Path:
        return self.checkpoint.path

    def artifacts(self, root: Path | None = None) -> Path:
        """The artifacts directory under `root` (default: the final output)."""
        return Path(root or self.out) / "artifacts"

    # manifest: written once at the end of a build, from the plan and the report -------------------------------

    def manifest(self, report: "BuildReport") -> dict:
        m = {"af3trt_manifest": MANIFEST_FORMAT, "target": self.target, "created_unix": self.created_unix,
             "host": {"machine": platform.machine(), "system": platform.system(), "cpus": os.cpu_count()},
             "versions": versions(),
             "options": {k: str(v) for k, v in asdict(self.options).items() if k not in ("serving", "gpu")},
             "serving": asdict(self.serving), "checkpoint": self.checkpoint.as_manifest(),
             "limits": self.serving.as_manifest()}
        if self.gpu is not None:
            m["gpu"] = {"target": None if self.gpu_target is None else asdict(self.gpu_target), "notes": self.notes,
                        "options": self.gpu.as_dict()}
        return report.merge_into(m)

    # the saved plan of a --prepare-only build --------------------------------------------------------------

    def to_json(self) -> dict:
        opts = {k: v for k, v in asdict(self.options).items() if k not in ("serving", "gpu")}
        return {"af3trt_build_plan": PLAN_FORMAT, "target": self.target, "out": str(self.out),
                "created_unix": self.created_unix,
                "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in opts.items()},
                "checkpoint": {**self.checkpoint.as_manifest(), "hf_config": self.checkpoint.config},
                "serving": asdict(self.serving), "encoder_precision": self.encoder_precision,
                "gpu": None if self.gpu is None else self.gpu.as_dict(),
                "gpu_target": None if self.gpu_target is None else asdict(self.gpu_target), "notes": self.notes}

    @classmethod
    def from_json(cls, doc: dict, out: Path) -> "BuildPlan":
        """The plan saved by a --prepare-only build, for the output now at `out` (it may have been moved)."""
        if doc.get("af3trt_build_plan") != PLAN_FORMAT:
            raise BuildError(f"{out / PLAN_FILE} is not an af3trt build plan of format {PLAN_FORMAT} (found "
                             f"{doc.get('af3trt_build_plan')!r}): prepare it again with this af3trt")
        c = doc["checkpoint"]
        checkpoint = CheckpointFacts(path=Path(c["path"]), config=c["hf_config"], sha256=c["sha256"], files=c["files"],
                                     bytes=c["bytes"], **c["config"])
        g = doc.get("gpu")
        gpu = None if g is None else GpuOptions(**{**g, "calib_audio": [Path(p) for p in g.get("calib_audio", [])]})
        t = doc.get("gpu_target")
        target = None if t is None else GpuInfo(**{**t, "compute_capability": tuple(t["compute_capability"])})
        known = {f.name for f in fields(BuildOptions)}
        serving = ServingConfig(**doc["serving"])
        options = BuildOptions(**{k: v for k, v in doc["options"].items() if k in known - {"serving", "gpu"}},
                               serving=serving, gpu=gpu)
        options.hf_model, options.out = Path(options.hf_model), Path(out)
        return cls(target=doc["target"], out=Path(out), options=options, checkpoint=checkpoint,
                   serving=serving, encoder_precision=doc["encoder_precision"], gpu=gpu,
                   gpu_target=target, notes=list(doc.get("notes") or []), created_unix=doc["created_unix"])

    def save(self, root: Path, **prepared) -> Path:
        """artifacts/build_plan.json under `root`, with what the prepare half produced for the engine half
        (`prepared`, e.g. the encoder ONNX the engine is built from)."""
        path = Path(root) / PLAN_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**self.to_json(), "prepared": prepared}, indent=2, default=str))
        return path


def load_plan(out: Path) -> tuple[BuildPlan, dict]:
    """The plan a --prepare-only build saved in `out`, and what it prepared."""
    path = Path(out) / PLAN_FILE
    if not path.is_file():
        raise BuildError(f"{out} has no {PLAN_FILE}: run `af3trt build --target gpu --prepare-only` first")
    doc = json.loads(path.read_text(encoding="utf-8"))
    return BuildPlan.from_json(doc, Path(out)), dict(doc.get("prepared") or {})


# ---------------------------------------------------------------------------------------------- the report

@dataclass
class BuildReport:
    """What the stages produced and measured, for manifest.json: sections by name (validation figures keyed by
    check), plus the step timings. Stages add to it; nothing reads it to decide what to build."""

    sections: dict = field(default_factory=dict)
    validation: dict = field(default_factory=dict)
    gpu: dict = field(default_factory=dict)  # merged into manifest `gpu` (memory plan, build plan path, options)
    timings_s: dict = field(default_factory=dict)

    def merge_into(self, manifest: dict, *, keep_validation: bool = False) -> dict:
        """`manifest` with this report's sections; keep_validation adds to the validation it has already."""
        manifest["validation"] = {**(manifest.get("validation", {}) if keep_validation else {}), **self.validation}
        manifest.update(self.sections)
        if self.gpu:
            manifest.setdefault("gpu", {}).update(self.gpu)
        if self.timings_s:
            manifest["timings_s"] = dict(self.timings_s)
        return manifest


def check_options(opts: BuildOptions) -> None:
    """Check the options against each other (BuildError), resolving their defaults in place."""
    opts.hf_model, opts.out = Path(opts.hf_model).resolve(), Path(opts.out).resolve()
    if opts.target not in ("cpu", "gpu"):
        raise BuildError(f"--target must be cpu or gpu, got {opts.target!r}")
    if not (opts.stand_in_tokens_per_s >= 0) or math.isinf(opts.stand_in_tokens_per_s):
        raise BuildError(f"--stand-in-tokens-per-s must be a finite number >= 0, got {opts.stand_in_tokens_per_s}")
    try:
        opts.serving.check_target(opts.target)
    except ValueError as e:
        raise BuildError(str(e)) from None
    if opts.stand_in_tokens_per_s and opts.target != "cpu":
        raise BuildError("--stand-in-tokens-per-s is for the CPU target (the GPU target's models are TensorRT's)")
    if opts.decoder_front and not opts.stand_in_tokens_per_s:
        raise BuildError("--decoder-front renders the GPU target's decoder front on a CPU build of stand-ins (the GPU "
                         "target always has it): give --stand-in-tokens-per-s")
    if opts.target == "cpu":
        opts.encoder_precision = opts.encoder_precision or "fp32"
        if opts.encoder_precision not in CPU_ENCODER_PRECISIONS:
            raise BuildError(f"--encoder-precision must be fp32 or int8 on the CPU target, "
                             f"got {opts.encoder_precision!r}")
        cpu_decoder_precision(opts.cpu_decoder_precision, BuildError)
    elif opts.cpu_decoder_precision != BuildOptions.cpu_decoder_precision:  # not the default
        raise BuildError("--cpu-decoder-precision is for the CPU target (the GPU target's is --precision)")
    else:
        opts.gpu = opts.gpu or GpuOptions()
        if opts.encoder_precision:
            opts.gpu.encoder_precision = opts.encoder_precision
        opts.encoder_precision = opts.gpu.encoder_precision
        opts.gpu.check()


def make_plan(opts: BuildOptions, *, gpu_target: GpuInfo | None = None, notes: list[str] | None = None) -> BuildPlan:
    """Check the options against each other and the checkpoint; the plan every stage reads."""
    check_options(opts)
    if not opts.hf_model.is_dir():
        raise BuildError(f"--hf-model {opts.hf_model} is not a directory")
    checkpoint = inspect_checkpoint(opts.hf_model, digest=True)
    return BuildPlan(target=opts.target, out=opts.out, options=opts, checkpoint=checkpoint,
                     serving=serving_config(opts), encoder_precision=opts.encoder_precision, gpu=opts.gpu,
                     gpu_target=gpu_target, notes=list(notes or []))

