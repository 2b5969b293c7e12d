"""A strict fake of TensorRT-LLM's `tensorrtllm` Triton backend: Triton core's input validation in front of it, the
checks the backend and the executor make on what we feed them, and a stand-in generation behind them. It enforces
upstream's checks (each cited where it is made below) rather than only reproducing the interface: a request or a
model configuration that upstream refuses is refused here with upstream's message.

Sources (no code copied; re-read before relying on a detail):
  core     triton-inference-server/core r26.04
  backend  NVIDIA/TensorRT-LLM triton_backend/inflight_batcher_llm/src: model_instance_state.cc at 0c8de69a,
           utils.cc at 19290813 (indexed commits, not the v1.2.1 tag)
  executor NVIDIA/TensorRT-LLM cpp/tensorrt_llm: batch_manager/peftCacheManager.cpp at 9df6d722,
           runtime/loraUtils.cpp at 2a9abd95, runtime/loraCache.cpp at 063e02f7 (copyToPages),
           runtime/bufferManager.cpp at 1a43c7d6, runtime/utils/numpyUtils.cpp at 05316d33,
           batch_manager/promptTuningBuffers.cpp at 2a9abd95, batch_manager/llmRequest.cpp (LlmRequest::validate,
           as indexed), runtime/loraModule.cpp (createLoraModules, as indexed)

Model load (the backend's executor starts; a failure here fails the model's load):
  - the LoRA caches are sized in the engine's dtype (peftCacheManager.cpp getPageManagerConfig passes
    modelConfig.getDataType() to getMaxNumSlots and to both page configs); a host cache smaller than one max-sized
    adapter fails: "Not enough space allocated to host LoRA cache to hold 1 max sized LoRA"; the same for the
    device cache, whose bytes are lora_cache_gpu_memory_fraction x the free GPU memory at that moment;
  - lora_prefetch_dir: each digit-named folder's model.lora_weights.npy / model.lora_config.npy are read by
    numpyUtils.cpp loadNpy, which knows the numpy types ? u1 i1 i4 i8 f2 f4 only ("numpy data type '<t>' not
    supported"), then put into the host cache: loraCache.cpp copyToPages copies each row with BufferManager::copy,
    which refuses "Incompatible data types: <src> != <dst>" when the weights' dtype is not the pages' (the engine's).
Per request (enqueue → createExecutorRequests → the executor):
  - core: an input the config does not declare ("unexpected inference input '<name>' for model"), a missing
    non-optional input ("missing required input(s)"), an input whose datatype is not the config's ("inference input
    '<name>' data-type is '<got>', but model '<model>' expects '<want>'", core src/infer_request.cc; the message as
    triton-inference-server/server's qa tests assert it), an input whose shape is not [batch] + the config's dims
    (config `reshape` applies after: "unexpected shape for input '<name>' for model '<model>'. Expected [-1,1], got
    [1]", as tritonserver 2.51 answered a BLS request here);
  - `stop` and `streaming` are read by utils.cc getRequestBooleanInputTensor, which asserts host memory
    (TRITONSERVER_MEMORY_CPU or CPU_PINNED) and reads the first byte: a GPU tensor is an error here;
  - handleStopRequest (model_instance_state.cc): `stop` true is not enqueued; an empty request id is the error
    "Trying to stop a request but request ID is not provided"; else the executor requests recorded under that Triton
    request id are cancelled (an unknown id is no error); one empty final response. A normal request's executor ids
    are recorded under its Triton request id, overwriting a previous request of the same id;
  - LoRA (peftCacheManager.cpp addRequestPeft, loraUtils.cpp loraValidateRequestTensors/...Dims): weights and config
    must come together, [1, rows, width] and [1, rows, 3] in host memory ("Expected lora weights to be in CPU
    memory"), config INT32, weights in the engine's dtype ("Expected lora weights to be the same data type as base
    model"), each row's layer in range, module enabled, adapter size <= max_lora_rank; a task id without weights that
    the cache does not hold: "LoRA task <id> not found in cache. Please send LoRA weights with request";
  - the prompt table (promptTuningBuffers.cpp validate): prompt_vocab_size <= max_prompt_embedding_table_size /
    max_batch_size, the table in the engine's dtype ("Request embedding table data type doesn't match model weight
    data type."), as many rows as prompt_vocab_size; with KV-cache reuse, prompt_table_extra_ids of the prompt's
    length (llmRequest.cpp validate: "Input token extra ids must be provided when enabling kv cache reuse with
    prompt table"); a prompt longer than max_input_len: "Prompt length (%d) exceeds maximum input length (%d)".
Generation is a stand-in: deterministic tokens (never an end id), one response per token when streaming (the backend
has no option to send fewer: tensorrtllm_backend r26.04 docs/model_config.md), the last one final.
Guided decoding (the backend's model_instance_state.cc ModelInstanceState::getGuidedDecodingConfigFromParams, at 0c8de69a; utils.cc
getGuidedDecodingParamsFromTensors, indexed commit 19290813; batch_manager/trtGptModelInflightBatching.cpp creates the
GuidedDecoder only when the executor has a GuidedDecodingConfig):
  - at load, `guided_decoding_backend` and `xgrammar_tokenizer_info_path` empty (or the template's placeholders) turn
    it off; otherwise the file must exist ("Xgrammar's tokenizer info path at … does not exist."), is parsed as JSON
    and read for "encoded_vocab", "tokenizer_str", "stop_token_ids" (a missing key throws), and the backend must be
    "xgrammar" ("Guided decoding is currently supported with 'xgrammar' backend…"): the model does not load;
  - per request, each of `guided_decoding_guide_type` / `guided_decoding_guide` is read as the raw bytes of its BYTES
    tensor (Triton's serialization: a 4-byte length before each element) with the first 4 bytes dropped; a type
    other than json, json_schema, regex, ebnf_grammar leaves the request without a guide, silently; a guide on an
    executor without guided decoding is ignored, silently.
"""

