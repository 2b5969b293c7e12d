"""The encoder's TensorRT engine: a strongly typed TensorRT 10.14 build of the encoder ONNX.

The precision is in the ONNX (export/onnx_quant.py: fp16/bf16 cast, or INT8/FP8 explicit Q/DQ); the network is
created STRONGLY_TYPED, so TensorRT keeps every tensor's ONNX type and no precision flag is set (BuilderFlag.FP16/
BF16/INT8/FP8 are deprecated since 10.12 and gone in TensorRT 11). Two axes are dynamic: the windows W and the
frames T (each request's windows are cropped to a frame bucket, runtime/stages/lengths.py); one optimization profile
covers both:

    input_features       float32 [W, 128, T]   W: min 1, opt, max;  T: min/opt/max from lengths.FRAME_BUCKETS
    input_features_mask  int32   [W, T]        the same W, T
    audio_embeds         float32 [W, T/4, H]

    W max = max_batch_size x max windows per request (encoder_max_windows): Triton's dynamic batcher may merge the
            windows of every request the decoder can hold; the encoder's Triton max_batch_size is this same number.
    W opt = max / 2 by default, as NVIDIA's Qwen2-Audio example builds its audio engine (1 / max/2 / max).
    T min = the smallest bucket (100 frames, 1 s), max = a full window (3000), opt = the middle bucket (1600)
            unless asked: TensorRT tunes its tactics for opt and runs any T in [min, max] (one profile, so the
            engine serves every bucket; TensorRT 10 "Working with Dynamic Shapes", IOptimizationProfile.set_shape).

    plan = encoder_engine_plan(max_windows=160)      # pure: what will be asked of TensorRT (tests assert it)
    report = build_encoder_engine("encoder.fp16.onnx", "model_repository/encoder/1/model.plan", max_windows=160,
                                  timing_cache="artifacts/encoder.timing.cache")

TensorRT is imported only inside build_encoder_engine: everything else here runs without it.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from af3trt.runtime.stages import lengths
from af3trt.runtime.engines.trt_runner import import_tensorrt
from af3trt.runtime.engines.encoder_io import INPUT_FEATURES, INPUT_MASK, OUTPUT_EMBEDS

log = logging.getLogger(__name__)

DEFAULT_WORKSPACE_GB = 8.0


class EncoderEngineError(RuntimeError):
    """The ONNX could not be parsed, does not have the encoder's inputs, or TensorRT could not build it."""


@dataclass(frozen=True)
class ProfileShape:
    name: str
    dtype: str  # what the ONNX must declare (the Triton contract)
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


@dataclass(frozen=True)
class EncoderEnginePlan:
    """Everything build_encoder_engine asks of TensorRT, decided without it."""

    max_windows: int
    opt_windows: int
    workspace_bytes: int
    min_frames: int
    opt_frames: int
    max_frames: int
    profile: tuple[ProfileShape, ...]
    strongly_typed: bool = True
    precision_flags: tuple[str, ...] = ()  # none: the precision is in the ONNX

    def as_dict(self) -> dict:
        return asdict(self)


def encoder_max_windows(max_batch_size: int, max_audio_windows: int) -> int:
    """Windows the engine must take at once: every sequence the decoder holds, each with its longest audio."""
    if max_batch_size < 1 or max_audio_windows < 1:
        raise ValueError(f"max_batch_size and max_audio_windows must be >= 1, got {max_batch_size}, "
                         f"{max_audio_windows}")
    return max_batch_size * max_audio_windows


