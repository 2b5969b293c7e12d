"""GPU backend of the encoder stage: the encoder's TensorRT plan, run by the TensorRT Python runtime on torch CUDA
tensors inside a Triton python-backend model.

Why not Triton's own TensorRT backend: nvcr.io/nvidia/tritonserver:26.04-trtllm-python-py3 ships the TensorRT-LLM
and Python backends only (triton-inference-server/tensorrtllm_backend branch r26.04, docs/build.md: "The Triton
container includes TensorRT-LLM, along with the TensorRT-LLM backend and the Python backend"; Triton maintainers
in triton-inference-server/server issue #7346: "-trtllm-python-py3 only has TRTLLM and Python backends"). A
`platform: "tensorrt_plan"` model does not load there, so the plan runs here, as NVIDIA's multimodal encoders
run theirs (backend "python", GPU tensors handed on through DLPack).

    runner = TrtRunner.load("model_repository/encoder/1/model.plan", device_id=0)
    embeds = encode_windows(runner, features, mask)   # [W, 128, T] f32, [W, T] i32 → [W, T/4, H] f32 (on GPU)
    think = TrtRunner.load(".../think.plan", 0, activations=runner.activations)  # one activation buffer for both

Activation memory: a context created STATIC allocates the engine's device memory for its largest profile itself,
outside torch, one allocation per context (ICudaEngine::createExecutionContext; NVIDIA/TensorRT python/src/infer/
pyCore.cpp as indexed (768d994b): create_execution_context(strategy=ExecutionContextAllocationStrategy.STATIC),
device_memory_size_v2, IExecutionContext.set_device_memory(memory, size)). The runner creates its context
USER_MANAGED instead and points it at a torch buffer (SharedActivations) of device_memory_size_v2 bytes, which the
runners of one stub share: their executions never overlap (one model instance runs one execute at a time, and the
runner waits for each execution to finish), and the buffer is under the stub's torch memory cap
(runtime/engines/gpus.py cap_cuda_memory; build/memory_plan.py counts it there, once).

The runner is generic over shapes: tensor names and dtypes come from the engine, shapes from the tensors it is
given (the window axis W, and the frame axis T when the engine's profile makes it dynamic). TensorRT 10.14 calls
used (NVIDIA/TensorRT branch release/10.14, python/src/infer/pyCore.cpp): Runtime(logger),
deserialize_cuda_engine(bytes) → engine or None; engine.num_io_tensors / get_tensor_name(i) /
get_tensor_mode(name) / get_tensor_dtype(name); create_execution_context(); context.set_input_shape(name, shape)
→ bool; context.get_tensor_shape(name) (output dims once the input shapes are set); set_tensor_address(name,
int pointer) → bool; execute_async_v3(stream_handle: int) → bool, with the GIL released.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from af3trt.registry import SERVING_CONTAINER, TENSORRT_LINE
from af3trt.runtime.engines.encoder_io import INPUT_FEATURES, INPUT_MASK, OUTPUT_EMBEDS

log = logging.getLogger(__name__)


class TrtRunnerError(RuntimeError):
    """The plan cannot be loaded, or TensorRT refused a shape or an execution."""


class TensorRTUnavailable(TrtRunnerError, ImportError):
    """The `tensorrt` Python package is not importable here."""


def import_tensorrt(needed_for: str = "the GPU encoder"):
    """The `tensorrt` module, or TensorRTUnavailable saying where it comes from (the engine build, the GPU encoder
    and `af3trt doctor` all ask through here)."""
    try:
        import tensorrt
    except ImportError as e:
        raise TensorRTUnavailable(
            f"{needed_for} needs TensorRT {TENSORRT_LINE} (`import tensorrt` failed: {e}). It is in "
            f"{SERVING_CONTAINER}; build and serve the GPU target there (the CPU target does not need it).") from e
    return tensorrt


def torch_dtypes(trt) -> dict:
    """TensorRT DataType → torch dtype (pyFoundationalTypes.cpp: float32, float16, bfloat16, int8, int32, int64,
    bool)."""
    pairs = [("float32", torch.float32), ("float16", torch.float16), ("bfloat16", torch.bfloat16),
             ("int8", torch.int8), ("int32", torch.int32), ("int64", torch.int64), ("bool", torch.bool)]
    return {getattr(trt, name): dt for name, dt in pairs if hasattr(trt, name)}


class CudaPlace:
    """The GPU an instance runs on and its own CUDA stream (TensorRT warns that the default stream costs extra
    synchronization). Tests replace this class to run the runner on host memory."""

    def __init__(self, device_id: int):
        self.device = torch.device("cuda", device_id)
        torch.cuda.set_device(self.device)
        self.stream = torch.cuda.Stream(device=self.device)

    def handle(self) -> int:
        return self.stream.cuda_stream

    def after_inputs(self) -> None:
        """Order the engine after the input copies made on the current stream."""
        self.stream.wait_stream(torch.cuda.current_stream(self.device))

    def finish(self) -> None:
        """Outputs are complete (they leave through DLPack to another process)."""
        self.stream.synchronize()


@dataclass(frozen=True)
class IoTensor:
    name: str
    is_input: bool
    dtype: torch.dtype


class SharedActivations:
    """One device buffer for the activation memory of several USER_MANAGED execution contexts whose executions never
    overlap: as large as the largest of them needs; every context is pointed at it again when it grows."""

    def __init__(self, device):
        self.device, self.buffer, self.contexts = device, None, []

    @property
    def nbytes(self) -> int:
        return 0 if self.buffer is None else int(self.buffer.numel())

    def attach(self, context, size: int) -> None:
        self.contexts.append(context)
        if size > self.nbytes:
            self.buffer = None  # the old buffer goes before the larger one is taken
            self.buffer = torch.empty(max(int(size), 1), dtype=torch.uint8, device=self.device)
            for ctx in self.contexts:
                ctx.set_device_memory(self.buffer.data_ptr(), self.nbytes)
        else:
            context.set_device_memory(self.buffer.data_ptr(), self.nbytes)


class TrtRunner:
    """One deserialized engine and one execution context; `run` is called by one Triton model instance at a time."""

    def __init__(self, plan: bytes, place, *, trt=None, source: str = "plan", activations: SharedActivations | None = None):
        trt = trt or import_tensorrt()
        self.place, self.source = place, source
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise TrtRunnerError(f"{source}: TensorRT could not deserialize the engine (built by another TensorRT "
                                 f"version or for another GPU? rebuild it with `af3trt build --from-prepared`)")
        dtypes = torch_dtypes(trt)
        self.io: dict[str, IoTensor] = {}
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            mode = self.engine.get_tensor_mode(name)
            if mode not in (trt.TensorIOMode.INPUT, trt.TensorIOMode.OUTPUT):
                continue
            dt = self.engine.get_tensor_dtype(name)
            if dt not in dtypes:
                raise TrtRunnerError(f"{source}: tensor {name} has TensorRT type {dt}, which has no torch dtype here")
            self.io[name] = IoTensor(name, mode == trt.TensorIOMode.INPUT, dtypes[dt])
        self.context = self.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if self.context is None:
            raise TrtRunnerError(f"{source}: could not create an execution context")
        self.activations = activations or SharedActivations(place.device)
        self.activations.attach(self.context, self.engine.device_memory_size_v2)  # torch.OutOfMemoryError past the cap

    @classmethod
    def load(cls, path: str | Path, device_id: int = 0, *, trt=None,
             activations: SharedActivations | None = None) -> "TrtRunner":
        path = Path(path)
        if not path.is_file():
            raise TrtRunnerError(f"no TensorRT plan at {path}")
        return cls(path.read_bytes(), CudaPlace(device_id), trt=trt, source=str(path), activations=activations)

    @property
    def inputs(self) -> list[str]:
        return [n for n, t in self.io.items() if t.is_input]

    @property
    def outputs(self) -> list[str]:
        return [n for n, t in self.io.items() if not t.is_input]

    def run(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Inputs (any device, converted to the engine's dtypes) → outputs on the runner's device."""
        if set(feeds) != set(self.inputs):
            raise ValueError(f"the engine takes inputs {sorted(self.inputs)}, got {sorted(feeds)}")
        bound = {}
        for name in self.inputs:
            t = feeds[name].to(self.place.device, self.io[name].dtype).contiguous()
            if not self.context.set_input_shape(name, tuple(t.shape)):
                raise ValueError(f"{name} of shape {list(t.shape)} is outside the engine's optimization profile "
                                 f"({self.source})")
            bound[name] = t  # kept alive until the engine has run
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise TrtRunnerError(f"{self.source}: output {name} has unresolved dims {list(shape)}")
            bound[name] = torch.empty(shape, dtype=self.io[name].dtype, device=self.place.device)
        for name, t in bound.items():
            # a zero-size tensor has no storage; TensorRT still wants a non-null address
            if not self.context.set_tensor_address(name, t.data_ptr() or _placeholder(self.place.device)):
                raise TrtRunnerError(f"{self.source}: TensorRT refused the address of {name}")
        self.place.after_inputs()
        if not self.context.execute_async_v3(self.place.handle()):
            raise TrtRunnerError(f"{self.source}: execute_async_v3 failed (TensorRT's log says why)")
        self.place.finish()
        return {n: bound[n] for n in self.outputs}