from __future__ import annotations

import itertools
import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fakes import pb_utils as fake_pb

# the backend's LoRA module ids (TensorRT-LLM loraModule.h ModuleType) → (in, out) dims (loraModule.cpp
# createLoraModules: attn_q hidden→q, attn_k/v hidden→kv, attn_dense hidden→hidden, mlp_h_to_4h and mlp_gate
# hidden→mlp, mlp_4h_to_h mlp→hidden)
MODULE_IDS = {"attn_q": 1, "attn_k": 2, "attn_v": 3, "attn_dense": 4, "mlp_h_to_4h": 5, "mlp_4h_to_h": 6, "mlp_gate": 7}
NPY_TYPES = {"?": "BOOL", "u1": "UINT8", "i1": "INT8", "i4": "INT32", "i8": "INT64", "f2": "HALF", "f4": "FLOAT"}
TRT_NAMES = {"bfloat16": "BF16", "float16": "HALF", "float32": "FLOAT"}  # engine dtype → nvinfer1 name
TRITON_NAMES = {"BF16": "BF16", "HALF": "FP16", "FLOAT": "FP32"}
HOST_BOOLEANS = ("stop", "streaming")  # utils.cc getRequestBooleanInputTensor
FIRST_TOKEN, TOKEN_SPAN = 32, 64


class BackendLoadError(RuntimeError):
    """The tensorrtllm model fails to load (its executor threw while starting)."""


# ---------------------------------------------------------------------------------------------- tensors
def _value(v):
    """The array behind a request input: a numpy array or a torch tensor."""
    return v._array if isinstance(v, fake_pb.Tensor) else v


def _on_host(v) -> bool:
    return v.is_cpu() if isinstance(v, fake_pb.Tensor) else True


def _triton_type(v) -> str:
    a = _value(v)
    if hasattr(a, "dtype") and not isinstance(a, np.ndarray):  # torch
        return {"torch.bfloat16": "BF16", "torch.float16": "FP16", "torch.float32": "FP32", "torch.int32": "INT32",
                "torch.int64": "INT64", "torch.bool": "BOOL", "torch.uint64": "UINT64"}[str(a.dtype)]
    a = np.asarray(a)
    if a.dtype.kind in "OSU":
        return "BYTES"
    return {"float32": "FP32", "float16": "FP16", "int32": "INT32", "int64": "INT64", "uint64": "UINT64",
            "bool": "BOOL"}[a.dtype.name]


def _numpy(v) -> np.ndarray:
    a = _value(v)
    return a.float().numpy() if hasattr(a, "float") and not isinstance(a, np.ndarray) else np.asarray(a)


def _scalar(inputs, name, default=None):
    return default if name not in inputs else _numpy(inputs[name]).reshape(-1)[0].item()


