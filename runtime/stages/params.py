"""Each python stage's config.pbtxt `parameters` as one typed record: its names, types and defaults, written once.

The build makes the record (build/repository.py fills it, triton_repo/configs.py renders it into the model's config);
the stage's model.py parses the same record back when Triton loads it, so no stage reads a string with a default of
its own:

    build   configs.fusion_config: FusionParams(...).render()  →  config.pbtxt parameters {"vocab_size": "704", ...}
    stage   triton_repo/fusion/model.py: FusionParams.parse(io.params(args))  →  FusionParams(vocab_size=704, ...)

    preprocess   PreprocessParams
    encoder      EncoderParams (ONNX Runtime: CPU target) | EncoderTrtParams (the TensorRT plan: GPU target)
    fusion       FusionParams (runtime/stages/prompt.py's FusionLimits, and what fusion loads)
    decoder      DecoderParams (CPU target; the GPU target's tensorrtllm backend reads upstream's parameters)
    decoder_front DecoderFrontParams (the GPU target's decoder step before the tensorrtllm decoder)
    postprocess  PostprocessParams
    cancel       CancelParams

Types: int, float, bool ("true" | "false"), str, tuple[int, ...] ("1,2"), and X | None (None is not written). The
build writes every field. A field without a default is one the build always sets from the repository (its limits and
facts: their one default is ServingConfig's, build/plan.py); a path defaults to where the build puts it (LM_DIR). A
missing required parameter, an unknown name or a value of the wrong type fails the model's load with a ParamError
naming the model, the parameter and the value.

A field with `serving` metadata is an `af3trt build` setting of ServingConfig (its flag generated there): the build
copies the setting into the record (build/repository.serving_params; the first of the named settings that is set, e.g.
--decoder-threads, else --cpu-threads). The stage's default is the setting's where the setting is for every target the
record serves (tests/test_stage_params.py), so a serving limit that a stage enforces is a field here, its setting in
ServingConfig, and the code that uses it.
"""

from __future__ import annotations

import typing
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import ClassVar

from af3trt.registry import CPU_DECODER_PRECISIONS
from af3trt.runtime.stages import audio_cache
from af3trt.runtime.stages.contract import (CANCEL, DECODER, DECODER_FRONT, ENCODER, FUSION, POSTPROCESS,
                                            PREPROCESS)
from af3trt.runtime.stages.prompt import FusionLimits

# The python backend's own parameters, read by the backend before the stub starts (triton-inference-server/
# python_backend src/python_be.cc ModelState::ModelState: EXECUTION_ENV_PATH, FORCE_CPU_ONLY_INPUT_TENSORS): a stage
# record leaves them to the backend.
PYTHON_BACKEND_PARAMETERS = frozenset({"EXECUTION_ENV_PATH", "FORCE_CPU_ONLY_INPUT_TENSORS"})
BOTH = ("cpu", "gpu")
# The build output's layout (paths relative to it): the language model's directory (weights, tokenizer, chat template)
# and the encoder's ONNX graph (the int8 one is beside it: build/build_engines.py).
LM_DIR = "artifacts/lm"
ENCODER_ONNX = "artifacts/encoder.onnx"


class ParamError(ValueError):
    """A stage's config.pbtxt parameters do not make its record: the model fails to load, with this message."""


def param(*, serving: tuple[str, ...] = (), minimum: int | None = None, **kw) -> Field:
    """A record field: `serving` names the ServingConfig settings that set it (the first that is not None); `minimum`
    bounds a number; `kw` as dataclasses.field (default)."""
    return field(metadata={"serving": serving, "minimum": minimum}, **kw)


def _kind(annotation) -> tuple[type, bool]:
    """(the value type, whether None is allowed) of a field's annotation."""
    args = typing.get_args(annotation)
    if type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        return _kind(inner)[0], True
    return (tuple if typing.get_origin(annotation) is tuple else annotation), False


