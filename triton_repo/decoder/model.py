"""Triton adapter: the CPU backend of the decoder stage, with the tensor contract of TensorRT-LLM's C++
`tensorrtllm` backend (decoupled; in-flight batching inside af3trt.runtime.engines.decoder.DecoderEngine)."""

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import triton_python_backend_utils as pb

from af3trt.registry import cpu_decoder_precision
from af3trt.runtime.stages import contract as c
from af3trt.runtime.triton import triton_io as io
from af3trt.runtime.stages.coalesce import Coalescer
from af3trt.runtime.stages.params import DecoderParams
from af3trt.runtime.triton.context import RequestContext, RunningRequests
from af3trt.runtime.engines.decoder import DecoderEngine, GenerationRequest, RequestCancelled
from af3trt.runtime.engines.stand_in import StandInDecoder
from af3trt.runtime.stages.guided import Guide
from af3trt.runtime.stages.stop_words import parse_stop_words_list


def _response(tokens):
    ids = np.asarray(tokens, np.int32).reshape(1, 1, -1)  # [batch, beam, new tokens]
    return pb.InferenceResponse([pb.Tensor(c.OUTPUT_IDS, ids),
                                 pb.Tensor(c.SEQUENCE_LENGTH, np.array([[ids.shape[-1]]], np.int32))])