# ---------------------------------------------------------------------------------------------- the engine
@dataclass
class Engine:
    """What the backend reads from the engine directory's config.json (trtllm-build: pretrained_config +
    build_config)."""

    dtype: str
    layers: int
    hidden: int
    q_out: int
    kv_out: int
    mlp: int
    max_batch_size: int
    max_input_len: int
    max_prompt_embedding_table_size: int
    lora_modules: list = field(default_factory=list)
    max_lora_rank: int = 0

    @classmethod
    def read(cls, engine_dir) -> "Engine":
        cfg = json.loads((Path(engine_dir) / "config.json").read_text())
        p, b = cfg["pretrained_config"], cfg["build_config"]
        heads, kv = p["num_attention_heads"], p.get("num_key_value_heads") or p["num_attention_heads"]
        head = p.get("head_size") or p["hidden_size"] // heads
        lora = b.get("lora_config") or {}
        return cls(dtype=p["dtype"], layers=p["num_hidden_layers"], hidden=p["hidden_size"], q_out=heads * head,
                   kv_out=kv * head, mlp=p["intermediate_size"], max_batch_size=b["max_batch_size"],
                   max_input_len=b["max_input_len"],
                   max_prompt_embedding_table_size=b.get("max_prompt_embedding_table_size") or 0,
                   lora_modules=list(lora.get("lora_target_modules") or []),
                   max_lora_rank=int(lora.get("max_lora_rank") or 0))

    @property
    def trt_dtype(self) -> str:
        return TRT_NAMES[self.dtype]

    @property
    def dtype_bytes(self) -> int:
        return {"BF16": 2, "HALF": 2, "FLOAT": 4}[self.trt_dtype]

    def module_dims(self, name: str) -> tuple[int, int]:
        h = self.hidden
        return {"attn_q": (h, self.q_out), "attn_k": (h, self.kv_out), "attn_v": (h, self.kv_out),
                "attn_dense": (h, h), "mlp_h_to_4h": (h, self.mlp), "mlp_gate": (h, self.mlp),
                "mlp_4h_to_h": (self.mlp, h)}[name]


class LoraCaches:
    """The PEFT cache manager's host and device caches, sized as peftCacheManager.cpp getPageManagerConfig does (tp 1,
    one pipeline rank), in the engine's dtype."""

    def __init__(self, engine: Engine, params: dict, free_gpu_bytes: int):
        self.engine = engine
        rank = engine.max_lora_rank
        optimal = min(int(params.get("lora_cache_optimal_adapter_size", 8)), rank)
        max_adapter = min(int(params.get("lora_cache_max_adapter_size", 64)), rank)
        one_d = [sum(engine.module_dims(m)) for m in engine.lora_modules]
        self.page_width = min(one_d)
        slots_per_layer = sum(optimal * math.ceil(d / self.page_width) for d in one_d)
        self.slots_per_page = max(slots_per_layer * engine.layers,
                                  math.ceil(max_adapter * max(one_d) / self.page_width))
        min_total = math.ceil(max_adapter * sum(one_d) * engine.layers / self.page_width)
        slot_bytes = self.page_width * engine.dtype_bytes
        host_bytes = int(params.get("lora_cache_host_memory_bytes", 1 << 30))
        fraction = float(params.get("lora_cache_gpu_memory_fraction", 0.05))
        self.host_slots, self.device_slots = host_bytes // slot_bytes, int(fraction * free_gpu_bytes / slot_bytes)
        for where, slots in (("host", self.host_slots), ("device", self.device_slots)):
            if slots < min_total:
                raise BackendLoadError(f"Not enough space allocated to {where} LoRA cache to hold 1 max sized LoRA "
                                       f"{slots} < {min_total}")
        pages = math.ceil(self.device_slots / self.slots_per_page)
        self.device_bytes = pages * self.slots_per_page * slot_bytes  # what the device cache allocates
        self.tasks: dict[int, str] = {}  # task id → the dtype its pages hold (always the engine's once put)

    def put(self, task: int, weights_dtype: str, config: np.ndarray) -> None:
        """Copy an adapter into the pages (loraCache.cpp copyToPages → BufferManager::copy per row)."""
        if weights_dtype != self.engine.trt_dtype:
            raise RuntimeError(f"Incompatible data types: {weights_dtype} != {self.engine.trt_dtype}")
        rows = config.reshape(-1, config.shape[-1])
        slots = sum(math.ceil((r[2] * sum(self.engine.module_dims(_module_name(r[0])))) / self.page_width)
                    for r in rows)
        if slots > self.host_slots:
            raise RuntimeError(f"PEFT Cache is full. Could not store taskId={task}")
        self.tasks[task] = weights_dtype


