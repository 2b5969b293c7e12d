"""A stand-in for TensorRT 10.14's Python module (`import tensorrt`), importable from disk.

It exists so that the container half of af3trt (engine build, GPU encoder model) runs here, in a real
interpreter, against the API it will meet. Every name below is one the real module has; the signatures and
return conventions are those of NVIDIA/TensorRT branch release/10.14, python/src/infer/pyCore.cpp (bindings)
and pyFoundationalTypes.cpp (DataType):

  Runtime(logger).deserialize_cuda_engine(serialized_engine) -> ICudaEngine | None (None: not a plan)
  ICudaEngine: num_io_tensors, get_tensor_name(index), get_tensor_mode(name) -> TensorIOMode.INPUT|OUTPUT,
               get_tensor_dtype(name), get_tensor_shape(name) (-1 for a dynamic axis), create_execution_context()
  ICudaEngine.create_execution_context(strategy=ExecutionContextAllocationStrategy.STATIC) (None when its device
               memory cannot be had), device_memory_size_v2 (the activation memory of the largest profile)
  IExecutionContext: set_device_memory(memory, size) (USER_MANAGED contexts run on memory the caller owns),
               set_input_shape(name, shape) -> bool (False outside the optimization profile),
               get_tensor_shape(name) (an output's dims are known once every input shape is set),
               set_tensor_address(name, memory: int) -> bool, execute_async_v3(stream_handle: int) -> bool
  DataType.FLOAT/HALF/BF16/INT32/INT64/BOOL/INT8, with module aliases float32, float16, bfloat16, int32, …
  Builder side: Logger, Builder.create_network(flags), NetworkDefinitionCreationFlag.STRONGLY_TYPED, OnnxParser,
               create_builder_config, set_memory_pool_limit(MemoryPoolType.WORKSPACE, n),
               create_optimization_profile().set_shape(name, min, opt, max), create_timing_cache(bytes),
               set_timing_cache(cache, ignore_mismatch) -> bool, build_serialized_network(network, config)

  OnnxParser.get_error(i) -> IParserError: desc(), node(), node_name(), node_operator(), code(), file(), line()
               (python/src/parsers/pyOnnx.cpp)

What is faked: the plan is JSON holding the ONNX the engine was built from (its bytes: the plan is moved, the ONNX's
scratch directory is not), its I/O, its profile and its
activation memory (a stand-in figure: 16 x the bytes of the profile's largest inputs); a STATIC context charges that
memory, and deserializing charges the weights (the ONNX's initializers), to the GPU stand-in in force (fakes.cuda_memory,
when a test installs one: TensorRT's allocations go beside torch's, not through it); a USER_MANAGED context runs only
on memory set with set_device_memory of at least device_memory_size_v2 bytes. The
parser presents the encoder's I/O (runtime/engines/encoder_io.py) with the ONNX's output width when onnxruntime can read
it. Executing reads the inputs from the bound addresses and writes the output at its bound address (host memory:
torch CPU tensors stand in for CUDA ones) after running the ONNX with ONNX Runtime, so a GPU-encoder test can
compare with the CPU encoder. Where onnxruntime is absent (the container env) engines build but do not execute.

`calls` records every builder and runtime call as (api, args), in order. For tests that need their own copy with a
scripted outcome (the parser fails, the builder returns None, the timing cache is refused, the parser presents
other I/O), `fresh(...)` loads a private copy of this module: its `calls` and knobs are its own.
"""

from __future__ import annotations

import ctypes
import enum
import importlib.util
import json

import numpy as np

__version__ = "10.14.1.48"
PLAN_MAGIC = "af3trt-fake-tensorrt-plan"
calls: list[tuple] = []  # (api, args) in call order, for tests that want to see the sequence
built_plans: list[bytes] = []  # what build_serialized_network returned, in order

# Scripted outcomes (set by fresh() on a private copy): the parser's verdict, the builder's, the timing cache's,
# and the I/O the parser presents ([(name, DataType name, dims)] for inputs and outputs; None: read the ONNX).
PARSE_OK, BUILD_OK, ACCEPT_CACHE, IO = True, True, True, None


def fresh(*, parse_ok: bool = True, build_ok: bool = True, accept_cache: bool = True,
          io: tuple[list, list] | None = None):
    """A private copy of this module (its own `calls`), scripted: parse_ok=False makes the parser fail with two
    errors, build_ok=False makes build_serialized_network return None, accept_cache=False makes set_timing_cache
    refuse, io=(inputs, outputs) of (name, "FLOAT"|"HALF"|"INT32"|..., dims) is what the parser presents."""
    spec = importlib.util.spec_from_file_location("tensorrt", __file__)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.PARSE_OK, mod.BUILD_OK, mod.ACCEPT_CACHE, mod.IO = parse_ok, build_ok, accept_cache, io
    return mod


