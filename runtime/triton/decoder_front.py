"""The GPU target's decoder step in front of TensorRT-LLM's `tensorrtllm` backend (triton_repo/decoder_front is its
Triton adapter): fusion's request goes on to the decoder by BLS, and what comes back goes on to postprocess.

Why a step of our own in front of the backend (facts read at their sources; cited again where used):
- Streams: the backend sends one response per generated token, and nothing in its configuration sends fewer
  (tensorrtllm_backend r26.04 docs/model_config.md; `accumulate_tokens` resends the accumulated text, it does not
  reduce responses). Each response costs tritonserver's ensemble and the postprocess stub the same CPU whatever it
  carries (perf/serving_path.py), so the front coalesces as the CPU decoder does (runtime/stages/coalesce.py): the
  first token alone and at once, then at most one response per interval, the decoder's final response alone.
- Request ids: a stop request is matched by its Triton request id (NVIDIA/TensorRT-LLM triton_backend/
  inflight_batcher_llm/src/model_instance_state.cc at 0c8de69a, enqueue → handleStopRequest): the id map is
  overwritten by a second request with the same id (`mTritonRequestIdToRequestIds[tritonRequestId] = ...`), and a
  request without an id cannot be stopped ("Trying to stop a request but request ID is not provided"). The front
  refuses an id already in flight and gives every request without an id one of its own (ID_PREFIX + 32 hex). (The
  refused request has passed preprocess and fusion by then, whose request context is keyed by the same id
  (runtime/triton/context.py): the request in flight may lose its notices there; the stop map is what stays right.)
- think/'s adapter: TensorRT-LLM keeps LoRA pages in the engine's dtype (batch_manager/peftCacheManager.cpp
  getPageManagerConfig: modelConfig.getDataType()) and takes request weights only in that dtype and in host memory
  (runtime/loraUtils.cpp loraValidateRequestTensors: "Expected lora weights to be the same data type as base
  model"; loraValidateRequestTensorDims: "Expected lora weights to be in CPU memory"). A prefetch directory holds
  .npy files, which cannot carry bf16 (runtime/utils/numpyUtils.cpp typeFromNumpyDesc knows f2 and f4 only), so a
  bf16 engine gets the adapter with a request: `lora_weights` (the engine's dtype, a CPU tensor) and `lora_config`
  with a thinking request while the backend is not known to hold the task, and again after its "LoRA task <id> not
  found in cache. Please send LoRA weights with request" error (addRequestPeft), which also covers a restarted
  decoder. A float16 engine has it preloaded (lora_prefetch_dir) and is sent it only after that error.
- `stop` and `streaming` are read by utils.cc getRequestBooleanInputTensor (at 19290813), which asserts host memory:
  the front sends them from host memory whatever it was handed (FORCE_CPU_ONLY_INPUT_TENSORS "no" leaves the prompt
  table on the GPU).

The backend's final response carries the last token, or nothing when the request ended on its end id; the front knows
a stream's last response the way postprocess does (empty, or reaching request_output_len) and sends it with the final
flag; a stream that ends otherwise (a stop word) gets its held tokens and then the final flag alone.
"""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

import numpy as np

from af3trt.runtime.stages import contract as c
from af3trt.runtime.stages.coalesce import Coalescer
from af3trt.runtime.stages.errors import InvalidRequest

ID_PREFIX = "af3trt-"
NOT_CACHED = "not found in cache"  # peftCacheManager.cpp addRequestPeft's PeftTaskNotCachedException message
HOST_INPUTS = (c.STOP, c.STREAMING, c.LORA_WEIGHTS, c.LORA_CONFIG)  # the backend reads these from host memory
WEIGHTS_FILE, CONFIG_FILE = "model.lora_weights.npy", "model.lora_config.npy"


class DuplicateRequestId(InvalidRequest):
    """A request with the id of one still in flight."""


class RequestIds:
    """The request ids in flight: a duplicate is refused, a request without one gets ours."""

    def __init__(self):
        self._live: set[str] = set()
        self._lock = threading.Lock()

    def claim(self, request_id: str) -> str:
        rid = request_id or f"{ID_PREFIX}{uuid.uuid4().hex}"
        with self._lock:
            if rid in self._live:
                raise DuplicateRequestId(f"request id {rid[:64]!r} is already in flight; a stop is matched by id, so "
                                         f"each running request needs its own")
            self._live.add(rid)
        return rid

    def release(self, request_id: str) -> None:
        with self._lock:
            self._live.discard(request_id)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._live