def _module_name(module_id: int) -> str:
    return {v: k for k, v in MODULE_IDS.items()}[int(module_id)]


def _load_npy(path: Path) -> tuple[str, np.ndarray]:
    """numpyUtils.cpp loadNpy: the type from the header's descr (endianness dropped), known types only."""
    a = np.load(path, allow_pickle=False)
    descr = a.dtype.str[1:]
    if descr not in NPY_TYPES:
        raise BackendLoadError(f"numpy data type '{descr}' not supported")
    return NPY_TYPES[descr], a


# ---------------------------------------------------------------------------------------------- the model
class FakeTrtllmDecoder:
    """The decoder model as Triton and the tensorrtllm backend treat a request. `config` is its ModelConfig; with an
    engine (the config's gpt_model_path, or `engine_dir`) the executor's checks apply and, when `generate` is set, a
    request is answered with its stand-in tokens at once (else responses follow while it "generates" and
    `generating(rid)` tells whether a request of that Triton id is still running)."""

    STOP_WITHOUT_ID = "Trying to stop a request but request ID is not provided"

    GUIDE_TYPES = ("json", "json_schema", "regex", "ebnf_grammar")  # utils.cc guideTypeMapping

    def __init__(self, config, *, engine_dir=None, free_gpu_bytes: int = 80 << 30, generate: bool = False):
        self.config = config
        self.params = {k: v.string_value for k, v in config.parameters.items()}
        path = engine_dir or self.params.get("gpt_model_path")
        self.engine = Engine.read(path) if path and (Path(path) / "config.json").is_file() else None
        self.generate = generate
        self.guided_config = guided_decoding_config(self.params)
        self.executor: dict[int, dict] = {}  # executor request id → {"triton_id", "cancelled", "lora_task", ...}
        self.by_triton_id: dict[str, set[int]] = {}  # mTritonRequestIdToRequestIds
        self.stop_requests = 0
        self._ids = itertools.count(1)
        self.lora = None
        if self.engine is not None and self.engine.lora_modules:
            self.lora = LoraCaches(self.engine, self.params, free_gpu_bytes)
            self._prefetch(self.params.get("lora_prefetch_dir"))

    def _prefetch(self, root) -> None:
        """PeftCacheManager::prefetchLoraWeights at start: digit-named folders only, each put in the host cache."""
        if not root or not Path(root).is_dir():
            return
        for task in sorted(p for p in Path(root).iterdir() if p.is_dir() and p.name.isdigit()):
            wtype, _ = _load_npy(task / "model.lora_weights.npy")
            ctype, config = _load_npy(task / "model.lora_config.npy")
            try:
                self.lora.put(int(task.name), wtype, config)
            except RuntimeError as e:
                raise BackendLoadError(str(e)) from None

    # ---- Triton core ----------------------------------------------------------------------------------------
    def validate(self, inputs: dict) -> str | None:
        from tritonclient.grpc import model_config_pb2 as mc

        declared = {i.name: i for i in self.config.input}
        for name in inputs:
            if name not in declared:
                return f"unexpected inference input '{name}' for model '{self.config.name}'"
        missing = [n for n, i in declared.items() if not i.optional and n not in inputs]
        if missing:
            return f"missing required input(s) {missing}"
        for name, v in inputs.items():
            want = mc.DataType.Name(declared[name].data_type).removeprefix("TYPE_").replace("STRING", "BYTES")
            got = _triton_type(v)
            if got != want:
                return (f"inference input '{name}' data-type is '{got}', but model '{self.config.name}' expects "
                        f"'{want}'")
        if self.config.max_batch_size > 0:
            for name, v in inputs.items():
                shape, dims = list(_value(v).shape), [1, *declared[name].dims]  # the batch, then the dims
                if len(shape) != len(dims) or any(d != -1 and d != s for d, s in zip(dims, shape)):
                    want = [-1 if i == 0 else d for i, d in enumerate(dims)]
                    return (f"unexpected shape for input '{name}' for model '{self.config.name}'. Expected {want}, "
                            f"got {shape}")
        return None

    # ---- the backend and the executor -----------------------------------------------------------------------
    def __call__(self, triton_id: str, inputs: dict) -> list:
        """One Triton request to the decoder → the responses the caller receives (a BLS iterator's items)."""
        error = self.validate(inputs)
        if error:
            return [fake_pb.BlsResponse(error=error)]
        for name in HOST_BOOLEANS:
            if name in inputs and not _on_host(inputs[name]):
                return [fake_pb.BlsResponse(error=f"{name}: getRequestBooleanInputTensor asserts host memory, the "
                                                  f"input is in GPU memory")]
        if "stop" in inputs and bool(_scalar(inputs, "stop")):  # handleStopRequest
            self.stop_requests += 1
            if not triton_id:
                return [fake_pb.BlsResponse(error=self.STOP_WITHOUT_ID)]
            for eid in self.by_triton_id.get(triton_id, ()):
                self.executor[eid]["cancelled"] = True  # Executor::cancelRequest
            return [fake_pb.BlsResponse()]
        try:
            record = self._executor_checks(inputs)
        except RuntimeError as e:
            return [fake_pb.BlsResponse(error=str(e))]
        eid = next(self._ids)  # enqueueRequests
        guide = self.guide(inputs)
        self.executor[eid] = {"triton_id": triton_id, "cancelled": False, **record,
                              "guide": guide if self.guided_config is not None else None}
        if triton_id:
            self.by_triton_id[triton_id] = {eid}
        return self._generate(eid, inputs) if self.generate else []

    def _executor_checks(self, inputs: dict) -> dict:
        record = {"lora_task": None}
        if self.engine is None:
            return record
        n = int(_scalar(inputs, "input_lengths"))
        if n > self.engine.max_input_len:
            raise RuntimeError(f"Prompt length ({n}) exceeds maximum input length ({self.engine.max_input_len}). Set "
                               f"log level to info and check TRTGptModel logs for how maximum input length is set")
        if "prompt_embedding_table" in inputs:
            table = inputs["prompt_embedding_table"]
            vocab = int(_scalar(inputs, "prompt_vocab_size", 0))
            most = self.engine.max_prompt_embedding_table_size // self.engine.max_batch_size
            if vocab > most:
                raise RuntimeError(f"Prompt vocab size{vocab} is larger than max prompt vocab size of {most}. Max "
                                   f"prompt vocab size is computed from max_prompt_embedding_table_size / "
                                   f"max_batch_size. ")
            if TRITON_NAMES[self.engine.trt_dtype] != _triton_type(table):
                raise RuntimeError("Request embedding table data type doesn't match model weight data type.")
            if _value(table).shape[-2] != vocab:
                raise RuntimeError("First dimension of request embedding table is expected to be equal to prompt "
                                   "vocab size")
            reuse = self.params.get("enable_kv_cache_reuse", "true") in ("True", "true", "TRUE", "1")
            extra = inputs.get("prompt_table_extra_ids")
            if reuse and (extra is None or _value(extra).reshape(-1).shape[0] != n):
                raise RuntimeError("Input token extra ids must be provided when enabling kv cache reuse with "
                                   "prompt table")
        if "lora_task_id" in inputs or "lora_weights" in inputs or "lora_config" in inputs:
            record["lora_task"] = self._lora(inputs)
        return record

    def _lora(self, inputs: dict) -> int:
        """PeftCacheManager::addRequestPeft with loraValidateRequestTensors."""
        if self.lora is None:
            raise RuntimeError("lora_task_id given to an engine built without the LoRA plugin")
        if "lora_task_id" not in inputs:
            raise RuntimeError("lora_task_id must be set for LoRA inference")
        task = int(_scalar(inputs, "lora_task_id"))
        weights, config = inputs.get("lora_weights"), inputs.get("lora_config")
        if weights is None and config is None:
            if task not in self.lora.tasks:
                raise RuntimeError(f"LoRA task {task} not found in cache. Please send LoRA weights with request")
            return task
        if weights is None or config is None:
            raise RuntimeError("Request for LoRA inference must have both lora_weights and lora_keys")
        w, c = _value(weights), _numpy(config)
        if len(w.shape) != 3 or len(c.shape) != 3:
            raise RuntimeError("Invalid shape for lora_weights tensor")
        if w.shape[0] != 1 or c.shape[0] != 1:
            raise RuntimeError("Expected batch dimension to be 1 for each lora request")
        if not _on_host(weights) or not _on_host(config):
            raise RuntimeError("Expected lora weights to be in CPU memory")
        if _triton_type(config) != "INT32":
            raise RuntimeError(f"Expected  lora keys to have TYPE_INT32 but was {_triton_type(config)}")
        if c.shape[1] != w.shape[1]:
            raise RuntimeError("Expected dim1 lora_weights and lora_keys to have the same size")
        wtype = {"BF16": "BF16", "FP16": "HALF", "FP32": "FLOAT"}[_triton_type(weights)]
        if wtype != self.engine.trt_dtype:
            raise RuntimeError("Expected lora weights to be the same data type as base model")
        for module, layer, size in c[0, :, :3].tolist():
            if not 0 <= layer < self.engine.layers:
                raise RuntimeError("Expected layerId to be in the range [0, numModelLayers)")
            name = _module_name(module)
            if name not in self.engine.lora_modules:
                raise RuntimeError(f"lora module {name} not enabled for this model")
            if size * sum(self.engine.module_dims(name)) > w.shape[2]:
                raise RuntimeError(f"lora_weights has to few values for {name}")
            if size > self.engine.max_lora_rank:
                raise RuntimeError(f"Invalid low_rank ({size}). low_rank must be smaller than mMaxLowRank "
                                   f"({self.engine.max_lora_rank})")
        self.lora.put(task, wtype, c)
        return task

    def _generate(self, eid: int, inputs: dict) -> list:
        n = int(_scalar(inputs, "request_output_len"))
        ids = _numpy(inputs["input_ids"]).reshape(-1)
        start = int(ids.sum()) % TOKEN_SPAN
        tokens = [FIRST_TOKEN + (start + i) % TOKEN_SPAN for i in range(n)]
        self.executor[eid]["tokens"] = tokens
        if not bool(_scalar(inputs, "streaming", False)):
            return [_response(tokens)]
        return [_response([t]) for t in tokens]

    def guide(self, inputs: dict) -> tuple[str, str | None] | None:
        """The request's GuidedDecodingParams (type, guide) as the backend builds them, None without a guide."""
        if "guided_decoding_guide_type" not in inputs:
            return None
        kind = _backend_string(_value(inputs["guided_decoding_guide_type"]))
        if kind not in self.GUIDE_TYPES:
            return None
        text = _backend_string(_value(inputs["guided_decoding_guide"])) if "guided_decoding_guide" in inputs else None
        return kind, text

    def generating(self, triton_id: str) -> bool:
        return any(not self.executor[e]["cancelled"] for e in self.by_triton_id.get(triton_id, ()))