def _render(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def _read(kind: type, text: str):
    """A parameter's text as `kind` (ValueError with what was expected)."""
    if kind is bool:
        if text not in ("true", "false"):
            raise ValueError("must be true or false")
        return text == "true"
    if kind is tuple:
        try:
            return tuple(int(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise ValueError("must be integers separated by commas") from None
    if kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            raise ValueError(f"must be {'an integer' if kind is int else 'a number'}") from None
    return text


def _fits(kind: type, value) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is tuple:
        return isinstance(value, tuple) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    return isinstance(value, kind)


class StageParams:
    """What every stage record shares: type checks on construction, render() for the build, parse() for the stage.
    MODEL: the Triton model it configures; TARGETS: the build targets whose repository has it."""

    MODEL: ClassVar[str]
    TARGETS: ClassVar[tuple[str, ...]] = BOTH

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            kind, optional = _kind(hints[f.name])
            value = getattr(self, f.name)
            if value is None and optional:
                continue
            if not _fits(kind, value):
                raise ParamError(f"{self.MODEL}: parameter {f.name} must be {kind.__name__}, got {value!r}")
            low = f.metadata.get("minimum")
            if low is not None and value < low:
                raise ParamError(f"{self.MODEL}: parameter {f.name} must be >= {low}, got {value!r}")
        self.check()

    def check(self) -> None:
        """A record's own checks beyond each field's type (ParamError)."""

    def render(self) -> dict[str, str]:
        """The config.pbtxt parameters of this record: every field that is not None."""
        return {f.name: _render(getattr(self, f.name)) for f in fields(self) if getattr(self, f.name) is not None}

    @classmethod
    def parse(cls, params: dict[str, str]):
        """The record of a model's config.pbtxt parameters (`triton_io.params(args)`); ParamError when a required
        one is missing, one is unknown or a value is not of its field's type."""
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(params) - set(known) - PYTHON_BACKEND_PARAMETERS)
        if unknown:
            raise ParamError(f"{cls.MODEL}: unknown parameter(s) {', '.join(unknown)} (this model reads "
                             f"{', '.join(known)}: runtime/stages/params.py {cls.__name__})")
        hints = typing.get_type_hints(cls)
        values = {}
        for name, f in known.items():
            if name not in params:
                if f.default is MISSING and f.default_factory is MISSING:
                    raise ParamError(f"{cls.MODEL}: parameter {name} is required (the build writes it)")
                continue
            try:
                values[name] = _read(_kind(hints[name])[0], params[name])
            except ValueError as e:
                raise ParamError(f"{cls.MODEL}: parameter {name} {e}, got {params[name]!r}") from None
        return cls(**values)

    @classmethod
    def serving_fields(cls) -> list[Field]:
        """The fields that ServingConfig settings set."""
        return [f for f in fields(cls) if f.metadata.get("serving")]


@dataclass(frozen=True)
class PreprocessParams(StageParams):
    MODEL: ClassVar[str] = PREPROCESS

    max_audio_windows: int = param(minimum=1)  # per request
    crop_frames: bool = param(default=True, serving=("crop_frames",))  # windows cropped to the request's frame bucket
    threads: int = param(default=0, serving=("preprocess_threads", "cpu_threads"), minimum=0)  # torch's; 0: its own
    cache_bytes: int = param(default=audio_cache.DEFAULT_PREPROCESS_BYTES, minimum=0)  # prepared clips (LRU)
    gpu_kernels: bool = False  # the log-mel on the device (af3trt.kernels)
    kernels_device: str = "cuda"
    cuda_memory_cap_bytes: int | None = None  # build/memory_plan.py stub_caps (GPU target)


@dataclass(frozen=True)
class EncoderParams(StageParams):
    """The CPU target's encoder: the ONNX graph on ONNX Runtime, or the serving-path benchmark's stand-in."""

    MODEL: ClassVar[str] = ENCODER
    TARGETS: ClassVar[tuple[str, ...]] = ("cpu",)

    onnx_path: str = ENCODER_ONNX  # relative to the build output, or absolute
    intra_op_threads: int = param(default=0, serving=("encoder_threads", "cpu_threads"), minimum=0)  # 0: ORT's own
    # windows per ONNX Runtime run (0: all of an execution at once): a 10-min request's attention buffers stay in cache
    max_windows_per_run: int = param(default=2, serving=("encoder_windows_per_run",), minimum=0)
    think_onnx_path: str | None = None  # think/'s encoder variant (build/think.py)
    cache_bytes: int = param(default=audio_cache.DEFAULT_ENCODER_BYTES, minimum=0)  # computed windows (LRU)
    stand_in_hidden_size: int | None = None  # runtime/engines/stand_in.py: zeros of this width, no ONNX Runtime


@dataclass(frozen=True)
class EncoderTrtParams(StageParams):
    """The GPU target's encoder: the TensorRT plan in the model's version directory."""

    MODEL: ClassVar[str] = ENCODER
    TARGETS: ClassVar[tuple[str, ...]] = ("gpu",)

    plan_file: str = "model.plan"
    think_plan_file: str | None = None  # think/'s encoder variant, beside plan_file (build/think.py)
    cache_bytes: int = param(default=audio_cache.DEFAULT_ENCODER_BYTES, minimum=0)
    cuda_memory_cap_bytes: int | None = None


@dataclass(frozen=True, kw_only=True)
class FusionParams(FusionLimits, StageParams):
    """FusionLimits (what the prompt builder and the sampling checks read) and what fusion loads."""

    MODEL: ClassVar[str] = FUSION

    tokenizer_dir: str = LM_DIR
    think: bool = False  # built with think/ (AF3's thinking mode)
    think_lora_task_id: int | None = None  # the decoder's LoRA task id of think/'s adapter, when it has one
    gpu_kernels: bool = False  # the prompt table on the device (af3trt.kernels)
    kernels_device: str = "cuda"
    cuda_memory_cap_bytes: int | None = None
    guide_check: bool = False  # compile each guide before it goes on (the GPU target: build/trtllm_guided.py)


@dataclass(frozen=True)
class DecoderParams(StageParams):
    """The CPU target's decoder (runtime/engines/decoder.py, or the stand-in of runtime/engines/stand_in.py)."""

    MODEL: ClassVar[str] = DECODER
    TARGETS: ClassVar[tuple[str, ...]] = ("cpu",)

    max_batch_size: int = param(minimum=1)
    max_input_len: int = param(minimum=1)
    max_output_len: int = param(minimum=1)
    # the engine's own waiting list, as Triton bounds the other stages' queues (0: unbounded / no timeout)
    max_queue_size: int = param(minimum=0)
    queue_timeout_ms: int = param(minimum=0)
    gpt_model_path: str = LM_DIR
    precision: str = "auto"  # a CPU decoder precision of af3trt/registry.py (its record says how the weights load)
    threads: int = param(default=0, serving=("decoder_threads", "cpu_threads"), minimum=0)  # torch's; 0: its own
    # a stream's tokens that come faster than one per this many ms share a response (runtime/stages/coalesce.py;
    # the first token always goes alone); 0: one response per token
    stream_interval_ms: int = param(default=50, serving=("stream_interval_ms",), minimum=0)
    lora_dir: str | None = None  # think/'s adapter (runtime/engines/lora.py)
    prefix_cache_bytes: int = param(default=audio_cache.DEFAULT_PREFIX_BYTES, minimum=0)
    stand_in_tokens_per_s: float = 0.0  # > 0: the serving-path benchmark's stand-in at this rate

    def check(self) -> None:
        if self.precision not in CPU_DECODER_PRECISIONS:
            raise ParamError(f"{self.MODEL}: parameter precision must be one of {', '.join(CPU_DECODER_PRECISIONS)}, "
                             f"got {self.precision!r}")
        if self.stand_in_tokens_per_s < 0:
            raise ParamError(f"{self.MODEL}: parameter stand_in_tokens_per_s must be >= 0, got "
                             f"{self.stand_in_tokens_per_s}")


@dataclass(frozen=True)
class DecoderFrontParams(StageParams):
    """The decoder front (runtime/triton/decoder_front.py): the GPU target's decoder step, before the tensorrtllm
    decoder; on the CPU target only in the serving-path benchmark's GPU ensemble shape (RepoSpec.decoder_front)."""

    MODEL: ClassVar[str] = DECODER_FRONT

    decoder_model: str = DECODER  # the model it calls by BLS
    # a stream's tokens that come faster than one per this many ms share a response (runtime/stages/coalesce.py;
    # the first token always goes alone); 0: one response per token
    stream_interval_ms: int = param(default=50, serving=("stream_interval_ms",), minimum=0)
    # think/'s adapter (build/think.py gpu_spec): its folder, the decoder's LoRA task id, the engine's dtype it is
    # sent in, and whether the backend holds it preloaded (then only the task id is sent)
    lora_dir: str | None = None
    lora_task: int | None = None
    lora_dtype: str | None = None
    lora_preloaded: bool = False

    def check(self) -> None:
        given = [self.lora_dir is not None, self.lora_task is not None, self.lora_dtype is not None]
        if any(given) and not all(given):
            raise ParamError(f"{self.MODEL}: parameters lora_dir, lora_task and lora_dtype go together, got "
                             f"{self.lora_dir!r}, {self.lora_task!r}, {self.lora_dtype!r}")


@dataclass(frozen=True)
class PostprocessParams(StageParams):
    MODEL: ClassVar[str] = POSTPROCESS

    tokenizer_dir: str = LM_DIR
    stop_ids: tuple[int, ...] = ()  # the checkpoint's end ids after end_id, trimmed (runtime/stages/stop_words.py)


@dataclass(frozen=True)
class CancelParams(StageParams):
    MODEL: ClassVar[str] = CANCEL

    stop_model: str | None = None  # the tensorrtllm decoder to send a stop request to (GPU target)


RECORDS: tuple[type[StageParams], ...] = (PreprocessParams, EncoderParams, EncoderTrtParams, FusionParams,
                                          DecoderParams, DecoderFrontParams, PostprocessParams, CancelParams)


def record_of(model: str, target: str) -> type[StageParams] | None:
    """The record of a model's parameters on a target; None where the model is not a python stage of ours (the GPU
    target's decoder: the tensorrtllm backend)."""
    found = [r for r in RECORDS if r.MODEL == model and target in r.TARGETS]
    return found[0] if found else None