class TritonPythonModel:
    def initialize(self, args):
        p = DecoderParams.parse(io.params(args))
        self.stream_interval_s = p.stream_interval_ms / 1000  # runtime/stages/coalesce.py (0: off)
        self.ctx = RequestContext()
        self.running = RunningRequests(args["model_name"])  # requests generating: the supervisor's drain
        # guides compiled off Triton's thread (execute); the grammar engine loaded at start, in the background
        self._compiling = ThreadPoolExecutor(1, thread_name_prefix="af3trt-guides")
        lm_dir = io.resolve(args, p.gpt_model_path)
        if p.stand_in_tokens_per_s > 0:  # the serving-path benchmark's stand-in (runtime/engines/stand_in.py)
            self.engine = StandInDecoder(lm_dir, tokens_per_s=p.stand_in_tokens_per_s, max_batch_size=p.max_batch_size,
                                         max_input_len=p.max_input_len, max_new_tokens_limit=p.max_output_len,
                                         max_queue_size=p.max_queue_size)
            return
        self.engine = DecoderEngine(lm_dir, max_batch_size=p.max_batch_size, max_input_len=p.max_input_len,
                                    max_new_tokens_limit=p.max_output_len, threads=p.threads or None,
                                    max_queue_size=p.max_queue_size, queue_timeout_s=p.queue_timeout_ms / 1000,
                                    lora_dir=io.resolve(args, p.lora_dir) if p.lora_dir else None,
                                    prefix_cache_bytes=p.prefix_cache_bytes,
                                    int8_linear=cpu_decoder_precision(p.precision).int8_linear)  # the build's
        self._compiling.submit(self._load_grammars)

    def _load_grammars(self) -> None:
        try:
            self.engine.grammars.compiler()
        except Exception as e:  # noqa: BLE001 - guided requests then get this error; the others are served
            pb.Logger.log_warn(f"decoder: guided decoding unavailable: {e}")

    def execute(self, requests):
        for r in requests:
            sender = r.get_response_sender()
            self.running.add(1)  # until its final response or error
            try:
                req = self.request(r)
            except Exception as e:  # noqa: BLE001
                self._refuse(sender, e)
                continue
            grammars = getattr(self.engine, "grammars", None)  # the stand-in has none
            if req.guide is not None and grammars is not None and not grammars.ready(req.guide):
                # a guide not compiled yet is compiled on the decoder's own thread for it, not on Triton's: a guide
                # that takes seconds to compile does not hold up the requests that come after it
                self._compiling.submit(self._start, r, req, sender)
            else:
                self._start(r, req, sender)
        return None

    def _start(self, r, req: GenerationRequest, sender) -> None:
        try:
            rid = r.request_id()
            emit = self._emitter(sender, self.ctx, rid, self.running)
            if req.streaming and self.stream_interval_s:  # at most one response per interval after the first
                emit = Coalescer(self.stream_interval_s, emit)
            self.engine.submit(req, emit, self._on_error(sender, self.ctx, rid, self.running),
                               self._cancelled(r, sender, self.ctx))
        except Exception as e:  # noqa: BLE001
            self._refuse(sender, e)

    def _refuse(self, sender, e: BaseException) -> None:
        self.running.add(-1)
        sender.send(io.error_response(pb, e), flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def request(self, r) -> GenerationRequest:
        ids = io.tensor(pb, r, c.INPUT_IDS)
        if ids is None or ids.ndim != 2 or ids.shape[0] != 1:
            raise io.RequestError(f"input_ids must be [1, L] (one sequence per request), got "
                                  f"{None if ids is None else list(ids.shape)}")
        n = io.scalar(pb, r, c.INPUT_LENGTHS, int)
        table = pb.get_input_tensor_by_name(r, c.PROMPT_EMBEDDING_TABLE)
        if table is not None:
            import torch

            table = torch.from_dlpack(table.to_dlpack())  # [1, N, H] in the engine dtype
            table = table.reshape(table.shape[-2], table.shape[-1]).clone()

        def get(name, kind, default):
            v = io.scalar(pb, r, name, kind)
            return default if v is None else v

        extra = io.tensor(pb, r, c.PROMPT_TABLE_EXTRA_IDS)  # [1, L] u64 (fusion sends it): keys KV reuse
        return GenerationRequest(
            input_ids=ids[0, :n], prompt_table=table, prompt_vocab_size=get(c.PROMPT_VOCAB_SIZE, int, 0),
            extra_ids=None if extra is None else extra.reshape(-1)[:n],
            max_new_tokens=io.scalar(pb, r, c.REQUEST_OUTPUT_LEN, int), end_id=self.end_id(r),
            min_tokens=get(c.MIN_TOKENS, int, 0),
            pad_id=get(c.PAD_ID, int, None), streaming=get(c.STREAMING, bool, False),
            top_k=get(c.RUNTIME_TOP_K, int, 0), top_p=get(c.RUNTIME_TOP_P, float, 0.0),
            temperature=get(c.TEMPERATURE, float, 1.0), repetition_penalty=get(c.REPETITION_PENALTY, float, 1.0),
            seed=get(c.SEED, int, None), stop_words=self.stop_words(r), lora_task_id=get(c.LORA_TASK_ID, int, None),
            guide=self.guide(r))

    @staticmethod
    def end_id(r) -> int | None:
        """The end id, None when absent or negative: the tensorrtllm backend's default end_id is -1, an id no token
        has (tensorrtllm_backend r26.04 docs/model_config.md), so -1 (fusion's ignore_eos) never ends a request."""
        v = io.scalar(pb, r, c.END_ID, int)
        return None if v is None or v < 0 else v

    @staticmethod
    def guide(r) -> Guide | None:
        """TensorRT-LLM's guided decoding inputs (runtime/stages/guided.py); a guide type the backend does not know is
        an error here, where the tensorrtllm backend would generate without a guide."""
        kind = io.text(pb, r, c.GUIDED_DECODING_GUIDE_TYPE)
        return None if kind is None else Guide(kind, io.text(pb, r, c.GUIDED_DECODING_GUIDE) or "")

    @staticmethod
    def stop_words(r) -> tuple:
        arr = io.tensor(pb, r, c.STOP_WORDS_LIST)  # [1, 2, L] (TensorRT-LLM's format) or absent
        return () if arr is None else parse_stop_words_list(arr)

    @staticmethod
    def _cancelled(r, sender, ctx: RequestContext):
        """The client cancelled, or its deadline passed. python_backend README, "Request Cancellation Handling"
        (r23.10+); measured on Triton 2.51: is_cancelled() is True after a client cancels a direct decoder stream, never
        inside the af3 ensemble, where Triton checks cancellation only between steps (server
        docs/user_guide/request_cancellation.md). Inside the ensemble the client's cancellation arrives through the
        `cancel` model, which marks the request id in the request context (the ensemble passes its request id to
        every step). And each step inherits the request's timeout (the client's deadline, in microseconds): counted
        from here, it stops generation at the latest that long after the client gave up."""
        timeout_us = r.timeout() if hasattr(r, "timeout") else 0
        deadline = time.monotonic() + timeout_us / 1e6 if timeout_us else None
        rid = r.request_id()
        return lambda: (sender.is_cancelled() or ctx.is_cancelled(rid)
                        or (deadline is not None and time.monotonic() > deadline))

    @staticmethod
    def _emitter(sender, ctx: RequestContext, rid: str, running: RunningRequests):
        def emit(tokens, final):
            if final:
                ctx.clear_cancel(rid)  # a cancellation that came too late
            try:
                sender.send(_response(tokens), flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0)
            finally:
                if final:
                    running.add(-1)
        return emit

    @staticmethod
    def _on_error(sender, ctx: RequestContext, rid: str, running: RunningRequests):
        def on_error(exc):
            ctx.clear_cancel(rid)
            if isinstance(exc, RequestCancelled):
                pb.Logger.log_info(f"decoder: {exc} (request id {rid[:64]!r})")
            try:
                sender.send(io.error_response(pb, exc), flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            finally:
                running.add(-1)
        return on_error

    def finalize(self):
        self._compiling.shutdown(wait=True)
        self.engine.stop()