class Adapter:
    """think/'s adapter as the backend takes it with a request: weights [1, rows, width] in the engine's dtype and
    config [1, rows, 3] int32, in host memory. Files (build/trtllm_lora.py write_adapter): <dir>/<task id>/
    model.lora_weights.npy (float16, or bfloat16's bits as uint16: numpy has no bfloat16) and model.lora_config.npy.
    `held`: whether the backend is believed to hold the task (preloaded, or sent and answered without error)."""

    def __init__(self, task_id: int, weights, config: np.ndarray, held: bool):
        self.task_id, self.weights, self.config, self.held = int(task_id), weights, config, held
        self._lock = threading.Lock()

    @classmethod
    def load(cls, root: Path, task_id: int, dtype: str, held: bool) -> "Adapter":
        import torch

        folder = Path(root) / str(task_id)
        raw = np.load(folder / WEIGHTS_FILE, allow_pickle=False)
        config = np.ascontiguousarray(np.load(folder / CONFIG_FILE, allow_pickle=False), np.int32)
        weights = torch.from_numpy(raw)
        if dtype == "bfloat16":
            if raw.dtype != np.uint16:
                raise ValueError(f"{folder / WEIGHTS_FILE}: bfloat16 weights are stored as uint16 bits, got {raw.dtype}")
            weights = weights.view(torch.bfloat16)
        elif str(weights.dtype) != f"torch.{dtype}":
            raise ValueError(f"{folder / WEIGHTS_FILE} holds {raw.dtype}, the engine's dtype is {dtype}")
        if weights.ndim != 3 or config.ndim != 3 or weights.shape[:2] != config.shape[:2] or weights.shape[0] != 1:
            raise ValueError(f"{folder}: weights {list(weights.shape)} and config {list(config.shape)} are not "
                             f"[1, rows, width] and [1, rows, 3]")
        return cls(task_id, weights.contiguous(), config, held)

    def needed(self) -> bool:
        """Whether a request of this task must carry the weights now."""
        with self._lock:
            return not self.held

    def mark(self, held: bool) -> None:
        with self._lock:
            self.held = held

    def tensors(self, pb) -> list:
        from torch.utils.dlpack import to_dlpack

        return [pb.Tensor.from_dlpack(c.LORA_WEIGHTS, to_dlpack(self.weights)), pb.Tensor(c.LORA_CONFIG, self.config)]


def _host(pb, t):
    """A tensor the backend reads from host memory, copied there when Triton handed it over on the GPU."""
    if t.is_cpu():
        return t
    import torch

    return pb.Tensor(t.name(), torch.from_dlpack(t.to_dlpack()).cpu().numpy())


def decoder_inputs(pb, request) -> list:
    """The request's decoder inputs as the BLS request carries them: every input the decoder declares that the request
    has, those the backend reads from host memory in host memory. The front has the decoder's config, so Triton
    hands it each [1] scalar reshaped to [] (config `reshape`: [batch] only); a request to the decoder must carry the
    declared shape again, [batch, 1] (core src/infer_request.cc: "unexpected shape for input ... Expected [-1,1], got
    [1]", seen on tritonserver 2.51): scalars go on as host [1, 1] arrays."""
    out = []
    for spec in c.DECODER_STAGE.inputs:
        t = pb.get_input_tensor_by_name(request, spec.name)
        if t is None:
            continue
        if spec.reshape is not None:
            t = pb.Tensor(spec.name, np.ascontiguousarray(_host(pb, t).as_numpy()).reshape(1, *spec.dims))
        elif spec.name in HOST_INPUTS:
            t = _host(pb, t)
        out.append(t)
    return out


def _scalar(pb, request, name: str, default):
    t = pb.get_input_tensor_by_name(request, name)
    if t is None:
        return default
    a = t.as_numpy() if t.is_cpu() else _host(pb, t).as_numpy()
    return a.reshape(-1)[0].item()


def _tokens(pb, response) -> list[int]:
    ids = pb.get_output_tensor_by_name(response, c.OUTPUT_IDS)
    if ids is None:  # a final flag without a response
        return []
    ids = ids.as_numpy()  # [1, beam, T]
    n = pb.get_output_tensor_by_name(response, c.SEQUENCE_LENGTH)
    length = ids.shape[-1] if n is None else int(n.as_numpy().reshape(-1)[0])
    return [int(t) for t in ids.reshape(-1, ids.shape[-1])[0, :length]]


def _response(pb, tokens: list[int]):
    ids = np.asarray(tokens, np.int32).reshape(1, 1, -1)  # [batch, beam, new tokens]
    return pb.InferenceResponse([pb.Tensor(c.OUTPUT_IDS, ids),
                                 pb.Tensor(c.SEQUENCE_LENGTH, np.array([[ids.shape[-1]]], np.int32))])