class DataType(enum.Enum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    BF16 = 7
    INT64 = 8


float32, float16, int8, int32, bool, bfloat16, int64 = (DataType.FLOAT, DataType.HALF, DataType.INT8,  # noqa: A001
                                                       DataType.INT32, DataType.BOOL, DataType.BF16, DataType.INT64)
_NP = {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "INT32": np.int32, "BOOL": np.bool_,
       "INT64": np.int64}
_ORT = {"tensor(float)": "FLOAT", "tensor(float16)": "HALF", "tensor(int32)": "INT32", "tensor(int64)": "INT64"}


def nptype(dtype: DataType):
    return _NP[dtype.name]


class ExecutionContextAllocationStrategy(enum.Enum):
    STATIC = 0
    ON_PROFILE_CHANGE = 1
    USER_MANAGED = 2


class TensorIOMode(enum.Enum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class NetworkDefinitionCreationFlag(enum.IntEnum):
    STRONGLY_TYPED = 1


class MemoryPoolType(enum.Enum):
    WORKSPACE = 0


class Logger:
    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

    def __init__(self, min_severity=2):
        calls.append(("Logger", (min_severity,)))
        self.min_severity = min_severity


# ---- builder side -----------------------------------------------------------------------------------------------

class _Tensor:
    def __init__(self, name, dtype, shape):
        self.name, self.dtype, self.shape = name, dtype, tuple(shape)


class _Network:
    def __init__(self):
        self.inputs, self.outputs, self.onnx = [], [], None

    num_inputs = property(lambda self: len(self.inputs))
    num_outputs = property(lambda self: len(self.outputs))

    def get_input(self, i):
        return self.inputs[i]

    def get_output(self, i):
        return self.outputs[i]


def _onnx_io(path: str):
    """The encoder's I/O as TensorRT's parser presents it (dynamic axes -1); output width from the ONNX if it can."""
    frames, width = -1, -1  # without onnxruntime: our export's contract (dynamic window and frame axes)
    try:
        import onnxruntime as ort

        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        ins = {i.name: i for i in sess.get_inputs()}
        outs = {o.name: o for o in sess.get_outputs()}
        dims = lambda shape: tuple(d if isinstance(d, int) else -1 for d in shape)  # noqa: E731
        return ([_Tensor(n, DataType[_ORT[i.type]], dims(i.shape)) for n, i in ins.items()],
                [_Tensor(n, DataType[_ORT[o.type]], dims(o.shape)) for n, o in outs.items()])
    except ImportError:
        pass
    return ([_Tensor("input_features", DataType.FLOAT, (-1, 128, frames)),
             _Tensor("input_features_mask", DataType.INT32, (-1, frames))],
            [_Tensor("audio_embeds", DataType.FLOAT, (-1, -1, width))])


class _ParserError:
    """What the parser reports for an operator it cannot import (IParserError)."""

    def desc(self):
        return "Unsupported operator Foo"

    def node(self):
        return 7

    def node_name(self):
        return "/audio_tower/Foo"

    def node_operator(self):
        return "Foo"

    def code(self):
        return "ErrorCode.UNSUPPORTED_NODE"

    def file(self):
        return "onnxOpImporters.cpp"

    def line(self):
        return 123


class OnnxParser:
    def __init__(self, network, logger):
        calls.append(("OnnxParser", (network, logger)))
        self.network, self.num_errors = network, 0

    def parse_from_file(self, path):
        calls.append(("parse_from_file", (path,)))
        if not PARSE_OK:
            self.num_errors = 2
            return False
        if IO is not None:
            self.network.inputs, self.network.outputs = ([_Tensor(n, DataType[dt], dims) for n, dt, dims in side]
                                                         for side in IO)
        else:
            self.network.inputs, self.network.outputs = _onnx_io(path)
        self.network.onnx = str(path)
        return True

    def get_error(self, i):
        if not 0 <= i < self.num_errors:
            raise IndexError(i)
        return _ParserError()


class _Profile:
    def __init__(self):
        calls.append(("create_optimization_profile", ()))
        self.shapes = {}

    def set_shape(self, name, mn, opt, mx):
        calls.append(("set_shape", (name, tuple(mn), tuple(opt), tuple(mx))))
        self.shapes[name] = [list(mn), list(opt), list(mx)]


class _TimingCache:
    def __init__(self, blob):
        self.blob = bytes(blob)

    def serialize(self):
        calls.append(("serialize_cache", ()))
        return self.blob + b"+timings"


class _BuilderConfig:
    def __init__(self):
        calls.append(("create_builder_config", ()))
        self.profiles, self.pools = [], {}

    def set_memory_pool_limit(self, pool, size):
        calls.append(("set_memory_pool_limit", (pool, size)))
        self.pools[pool.name] = size

    def add_optimization_profile(self, profile):
        calls.append(("add_optimization_profile", (profile,)))
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, blob):
        calls.append(("create_timing_cache", (bytes(blob),)))
        return _TimingCache(blob)

    def set_timing_cache(self, cache, ignore_mismatch):
        calls.append(("set_timing_cache", (cache, ignore_mismatch)))
        return ACCEPT_CACHE

    def set_flag(self, flag):
        calls.append(("set_flag", (flag,)))


class Builder:
    def __init__(self, logger):
        calls.append(("Builder", (logger,)))
        self.logger = logger

    def create_network(self, flags=0):
        calls.append(("create_network", (flags,)))
        return _Network()

    def create_builder_config(self):
        return _BuilderConfig()

    def create_optimization_profile(self):
        return _Profile()

    def build_serialized_network(self, network, config):
        calls.append(("build_serialized_network", (network, config)))
        if not BUILD_OK:
            return None  # TensorRT logs why and returns nullptr
        profile = config.profiles[0].shapes if config.profiles else {}
        largest = sum(int(np.prod(mx)) * np.dtype(nptype(t.dtype)).itemsize for t in network.inputs
                      for mx in [profile.get(t.name, [[1], [1], [1]])[2]])
        import base64
        import os

        onnx_bytes = open(network.onnx, "rb").read() if network.onnx and os.path.exists(network.onnx) else b""
        plan = {"magic": PLAN_MAGIC, "version": __version__, "onnx": network.onnx,
                "onnx_bytes": base64.b64encode(onnx_bytes).decode(),  # the "weights": the plan outlives the path
                "io": [[t.name, "INPUT", t.dtype.name, list(t.shape)] for t in network.inputs]
                + [[t.name, "OUTPUT", t.dtype.name, list(t.shape)] for t in network.outputs],
                "profile": profile, "device_memory_size": 16 * largest, "weights_bytes": _initializer_bytes(network.onnx)}
        built_plans.append(json.dumps(plan).encode())
        return built_plans[-1]


# ---- runtime side -----------------------------------------------------------------------------------------------

class Runtime:
    def __init__(self, logger):
        self.logger = logger

    def deserialize_cuda_engine(self, serialized_engine):
        calls.append(("deserialize_cuda_engine", ()))
        try:
            plan = json.loads(bytes(serialized_engine))
        except (ValueError, UnicodeDecodeError):
            return None  # TensorRT logs the error and returns nullptr
        if not (isinstance(plan, dict) and plan.get("magic") == PLAN_MAGIC):
            return None
        if not _charge(int(plan.get("weights_bytes", 0)), "weights"):
            return None
        return ICudaEngine(plan)


def _initializer_bytes(path) -> int:
    """The engine's weights: the ONNX's initializers (what TensorRT keeps of them, at their stored precision); the
    file's size where onnx is absent (the container env)."""
    import os

    if not path or not os.path.exists(path):
        return 0
    try:
        import onnx
        from onnx import helper
    except ImportError:
        return os.path.getsize(path)
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception:  # noqa: BLE001 - not an ONNX (a test's placeholder file): its size stands in
        return os.path.getsize(path)
    return sum(int(np.prod(t.dims)) * np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
               for t in model.graph.initializer)


def _charge(size: int, what: str) -> bool:
    """TensorRT's own device allocation, against the GPU stand-in in force (fakes.cuda_memory), if any."""
    import sys

    memory = sys.modules.get("fakes.cuda_memory")
    return memory is None or memory.trt_allocate(size, what)


class ICudaEngine:
    def __init__(self, plan):
        self.plan = plan
        self.io = {name: (TensorIOMode[mode], DataType[dt], tuple(shape)) for name, mode, dt, shape in plan["io"]}
        self.names = [name for name, *_ in plan["io"]]

    @property
    def num_io_tensors(self):
        return len(self.names)

    def get_tensor_name(self, index):
        return self.names[index]

    def get_tensor_mode(self, name):
        return self.io[name][0] if name in self.io else TensorIOMode.NONE

    def get_tensor_dtype(self, name):
        return self.io[name][1]

    def get_tensor_shape(self, name):
        return self.io[name][2]

    @property
    def device_memory_size_v2(self):
        return int(self.plan.get("device_memory_size", 0))

    def create_execution_context(self, strategy=ExecutionContextAllocationStrategy.STATIC):
        calls.append(("create_execution_context", (strategy,)))
        if strategy is ExecutionContextAllocationStrategy.STATIC and not _charge(self.device_memory_size_v2,
                                                                                 "execution context"):
            return None  # createExecutionContext: nullptr when the activation memory cannot be allocated
        return IExecutionContext(self, strategy)


_MEMO: dict = {}  # the last few executions' outputs by their inputs' digest (a speed-up of the fake, nothing more)


class IExecutionContext:
    def __init__(self, engine: ICudaEngine, strategy=ExecutionContextAllocationStrategy.STATIC):
        self.engine, self.shapes, self.addresses, self._session = engine, {}, {}, None
        self.strategy, self.device_memory = strategy, None

    def set_device_memory(self, memory, size):
        calls.append(("set_device_memory", (memory, size)))
        self.device_memory = (int(memory), int(size))

    def _inputs(self):
        return [n for n in self.engine.names if self.engine.io[n][0] is TensorIOMode.INPUT]

    def set_input_shape(self, name, shape):
        calls.append(("set_input_shape", (name, tuple(shape))))
        mode, _, dims = self.engine.io.get(name, (None, None, ()))
        shape = tuple(int(d) for d in shape)
        if mode is not TensorIOMode.INPUT or len(shape) != len(dims):
            return False
        if any(d != -1 and d != s for d, s in zip(dims, shape)):
            return False
        mn, _, mx = self.engine.plan["profile"].get(name, [shape, shape, shape])
        if any(not lo <= s <= hi for s, lo, hi in zip(shape, mn, mx)):
            return False  # outside the optimization profile
        self.shapes[name] = shape
        return True

    def _run(self, feeds):
        import onnxruntime as ort  # only where the fake executes (our venv); the container env lacks it

        if self._session is None:
            import base64

            model = base64.b64decode(self.engine.plan["onnx_bytes"]) if self.engine.plan.get("onnx_bytes") \
                else self.engine.plan["onnx"]
            self._session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
        outs = [n for n in self.engine.names if self.engine.io[n][0] is TensorIOMode.OUTPUT]
        import hashlib

        key = hashlib.sha1(b"".join(np.ascontiguousarray(feeds[n]).tobytes() for n in sorted(feeds))).digest()
        if key not in _MEMO:  # the engine is a function of its inputs: the same features, the same rows, at once
            _MEMO[key] = dict(zip(outs, self._session.run(outs, feeds)))
            while len(_MEMO) > 4:
                _MEMO.pop(next(iter(_MEMO)))
        return {n: v.copy() for n, v in _MEMO[key].items()}

    def get_tensor_shape(self, name):
        mode, _, dims = self.engine.io[name]
        if mode is TensorIOMode.INPUT:
            return self.shapes.get(name, dims)
        if any(n not in self.shapes for n in self._inputs()):
            return dims
        # the output's shape follows from the input shapes: run the ONNX once on zeros of those shapes
        zeros = {n: np.zeros(self.shapes[n], nptype(self.engine.io[n][1])) for n in self._inputs()}
        return tuple(self._run(zeros)[name].shape)

    def set_tensor_address(self, name, memory):
        calls.append(("set_tensor_address", (name,)))
        if name not in self.engine.io or not isinstance(memory, int) or memory == 0:
            return False
        self.addresses[name] = memory
        return True

    def execute_async_v3(self, stream_handle):
        calls.append(("execute_async_v3", (stream_handle,)))
        if not isinstance(stream_handle, int):
            raise TypeError("execute_async_v3(): stream_handle must be an int (a cudaStream_t)")
        if any(n not in self.shapes for n in self._inputs()) or any(n not in self.addresses for n in self.engine.names):
            return False  # TensorRT: "not all shapes are specified" / "address is not set"
        if self.strategy is ExecutionContextAllocationStrategy.USER_MANAGED and (
                self.device_memory is None or self.device_memory[1] < self.engine.device_memory_size_v2):
            return False  # a USER_MANAGED context without (enough) device memory set

        def view(name, shape):
            dtype = np.dtype(nptype(self.engine.io[name][1]))
            n = int(np.prod(shape)) * dtype.itemsize
            return np.frombuffer((ctypes.c_byte * n).from_address(self.addresses[name]), dtype).reshape(shape)

        feeds = {n: view(n, self.shapes[n]).copy() for n in self._inputs()}
        for name, value in self._run(feeds).items():
            view(name, value.shape)[...] = value
        return True