def guided_decoding_config(params: dict[str, str]) -> dict | None:
    """getGuidedDecodingConfigFromParams: the executor's GuidedDecodingConfig, or None (guided decoding off)."""
    missing = [k for k in ("tokenizer_dir", "xgrammar_tokenizer_info_path", "guided_decoding_backend")
               if k not in params]
    if missing:  # GetParameter without a default throws
        raise BackendLoadError(f"parameters {missing} not found")
    backend, path = params["guided_decoding_backend"], params["xgrammar_tokenizer_info_path"]
    if backend in ("", "${guided_decoding_backend}") or path in ("", "${xgrammar_tokenizer_info_path}"):
        return None
    if not Path(path).exists():
        raise BackendLoadError(f"Xgrammar's tokenizer info path at {path} does not exist.")
    info = json.loads(Path(path).read_text(encoding="utf-8"))
    try:
        config = {"encoded_vocab": [str(t) for t in info["encoded_vocab"]], "tokenizer_str": str(info["tokenizer_str"]),
                  "stop_token_ids": [int(i) for i in info["stop_token_ids"]]}
    except (KeyError, TypeError) as e:
        raise BackendLoadError(f"tokenizer info {path}: {e!r}") from None
    if backend != "xgrammar":
        raise BackendLoadError("Guided decoding is currently supported with 'xgrammar' backend. Invalid "
                               "guided_decoding_backend parameter provided.")
    return config


def _backend_string(value) -> str:
    """A BYTES tensor as the backend reads it: every element serialized (4-byte little-endian length, then the bytes),
    the whole buffer taken as one string, its first 4 bytes dropped."""
    raw = b"".join(struct.pack("<I", len(e)) + bytes(e) for e in np.asarray(value, dtype=object).reshape(-1))
    return raw[4:].decode("utf-8", errors="replace")


def _response(tokens: list[int]):
    ids = np.asarray(tokens, np.int32).reshape(1, 1, -1)  # [batch, beam, tokens]
    return fake_pb.BlsResponse([fake_pb.Tensor("output_ids", ids),
                                fake_pb.Tensor("sequence_length", np.array([[ids.shape[-1]]], np.int32))])