class Front:
    """One decoder front (per model instance): `submit(request)` answers a request by relaying it to `model` on a
    thread of its own (a decoupled model returns from execute at once)."""

    def __init__(self, pb, model: str, *, interval_s: float, adapter: Adapter | None = None, running=None):
        self.pb, self.model, self.interval_s, self.adapter = pb, model, float(interval_s), adapter
        self.ids, self.running = RequestIds(), running

    def submit(self, request) -> None:
        sender = request.get_response_sender()
        try:
            rid = self.ids.claim(request.request_id())
        except DuplicateRequestId as e:
            from af3trt.runtime.triton import triton_io as io

            sender.send(io.error_response(self.pb, e), flags=self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            return
        if self.running is not None:
            self.running.add(1)
        threading.Thread(target=self.relay, args=(request, rid, sender), daemon=True,
                         name=f"decoder-front-{rid[:16]}").start()

    def relay(self, request, rid: str, sender) -> None:
        pb, final_flag = self.pb, self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        try:
            self._relay(request, rid, sender)
        except Exception as e:  # noqa: BLE001 - the request gets the error, the front keeps serving
            from af3trt.runtime.triton import triton_io as io

            try:
                sender.send(io.error_response(pb, e), flags=final_flag)
            except Exception:  # noqa: BLE001 - the final flag went already
                pass
        finally:
            self.ids.release(rid)
            if self.running is not None:
                self.running.add(-1)

    def _relay(self, request, rid: str, sender) -> None:
        pb, final_flag = self.pb, self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        inputs = decoder_inputs(pb, request)
        thinking = self.adapter is not None and pb.get_input_tensor_by_name(request, c.LORA_TASK_ID) is not None
        stream = Stream(bool(_scalar(pb, request, c.STREAMING, False)), int(_scalar(pb, request, c.REQUEST_OUTPUT_LEN, 0)),
                        _stop_words(pb, request))

        def send(tokens, final):
            sender.send(_response(pb, tokens), flags=final_flag if final else 0)
            stream.finished = stream.finished or final

        emit = Coalescer(self.interval_s, send) if stream.streaming and self.interval_s else send
        carry = thinking and self.adapter.needed()
        while True:
            bls = pb.InferenceRequest(model_name=self.model, inputs=inputs + (self.adapter.tensors(pb) if carry else []),
                                      request_id=rid, requested_output_names=[c.OUTPUT_IDS, c.SEQUENCE_LENGTH])
            resend = False
            for response in bls.exec(decoupled=True):
                if response.has_error():
                    message = response.error().message()
                    # the backend does not hold the task (a restarted decoder): once more, with the weights
                    resend = thinking and NOT_CACHED in message and not carry and not stream.generated
                    if resend:
                        break
                    raise DecoderError(message)
                if carry:
                    self.adapter.mark(True)
                if stream.finished:
                    continue  # a final flag after the last response
                tokens = _tokens(pb, response)
                emit(tokens, stream.add(tokens))
            if not resend:
                break
            self.adapter.mark(False)
            carry = True
        if not stream.finished:  # ended without a response known as its last: what is held, then the flag alone
            if isinstance(emit, Coalescer) and emit.held:
                send(list(emit.held), False)
            sender.send(flags=final_flag)


class Stream:
    """What the front knows of one request's output: its last response is the one postprocess recognises (not
    streamed; empty, as when it ended on its end id; at request_output_len tokens; ending with a stop word)."""

    def __init__(self, streaming: bool, max_new: int, stop_words):
        self.streaming, self.max_new, self.stop_words = streaming, max_new, stop_words
        self.generated: list[int] = []
        self.finished = False

    def add(self, tokens: list[int]) -> bool:
        """Count a response's tokens; whether it is the last."""
        from af3trt.runtime.stages.stop_words import ends_with_stop_word

        self.generated += tokens
        return (not self.streaming or not tokens or (self.max_new > 0 and len(self.generated) >= self.max_new)
                or ends_with_stop_word(self.generated, self.stop_words))


def _stop_words(pb, request):
    from af3trt.runtime.stages.stop_words import parse_stop_words_list

    t = pb.get_input_tensor_by_name(request, c.STOP_WORDS_LIST)
    return () if t is None else parse_stop_words_list(_host(pb, t).as_numpy())


class DecoderError(RuntimeError):
    """The decoder answered with an error (its message as it came)."""