def encoder_engine_plan(*, max_windows: int, opt_windows: int | None = None, opt_frames: int | None = None,
                        workspace_gb: float = DEFAULT_WORKSPACE_GB) -> EncoderEnginePlan:
    if max_windows < 1:
        raise ValueError(f"max_windows must be >= 1, got {max_windows}")
    opt = max(1, max_windows // 2) if opt_windows is None else opt_windows
    if not 1 <= opt <= max_windows:
        raise ValueError(f"opt_windows must be in [1, {max_windows}], got {opt}")
    if workspace_gb <= 0:
        raise ValueError(f"workspace_gb must be > 0, got {workspace_gb}")
    buckets = lengths.FRAME_BUCKETS
    t_min, t_max = buckets[0], buckets[-1]
    t_opt = buckets[len(buckets) // 2] if opt_frames is None else opt_frames
    if t_opt not in buckets:
        raise ValueError(f"opt_frames must be a frame bucket ({t_min}, {buckets[1]}, …, {t_max}), got {t_opt}")
    mels = lengths.N_MELS

    def shape(name, dtype, *mid):  # [W, *mid, T]
        return ProfileShape(name, dtype, (1, *mid, t_min), (opt, *mid, t_opt), (max_windows, *mid, t_max))

    return EncoderEnginePlan(
        max_windows=max_windows, opt_windows=opt, workspace_bytes=int(workspace_gb * (1 << 30)),
        min_frames=t_min, opt_frames=t_opt, max_frames=t_max,
        profile=(shape(INPUT_FEATURES, "float32", mels), shape(INPUT_MASK, "int32")))


def _parser_errors(parser) -> list[str]:
    out = []
    for i in range(parser.num_errors):
        e = parser.get_error(i)
        out.append(f"{e.desc()} [node {e.node()} {e.node_name()!r} ({e.node_operator()}), {e.code()}, "
                   f"{e.file()}:{e.line()}]")
    return out


def _check_network(trt, network, plan: EncoderEnginePlan) -> dict:
    """The parsed network has exactly the encoder's inputs, with the plan's dtypes and static dims; returns its
    inputs/outputs for the report."""
    inputs = {t.name: t for t in (network.get_input(i) for i in range(network.num_inputs))}
    outputs = {t.name: t for t in (network.get_output(i) for i in range(network.num_outputs))}
    want_dtype = {"float32": trt.float32, "int32": trt.int32}
    problems = []
    if set(inputs) != {p.name for p in plan.profile}:
        problems.append(f"inputs are {sorted(inputs)}, expected {sorted(p.name for p in plan.profile)}")
    for p in plan.profile:
        t = inputs.get(p.name)
        if t is None:
            continue
        if t.dtype != want_dtype[p.dtype]:
            problems.append(f"{p.name} is {t.dtype}, expected {p.dtype} (the graph I/O must stay as exported)")
        dims = list(t.shape)
        # W and T dynamic, the mel axis static (a profile with max_windows 1 still has a dynamic W)
        want = [-1] + [-1 if lo != hi else lo for lo, hi in zip(p.min[1:], p.max[1:])]
        if dims != want:
            problems.append(f"{p.name} has dims {dims}, expected {want}")
    if OUTPUT_EMBEDS not in outputs:
        problems.append(f"no {OUTPUT_EMBEDS} output (outputs: {sorted(outputs)})")
    elif outputs[OUTPUT_EMBEDS].dtype != trt.float32:
        problems.append(f"{OUTPUT_EMBEDS} is {outputs[OUTPUT_EMBEDS].dtype}, expected float32")
    if problems:
        raise EncoderEngineError("the ONNX is not an af3trt encoder: " + "; ".join(problems))
    return {kind: {n: {"dtype": str(t.dtype), "shape": list(t.shape)} for n, t in ts.items()}
            for kind, ts in (("inputs", inputs), ("outputs", outputs))}


def _write_atomic(path: Path, data) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return path.stat().st_size


def build_encoder_engine(onnx_path: Path, plan_path: Path, *, max_windows: int, opt_windows: int | None = None,
                         opt_frames: int | None = None,
                         workspace_gb: float = DEFAULT_WORKSPACE_GB, timing_cache: Path | None = None,
                         verbose: bool = False) -> dict:
    """Parse `onnx_path`, build a strongly typed engine with one profile over windows × frames, write `plan_path`.

    timing_cache: loaded when the file exists (TensorRT skips the tactic timings it holds) and written back after
    the build with what this build measured; None uses a fresh cache that is not kept.
    Returns the build report (plan, TensorRT version, network I/O, sizes, seconds).
    """
    trt = import_tensorrt("the encoder engine build")
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    if not onnx_path.is_file():
        raise EncoderEngineError(f"{onnx_path}: no such ONNX file")
    plan = encoder_engine_plan(max_windows=max_windows, opt_windows=opt_windows, opt_frames=opt_frames,
                               workspace_gb=workspace_gb)
    t0 = time.perf_counter()

    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # resolves <name>.onnx.data beside the file
        errors = _parser_errors(parser)
        raise EncoderEngineError(f"TensorRT's ONNX parser rejected {onnx_path} ({len(errors)} error(s)):\n  "
                                 + "\n  ".join(errors or ["(no error recorded)"]))
    io = _check_network(trt, network, plan)

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan.workspace_bytes)
    profile = builder.create_optimization_profile()
    for p in plan.profile:
        profile.set_shape(p.name, p.min, p.opt, p.max)
    config.add_optimization_profile(profile)

    cache_in = Path(timing_cache).read_bytes() if timing_cache and Path(timing_cache).is_file() else b""
    cache = config.create_timing_cache(cache_in)
    if not config.set_timing_cache(cache, False):  # ignore_mismatch=False: a cache from another GPU/TRT is refused
        raise EncoderEngineError(f"TensorRT refused the timing cache {timing_cache} (another TensorRT version or "
                                 f"GPU?): delete it to start a new one")

    log.info("building the encoder engine from %s (windows 1/%d/%d, frames %d/%d/%d, workspace %.1f GiB, strongly "
             "typed)", onnx_path.name, plan.opt_windows, plan.max_windows, plan.min_frames, plan.opt_frames,
             plan.max_frames, plan.workspace_bytes / (1 << 30))
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EncoderEngineError(f"TensorRT could not build an engine from {onnx_path} (its log above says why)")
    plan_bytes = _write_atomic(plan_path, serialized)
    cache_bytes = _write_atomic(Path(timing_cache), cache.serialize()) if timing_cache else 0
    seconds = time.perf_counter() - t0
    log.info("wrote %s (%.1f MB) in %.1f s", plan_path, plan_bytes / 1e6, seconds)
    return {"plan_path": str(plan_path), "plan_bytes": plan_bytes, "onnx_path": str(onnx_path),
            "tensorrt_version": getattr(trt, "__version__", "unknown"), "engine_plan": plan.as_dict(),
            "network": io, "timing_cache": {"path": str(timing_cache) if timing_cache else None,
                                            "loaded_bytes": len(cache_in), "saved_bytes": cache_bytes},
            "seconds": round(seconds, 3)}