_PLACEHOLDERS: dict = {}


def _placeholder(device) -> int:
    t = _PLACEHOLDERS.setdefault(str(device), torch.empty(1, dtype=torch.uint8, device=device))
    return t.data_ptr()


def encode_windows(runner: TrtRunner, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The encoder stage on TensorRT with the CPU encoder's contract (triton_repo/encoder/model.py): features
    [W, n_mels, T] f32 and mask [W, T] i32 → audio_embeds [W, T/4, H] f32 on the runner's device. Placeholder
    windows (empty mask) are not computed and come back as zeros, as on the CPU target."""
    if features.ndim != 3 or mask.ndim != 2 or mask.shape != (features.shape[0], features.shape[2]):
        raise ValueError(f"{INPUT_FEATURES} must be [W, mels, T] and {INPUT_MASK} [W, T], got "
                         f"{list(features.shape)} and {list(mask.shape)}")
    live = torch.nonzero(mask.sum(1) > 0).flatten()  # [L]
    if len(live) == len(mask):
        return runner.run({INPUT_FEATURES: features, INPUT_MASK: mask})[OUTPUT_EMBEDS]
    # with no live window, one window is run only to learn the output's row count and width
    pick = live if len(live) else torch.zeros(1, dtype=torch.long)
    out = runner.run({INPUT_FEATURES: features[pick], INPUT_MASK: mask[pick]})[OUTPUT_EMBEDS]  # [L, R, H]
    embeds = torch.zeros((len(mask), *out.shape[1:]), dtype=out.dtype, device=out.device)  # [W, R, H]
    if len(live):
        embeds[live.to(out.device)] = out
    return embeds
