"""CPU decoder backend with the semantics of TensorRT-LLM's `tensorrtllm` Triton backend.

The Triton python model that wraps `DecoderEngine` is a drop-in for the GPU decoder: same inputs, same outputs, same
meaning. What the GPU backend does and we reproduce (TensorRT-LLM 1.2, executor API):

- prompt tuning: a token id >= vocab_size (the model config's, never a literal) is embedded from row
  `id - vocab_size` of the request's prompt table; other ids from the word embedding;
- in-flight (continuous) batching: a request joins the running batch as soon as it is prefilled, and leaves it when
  it finishes; every iteration advances all running requests by one token in one batched forward;
- greedy unless sampling is asked for (top_k == 1, or top_k == 0 and top_p == 0, is greedy);
- output excludes the input (exclude_input_in_output=true) and **excludes the end token**: the sampler does not count
  the end id in the sequence length, so `output_ids` stops before it and `sequence_length` (the number of ids in a
  response) does not count it; a streaming request that ends on the end id gets a last, empty, final response;
- stop words (`stop_words_list`, e.g. the checkpoint's other end ids) end the request too, but **stay in the
  output**, as TensorRT-LLM's executor leaves them (runtime/stages/stop_words.py has the source); postprocess trims them;
- streaming: one response per generated token; non-streaming: one response with all tokens;
- a request without a seed samples with seed 0 (TensorRT-LLM's default), so it is reproducible too;
- KV-cache reuse (prefix_cache_bytes > 0): a prompt that starts with the same blocks of PREFIX_BLOCK tokens as an
  earlier one (same ids and, for audio rows, the same prompt_table_extra_ids, which identify the audio) prefills
  only the rest, from the stored K/V of those blocks, as TensorRT-LLM reuses cached blocks keyed by
  (token, extra id) (tensorrtllm_backend inflight_batcher_llm/src/utils.h: `prompt_table_extra_ids` feeds the
  executor's PromptTuningConfig input-token extra ids). A prompt with audio rows and no extra ids is never reused.
  A prompt's K/V is stored under its last full block and, when its audio ends before that, under the last block
  of its audio too (TensorRT-LLM finds any shared block; one entry per prompt would find only whole prompts).

Two layers: `BatchingEngine` is the skeleton every decoder engine shares (the request record, validation of what any
engine checks, submit with its queue bound, generate, stop, the worker loop that admits queued requests and steps the
running batch, cancellation and the response pattern); an engine writes only its own start of a request (`_prefill`)
and its step (`_step`). `DecoderEngine` is the real one: a standard Qwen2ForCausalLM (written by
af3trt.export.extract_lm) run by transformers on CPU. runtime/engines/stand_in.py is the other: paced, weightless.

    engine = DecoderEngine(lm_dir)
    tokens = engine.generate(GenerationRequest(input_ids=ids, max_new_tokens=64, end_id=engine.eos_ids[0]))
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from af3trt.runtime.engines import grammar, lora
from af3trt.runtime.stages import sampling
from af3trt.runtime.stages.audio_cache import LruBytes
from af3trt.runtime.stages.sampling import DEFAULT_SEED, SamplingError, SamplingParams
from af3trt.runtime.stages.errors import Cancelled, InvalidRequest, Unavailable, Unsupported
from af3trt.runtime.stages.guided import Guide
from af3trt.runtime.stages.stop_words import ends_with_stop_word

log = logging.getLogger(__name__)

Emit = Callable[[list, bool], None]  # emit(new_token_ids, final)
OnError = Callable[[BaseException], None]


class DecodeError(InvalidRequest):
    """A request the decoder cannot run (bad inputs or parameters), or the engine is stopped."""


class NoAdapter(Unsupported):
    """A request names a LoRA task (thinking) but the decoder was built without that adapter."""


class ServerBusy(Unavailable, RuntimeError):
    """Past capacity: the waiting list is full, or the request waited too long for a batch slot (UNAVAILABLE)."""


class RequestCancelled(Cancelled, RuntimeError):
    """The client cancelled the request (closed its stream, or its deadline passed); generation stopped and the
    request's batch row was freed. Raised to that request's on_error."""


CANCEL_CHECK_S = 0.05  # how often a running request's `cancelled` is polled (an IPC call in the python backend)
PREFIX_BLOCK = 64  # tokens per block of the prompt KV that KV-cache reuse stores and finds


@dataclass(kw_only=True)
class GenerationRequest:
    input_ids: np.ndarray  # int32 [L]; ids >= vocab_size address the prompt table
    prompt_table: torch.Tensor | None = None  # [N, H] in the engine dtype
    prompt_vocab_size: int = 0  # rows of the table addressable by fake ids (0 = all rows of a given table)
    extra_ids: np.ndarray | None = None  # uint64 [L] prompt_table_extra_ids: what the audio rows are (KV reuse)
    max_new_tokens: int  # request_output_len
    end_id: int | None = None  # None: never stop early (the tensorrtllm backend's end_id -1)
    min_tokens: int = 0  # the end id cannot be chosen before this many tokens (TensorRT-LLM's minTokens)
    stop_words: tuple = ()  # token-id sequences that end the request (kept in the output, like TensorRT-LLM)
    pad_id: int | None = None  # accepted for the contract; nothing is padded in the output
    streaming: bool = False
    top_k: int = 0  # 0 = off
    top_p: float = 0.0  # 0 = off
    temperature: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    lora_task_id: int | None = None  # TensorRT-LLM's lora_task_id: the adapter (thinking) for this row; None: base
    guide: Guide | None = None  # guided decoding (TensorRT-LLM's GuidedDecodingParams): runtime/engines/grammar.py
    # Polled between decode steps (at most every CANCEL_CHECK_S): True when the client has gone (Triton's
    # response_sender.is_cancelled); the request then ends with RequestCancelled and frees its batch row.
    cancelled: Callable[[], bool] | None = None

    @property
    def greedy(self) -> bool:
        return sampling.is_greedy(self.top_k, self.top_p, self.temperature)

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(top_k=self.top_k, top_p=self.top_p, temperature=self.temperature,
                              repetition_penalty=self.repetition_penalty,
                              seed=DEFAULT_SEED if self.seed is None else int(self.seed))


@dataclass(eq=False, kw_only=True)
class Row:
    """A request in flight: what every engine keeps of it (an engine's own row adds its state)."""

    req: GenerationRequest
    emit: Emit
    on_error: OnError | None
    cancelled: Callable[[], bool] | None = None  # the client gave up (Triton's is_cancelled, or its deadline)
    queued_at: float = 0.0  # time.monotonic() at submit
    generated: list = field(default_factory=list)  # the output so far
    next_cancel_check: float = 0.0  # time.monotonic() of the next `cancelled` poll


_STOP = object()


class BatchingEngine:
    """The skeleton of a continuous-batching decoder engine behind one worker thread.

    `submit(request, emit, on_error)` validates (raising DecodeError at once) and queues; the worker calls
    `emit(new_token_ids, final)` as tokens are produced, and `on_error(exc)` if that request fails later (only that
    request: the others and the engine carry on). `generate(request)` is the synchronous form.

    An engine subclass calls `__init__` with its limits, then `_start_worker()` once it is ready, and writes:
    `_row(request, ids, **fields)` (its Row for a validated request), `_prefill(row)` (start a queued request: put
    it in `self._rows` unless it finished at once), `_step()` (advance every running row by one token, answering
    each through `_respond`); optionally `validate` (more checks after this one's), `_reset_batch` and
    `_worker_scope`.
    """

    def __init__(self, *, max_batch_size: int, max_input_len: int, max_new_tokens_limit: int,
                 max_queue_size: int = 0, queue_timeout_s: float = 0.0, worker_name: str = "af3trt-decoder"):
        self.max_batch_size = int(max_batch_size)
        self.max_input_len = int(max_input_len)
        self.max_new_tokens_limit = int(max_new_tokens_limit)
        if self.max_input_len < 1 or self.max_batch_size < 1 or self.max_new_tokens_limit < 1:
            raise DecodeError("max_input_len, max_batch_size and max_new_tokens_limit must be positive")
        # Overload: at most max_queue_size requests wait for a batch slot (0: no bound); one that waited longer
        # than queue_timeout_s is answered busy instead of being started (0: no limit).
        self.max_queue_size, self.queue_timeout_s = int(max_queue_size), float(queue_timeout_s)
        self.stats = {"max_batch": 0, "busy": 0, "cancelled": 0}
        self._rows: list[Row] = []  # the running batch, owned by the worker thread
        self._queue: queue.Queue = queue.Queue()
        self._stopped = threading.Event()
        self._worker = threading.Thread(target=self._run, name=worker_name, daemon=True)

    def _start_worker(self) -> None:
        self._worker.start()

    # ---------------------------------------------------------------- public API

    def validate(self, r: GenerationRequest):
        """Check what every engine checks; return the input ids. Raises DecodeError with the reason."""
        ids = np.asarray(r.input_ids)
        if ids.ndim != 1 or ids.size == 0:
            raise DecodeError(f"input_ids must be a non-empty 1-D array, got shape {ids.shape}")
        if not np.issubdtype(ids.dtype, np.integer):
            raise DecodeError(f"input_ids must be integers, got {ids.dtype}")
        if ids.size > self.max_input_len:
            raise DecodeError(f"input length {ids.size} exceeds max_input_len {self.max_input_len}")
        if not 1 <= r.max_new_tokens <= self.max_new_tokens_limit:
            raise DecodeError(f"max_new_tokens {r.max_new_tokens} outside 1..{self.max_new_tokens_limit}")
        if not 0 <= r.min_tokens <= r.max_new_tokens:
            raise DecodeError(f"min_tokens {r.min_tokens} outside 0..{r.max_new_tokens} (max_new_tokens)")
        return ids

    def submit(self, request: GenerationRequest, emit: Emit, on_error: OnError | None = None,
               cancelled: Callable[[], bool] | None = None) -> None:
        """Queue a request. Raises DecodeError now if it is invalid or the engine is stopped, ServerBusy if
        max_queue_size requests already wait. `cancelled()` (default: request.cancelled) is polled between steps, at
        most every CANCEL_CHECK_S: True drops the request with RequestCancelled."""
        if self._stopped.is_set():
            raise DecodeError("decoder engine is stopped")
        ids = self.validate(request)
        if self.max_queue_size and self._queue.qsize() >= self.max_queue_size:
            self.stats["busy"] += 1
            raise ServerBusy(f"server busy: {self._queue.qsize()} requests already wait for the decoder "
                             f"(max_queue_size {self.max_queue_size}); retry later")
        self._queue.put(self._row(request, ids, emit=emit, on_error=on_error,
                                  cancelled=cancelled if cancelled is not None else request.cancelled,
                                  queued_at=time.monotonic()))

    def generate(self, request: GenerationRequest, timeout: float | None = None) -> list[int]:
        """Run one request to completion through the worker; return the generated ids (end id excluded)."""
        done, tokens, errors = threading.Event(), [], []

        def emit(new, final):
            tokens.extend(new)
            if final:
                done.set()

        def on_error(exc):
            errors.append(exc)
            done.set()

        self.submit(request, emit, on_error)
        if not done.wait(timeout):
            raise TimeoutError(f"decoder did not finish within {timeout} s")
        if errors:
            raise errors[0]
        return tokens

    def stop(self) -> None:
        """Stop the worker after the current step; requests still queued or running get
        DecodeError('decoder engine is stopped'). May be called from a callback (then it does not wait)."""
        if not self._stopped.is_set():
            self._stopped.set()
            self._queue.put(_STOP)  # wakes an idle worker
        if threading.current_thread() is not self._worker:
            self._worker.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    # ---------------------------------------------------------------- what an engine writes

    def _row(self, request: GenerationRequest, ids, **fields) -> Row:
        """The engine's Row for a validated request (`ids`: what validate returned)."""
        raise NotImplementedError

    def _prefill(self, row: Row) -> None:
        """Start a queued request: append it to self._rows, unless it is answered at once."""
        raise NotImplementedError

    def _step(self) -> None:
        """Advance every running row by one token; drop the rows that finished or failed."""
        raise NotImplementedError

    def _reset_batch(self) -> None:
        self._rows = []

    def _worker_scope(self):
        return contextlib.nullcontext()

    # ---------------------------------------------------------------- worker

    def _run(self) -> None:
        with self._worker_scope():
            while not self._stopped.is_set():
                self._admit()
                if self._rows and not self._stopped.is_set():
                    self._step()
        stopped = DecodeError("decoder engine is stopped")
        for row in self._rows:
            self._fail(row, stopped)
        self._reset_batch()
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP:
                self._fail(item, stopped)

    def _admit(self) -> None:
        """Start queued requests while there is room, blocking when idle (until a request or stop arrives)."""
        while len(self._rows) < self.max_batch_size and not self._stopped.is_set():
            try:
                item = self._queue.get(block=not self._rows)
            except queue.Empty:
                return
            if item is _STOP:
                return
            if self._stopped.is_set():
                self._fail(item, DecodeError("decoder engine is stopped"))
                return
            if self._gone(item):
                continue
            waited = time.monotonic() - item.queued_at
            if self.queue_timeout_s and waited > self.queue_timeout_s:
                self.stats["busy"] += 1
                self._fail(item, ServerBusy(f"server busy: waited {waited:.1f} s for a decoder slot (queue "
                                            f"timeout {self.queue_timeout_s:g} s); retry later"))
                continue
            try:
                self._prefill(item)
            except Exception as exc:  # noqa: BLE001 — delivered to that request only
                self._fail(item, exc)
            self.stats["max_batch"] = max(self.stats["max_batch"], len(self._rows))

    def _gone(self, row: Row) -> bool:
        """True (and the request is finished with RequestCancelled) if its client cancelled it."""
        if row.cancelled is None or time.monotonic() < row.next_cancel_check:
            return False
        row.next_cancel_check = time.monotonic() + CANCEL_CHECK_S
        try:
            gone = bool(row.cancelled())
        except Exception:  # noqa: BLE001 - a sender that cannot tell is treated as still wanted
            log.exception("cancellation check failed")
            gone = False
        if gone:
            self.stats["cancelled"] += 1
            log.warning("decoder: request cancelled by its client after %d tokens; generation stopped",
                        len(row.generated))
            self._fail(row, RequestCancelled(f"request cancelled by the client after {len(row.generated)} of at "
                                             f"most {row.req.max_new_tokens} tokens"))
        return gone

    @staticmethod
    def _respond(row: Row, final: bool) -> None:
        """Answer the token just appended to row.generated: streamed, one response per token; else one response
        with all tokens when the request is finished."""
        if row.req.streaming:
            row.emit(row.generated[-1:], final)
        elif final:
            row.emit(list(row.generated), True)

    @staticmethod
    def _fail(row: Row, exc: BaseException) -> None:
        if row.on_error is None:
            log.error("decoder request failed and has no on_error: %s", exc)
            return
        try:
            row.on_error(exc)
        except Exception:  # noqa: BLE001
            log.exception("on_error callback raised")


@dataclass(eq=False, kw_only=True)
class _Seq(Row):
    """A request in flight in the CPU decoder."""

    ids: torch.Tensor  # int64 [L]
    params: SamplingParams = SamplingParams()  # the request's sampling, set at prefill
    generator: torch.Generator | None = None
    seen: torch.Tensor | None = None  # bool [V]: ids seen so far, for the repetition penalty
    last: int = -1  # last sampled token: the next decode input
    pos: int = 0  # position of the next decode input = real tokens in this row's KV cache
    matcher: grammar.Matcher | None = None  # the request's guide: masks its logits, follows its tokens


class DecoderEngine(BatchingEngine):
    """Qwen2ForCausalLM on CPU behind the continuous-batching worker (BatchingEngine): its prefill (with KV-cache
    reuse and the prompt table) and its batched decode step."""

    def __init__(self, lm_dir: Path, *, max_batch_size: int = 8, max_input_len: int | None = None,
                 max_new_tokens_limit: int = 4096, threads: int | None = None, max_queue_size: int = 0,
                 queue_timeout_s: float = 0.0, lora_dir: Path | None = None, prefix_cache_bytes: int = 0,
                 int8_linear: bool = False):
        if threads:
            torch.set_num_threads(threads)  # process-wide in torch
        lm_dir = Path(lm_dir)
        t0 = time.perf_counter()
        if int8_linear and lora_dir:
            raise DecodeError("int8 linear layers and a LoRA adapter together are not supported by the CPU decoder")
        self.model = load_model(lm_dir, int8_linear)
        cfg = self.model.config
        if getattr(cfg, "use_sliding_window", False) or any(t != "full_attention" for t in (cfg.layer_types or [])):
            raise DecodeError("sliding-window attention is not supported by the CPU decoder")
        self.vocab_size: int = cfg.vocab_size
        self.hidden_size: int = cfg.hidden_size
        self.dtype: torch.dtype = self.model.dtype
        self.eos_ids: tuple = _eos_ids(lm_dir, cfg)
        super().__init__(max_batch_size=max_batch_size, max_new_tokens_limit=max_new_tokens_limit,
                         max_input_len=max_input_len if max_input_len is not None
                         else cfg.max_position_embeddings - max_new_tokens_limit,
                         max_queue_size=max_queue_size, queue_timeout_s=queue_timeout_s)
        if self.max_input_len + self.max_new_tokens_limit > cfg.max_position_embeddings:
            raise DecodeError(f"max_input_len + max_new_tokens_limit exceeds max_position_embeddings "
                              f"{cfg.max_position_embeddings}")
        self._embed_tokens = self.model.get_input_embeddings()
        # the think/ adapter, applied per batch row (runtime/engines/lora.py); its task id is the build's (lora.json)
        self.lora = lora.attach(self.model, lora_dir) if lora_dir else None
        # guided decoding: guides compiled on first use with the tokenizer beside the model (nothing loaded before)
        self.grammars = grammar.Grammars(lm_dir, self.vocab_size, self.eos_ids)

        # Batch state beside self._rows, owned by the worker thread.
        self._cache = None  # DynamicCache, [B, kv_heads, T, head_dim] per layer, left-padded
        self._mask: torch.Tensor | None = None  # int64 [B, T]: 1 = real token
        self.stats.update({"prefills": 0, "decode_steps": 0, "decode_rows": 0, "decode_seconds": 0.0,
                           "prefill_seconds": 0.0, "reused_tokens": 0, "guided_rows": 0, "guide_seconds": 0.0})
        # KV-cache reuse: prompt K/V per layer, [1, kv_heads, b, head_dim] for the first b = k * PREFIX_BLOCK tokens,
        # keyed by the chained digest of those blocks; LRU within prefix_cache_bytes (0: off)
        self.prefixes = LruBytes(prefix_cache_bytes)
        self._start_worker()
        log.info("decoder: %s, %s, vocab %d, hidden %d, eos %s, max_batch %d, max_input %d, max_new %d (%.2f s)",
                 lm_dir, str(self.dtype).removeprefix("torch."), self.vocab_size, self.hidden_size, self.eos_ids,
                 self.max_batch_size, self.max_input_len, self.max_new_tokens_limit, time.perf_counter() - t0)

    def validate(self, r: GenerationRequest) -> torch.Tensor:
        """Check a request; return its input ids as int64. Raises DecodeError with the reason."""
        ids = super().validate(r)
        if ids.min() < 0:
            raise DecodeError(f"negative token id {int(ids.min())} in input_ids")
        n_rows = 0
        if r.prompt_table is not None:
            t = r.prompt_table
            if not isinstance(t, torch.Tensor) or t.ndim != 2:
                raise DecodeError("prompt_table must be a 2-D torch.Tensor [N, hidden]")
            if t.shape[1] != self.hidden_size:
                raise DecodeError(f"prompt_table hidden size {t.shape[1]} != engine hidden size {self.hidden_size}")
            if t.dtype != self.dtype:
                raise DecodeError(f"prompt_table dtype {t.dtype} != engine dtype {self.dtype}")
            n_rows = t.shape[0] if r.prompt_vocab_size == 0 else r.prompt_vocab_size
            if not 0 < n_rows <= t.shape[0]:
                raise DecodeError(f"prompt_vocab_size {r.prompt_vocab_size} outside 1..{t.shape[0]} (table rows)")
        elif r.prompt_vocab_size:
            raise DecodeError(f"prompt_vocab_size {r.prompt_vocab_size} given without a prompt_table")
        top = int(ids.max())
        if top >= self.vocab_size + n_rows:
            what = "without a prompt table" if n_rows == 0 else f"with a {n_rows}-row prompt table"
            raise DecodeError(f"token id {top} >= vocab_size {self.vocab_size} {what}")
        if r.extra_ids is not None and np.shape(r.extra_ids) != ids.shape:
            raise DecodeError(f"prompt_table_extra_ids must have one id per input token ({ids.size}), got shape "
                              f"{np.shape(r.extra_ids)}")
        if r.end_id is not None and not 0 <= r.end_id < self.vocab_size:
            raise DecodeError(f"end_id {r.end_id} outside 0..{self.vocab_size - 1}")
        if r.lora_task_id is not None:
            if self.lora is None:
                raise NoAdapter(f"lora_task_id {r.lora_task_id}: this decoder was built without a LoRA adapter "
                                f"(thinking needs a build from a checkpoint with think/)")
            if r.lora_task_id != self.lora.config["task_id"]:
                raise DecodeError(f"unknown lora_task_id {r.lora_task_id} (this decoder serves "
                                  f"{self.lora.config['task_id']})")
        for word in r.stop_words:
            if not word or not all(0 <= t < self.vocab_size for t in word):
                raise DecodeError(f"stop word {list(word)} must be non-empty with ids in 0..{self.vocab_size - 1}")
        try:
            sampling.validate(temperature=r.temperature, top_k=r.top_k, top_p=r.top_p,
                              repetition_penalty=r.repetition_penalty)
        except SamplingError as e:
            raise DecodeError(str(e)) from None
        if r.guide is not None and (r.end_id is None or r.min_tokens):
            raise DecodeError("a guide needs an end id and no min_tokens: it ends the answer where its grammar is "
                              "complete (runtime/stages/guided.py)")
        return torch.from_numpy(ids.astype(np.int64))

    # ---------------------------------------------------------------- this engine's part: prefill and decode step

    def _row(self, request: GenerationRequest, ids: torch.Tensor, **fields) -> _Seq:
        # a guide is compiled here once (GuideError when it cannot be), each request gets its own matcher
        matcher = self.grammars.matcher(request.guide) if request.guide is not None else None
        return _Seq(req=request, ids=ids, matcher=matcher, **fields)

    def _worker_scope(self):
        return torch.inference_mode()

    def _embed(self, ids: torch.Tensor, table: torch.Tensor | None) -> torch.Tensor:
        """inputs_embeds [L, H]: word embedding for ids < vocab_size, table row (id - vocab_size) otherwise."""
        fake = ids >= self.vocab_size
        if not bool(fake.any()):
            return self._embed_tokens(ids)
        embeds = torch.empty(ids.shape[0], self.hidden_size, dtype=self.dtype)
        embeds[~fake] = self._embed_tokens(ids[~fake])
        embeds[fake] = table[ids[fake] - self.vocab_size]
        return embeds

    def _prefill(self, seq: _Seq) -> None:
        from transformers import DynamicCache

        t0 = time.perf_counter()
        r = seq.req
        seq.params = r.sampling_params()
        if not seq.params.greedy:
            seq.generator = sampling.generator(seq.params.seed)
        if r.repetition_penalty != 1.0:
            seq.seen = torch.zeros(self.vocab_size, dtype=torch.bool)
            seq.seen[seq.ids[seq.ids < self.vocab_size]] = True
        cache = DynamicCache(config=self.model.config)
        cache.layers[:] = [_append_layer() for _ in cache.layers]  # full attention only (checked at load)
        keys = self._block_keys(seq)  # [k]: the digest of the first (i + 1) blocks
        start = self._reuse_prefix(cache, keys)  # prompt tokens whose K/V came from an earlier prompt
        embeds = self._embed(seq.ids[start:], r.prompt_table)  # [L - start, H]
        self._select_adapter([seq])
        out = self.model(inputs_embeds=embeds[None], past_key_values=cache, use_cache=True, logits_to_keep=1)
        seq.pos = seq.ids.shape[0]
        if keys and start < len(keys) * PREFIX_BLOCK:
            self._store_prefix(cache, keys, start, seq.ids.numpy())
        self.stats["prefills"] += 1
        self.stats["prefill_seconds"] += time.perf_counter() - t0
        if not self._advance(seq, self._next_token(seq, out.logits[0, -1])):
            self._join(seq, out.past_key_values)

    # ---------------------------------------------------------------- KV-cache reuse (prompt prefixes)

    def _block_keys(self, seq: _Seq) -> list[bytes]:
        """Chained digests of the prompt's full blocks of PREFIX_BLOCK (token id, extra id) pairs, short of its last
        token (whose logits a prefill must compute); [] when reuse is off or audio rows cannot be identified."""
        ids, extra = seq.ids.numpy(), seq.req.extra_ids
        if not self.prefixes.max_bytes or (extra is None and bool((ids >= self.vocab_size).any())):
            return []
        extra = np.zeros(len(ids), np.uint64) if extra is None else np.asarray(extra, np.uint64)
        # the chain starts from the adapter: a LoRA (thinking) changes every layer's K/V of the same tokens
        keys, h = [], b"" if seq.req.lora_task_id is None else f"lora {seq.req.lora_task_id}".encode()
        for end in range(PREFIX_BLOCK, len(ids), PREFIX_BLOCK):
            h = hashlib.blake2b(h + ids[end - PREFIX_BLOCK: end].tobytes() + extra[end - PREFIX_BLOCK: end].tobytes(),
                                digest_size=16).digest()
            keys.append(h)
        return keys

    def _reuse_prefix(self, cache, keys: list[bytes]) -> int:
        """Load the longest stored prefix of these blocks into `cache`; return its length in tokens (0: none)."""
        for k in range(len(keys), 0, -1):
            stored = self.prefixes.get(keys[k - 1])
            if stored is not None:
                for layer, (key, value) in zip(cache.layers, stored, strict=True):
                    layer.lazy_initialization(key, value)
                    layer.keys, layer.values = key, value  # copied into the layer's own buffer on its first update
                self.stats["reused_tokens"] += k * PREFIX_BLOCK
                return k * PREFIX_BLOCK
        return 0

    def _store_prefix(self, cache, keys: list[bytes], start: int, ids: np.ndarray) -> None:
        """Keep the prompt's K/V under its last full block; and, where its audio rows end before that block, the
        blocks up to the end of its audio under their own key: a later prompt with the same audio and other text
        after it (another question; a live session's commit after its turn was sent ahead, whose audio starts with
        this one's) finds them. Blocks reused from an earlier prompt (before `start`) are not stored again."""
        ends = {len(keys)}
        audio = np.flatnonzero(ids >= self.vocab_size)
        if audio.size:
            ends.add(min(len(keys), (int(audio[-1]) + 1) // PREFIX_BLOCK))
        for b in sorted(e for e in ends if e * PREFIX_BLOCK > start):
            n = b * PREFIX_BLOCK
            self.prefixes.put(keys[b - 1], [(layer.keys[:, :, :n].clone(), layer.values[:, :, :n].clone())
                                            for layer in cache.layers])

    def _step(self) -> None:
        live = [i for i, seq in enumerate(self._rows) if not self._gone(seq)]
        if len(live) < len(self._rows):
            self._select(live)
            if not self._rows:
                return
        t0 = time.perf_counter()
        rows = self._rows
        batch = len(rows)
        input_ids = torch.tensor([[s.last] for s in rows], dtype=torch.long)  # [B, 1]
        position_ids = torch.tensor([[s.pos] for s in rows], dtype=torch.long)  # [B, 1]
        self._mask = torch.cat([self._mask, torch.ones(batch, 1, dtype=torch.long)], dim=1)  # [B, T+1]
        self._select_adapter(rows)
        # The mask as transformers would build it for SDPA (bool [B, 1, 1, T+1], True = attend): a 4-D mask is used
        # as given, which skips its per-step mask construction (a tenth of a step at batch 8); same logits, bit for bit.
        mask = self._mask.bool()[:, None, None, :]
        try:
            out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                             past_key_values=self._cache, use_cache=True)
        except Exception as exc:  # noqa: BLE001 — the batch state is unusable: fail its requests, keep serving
            log.exception("batched decode step failed; failing %d requests", batch)
            for seq in rows:
                self._fail(seq, exc)
            self._reset_batch()
            return
        logits = out.logits[:, -1]  # [B, V]
        if any(s.matcher is not None for s in rows):  # guided rows masked in place; the others are not touched
            t_mask = time.perf_counter()
            grammar.mask_rows(logits, [s.matcher for s in rows])
            self.stats["guided_rows"] += sum(s.matcher is not None for s in rows)
            self.stats["guide_seconds"] += time.perf_counter() - t_mask
        try:
            tokens = sampling.next_tokens(logits, [s.params for s in rows], seen=[s.seen for s in rows],
                                          rngs=[s.generator for s in rows])
        except Exception:  # noqa: BLE001 — one row's sampling failed: find it row by row below
            tokens = [None] * batch
        for i, seq in enumerate(rows):  # rows whose end id is still masked (min_tokens) take the per-row path
            if seq.req.min_tokens and len(seq.generated) < seq.req.min_tokens:
                tokens[i] = None
        keep = []
        for i, seq in enumerate(rows):
            seq.pos += 1
            try:
                token = tokens[i] if tokens[i] is not None else self._next_token(seq, logits[i])
                finished = self._advance(seq, token)
            except Exception as exc:  # noqa: BLE001 — delivered to that request only
                self._fail(seq, exc)
                finished = True
            if not finished:
                keep.append(i)
        self.stats["decode_steps"] += 1
        self.stats["decode_rows"] += batch
        self.stats["decode_seconds"] += time.perf_counter() - t0
        if len(keep) < batch:
            self._select(keep)

    def _select_adapter(self, rows: list[_Seq]) -> None:
        """The next forward applies the LoRA to the rows of thinking requests only (one batch for both modes)."""
        if self.lora is not None:
            self.lora.rows([s.req.lora_task_id is not None for s in rows])

    def _next_token(self, seq: _Seq, logits: torch.Tensor) -> int:
        """One token from logits [V] with the request's sampling (runtime/stages/sampling.py); before min_tokens the end id
        is masked out, as TensorRT-LLM's minTokens does (stop words still end the request there too)."""
        r = seq.req
        if r.end_id is not None and len(seq.generated) < r.min_tokens:
            logits = logits.clone()
            logits[r.end_id] = -float("inf")
        if seq.matcher is not None:  # the prefill's token (a decode step's rows are masked already: idempotent)
            logits = grammar.mask_rows(logits[None].clone(), [seq.matcher])[0]
        return sampling.next_token(logits, seq.params, seen=seq.seen, rng=seq.generator)

    def _advance(self, seq: _Seq, token: int) -> bool:
        """Record a sampled token and emit it; True when the request is finished."""
        r = seq.req
        # the guide follows the token (GuideError if it refuses it); a completed grammar ends the answer on its stop id
        complete = seq.matcher is not None and seq.matcher.advance(token)
        if r.end_id is not None and token == r.end_id:  # the end id is not part of the output
            seq.emit([] if r.streaming else list(seq.generated), True)
            return True
        seq.generated.append(token)
        if seq.seen is not None:
            seq.seen[token] = True
        final = complete or len(seq.generated) >= r.max_new_tokens or ends_with_stop_word(seq.generated, r.stop_words)
        self._respond(seq, final)
        seq.last = token
        return final

    # ---------------------------------------------------------------- batched, left-padded KV cache

    def _join(self, seq: _Seq, cache) -> None:
        """Add a prefilled row to the batch; the shorter side is left-padded to a common length."""
        length = seq.pos
        if not self._rows:
            self._cache, self._mask, self._rows = cache, torch.ones(1, length, dtype=torch.long), [seq]
        else:
            width = self._mask.shape[1]
            total = max(width, length)
            merged = [(torch.cat([_pad_left(mine.keys, total - width), _pad_left(new.keys, total - length)]),
                       torch.cat([_pad_left(mine.values, total - width), _pad_left(new.values, total - length)]))
                      for mine, new in zip(self._cache.layers, cache.layers, strict=True)]
            row_mask = torch.ones(1, length, dtype=torch.long)
            mask = torch.cat([_pad_left_2d(self._mask, total - width), _pad_left_2d(row_mask, total - length)])
            for layer, (keys, values) in zip(self._cache.layers, merged):  # commit only once all is built
                layer.keys, layer.values = keys, values
            self._mask = mask
            self._rows.append(seq)

    def _select(self, keep: list[int]) -> None:
        """Keep only rows `keep`, then drop the left padding every remaining row shares."""
        if not keep:
            self._reset_batch()
            return
        self._rows = [self._rows[i] for i in keep]
        index = torch.tensor(keep, dtype=torch.long)
        shared_pad = self._mask.shape[1] - max(s.pos for s in self._rows)
        for layer in self._cache.layers:
            layer.keys = layer.keys[index, :, shared_pad:]
            layer.values = layer.values[index, :, shared_pad:]
        self._mask = self._mask[index, shared_pad:]

    def _reset_batch(self) -> None:
        self._rows, self._cache, self._mask = [], None, None


_GROW_TOKENS = 64  # spare positions allocated with a layer's buffer (and at least a quarter of its length)


def load_model(lm_dir: Path, int8_linear: bool = False):
    """The language model as the engine runs it: Qwen2ForCausalLM in its stored dtype; int8_linear: every linear
    layer's weights quantized to int8 per output channel at load, activations per batch at run time (torch's dynamic
    quantization, fbgemm's int8 GEMM: VNNI where the CPU has it) — a CPU decoder precision's `int8_linear`
    (af3trt/registry.py)."""
    from transformers import Qwen2ForCausalLM  # lazily: only the engine needs transformers

    model = Qwen2ForCausalLM.from_pretrained(Path(lm_dir), dtype="auto").eval()
    if int8_linear:
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        model = quantize_dynamic(model, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)
    return model


def _append_layer():
    """A transformers DynamicLayer that appends in place (the class is made on first use: transformers is lazy)."""
    global _AppendLayer
    if _AppendLayer is None:
        from transformers.cache_utils import DynamicLayer

        class AppendLayer(DynamicLayer):
            """keys/values are views [B, kv_heads, T, head_dim] of buffers with spare room along T: a decode step
            writes its new position in place instead of copying the whole cache (DynamicLayer's torch.cat, which on
            CPU cost as much as the step's matmuls at batch 16). The attention reads the same values through a view,
            so results are unchanged. When the engine replaces keys/values wholesale (join, select), the next update
            copies them into a new buffer."""

            def update(self, key_states, value_states, *args, **kwargs):
                if not self.is_initialized:
                    self.lazy_initialization(key_states, value_states)
                n, add = self.get_seq_length(), key_states.shape[-2]
                kbuf, vbuf = getattr(self, "_kbuf", None), getattr(self, "_vbuf", None)
                if not (_views(self.keys, kbuf, n) and _views(self.values, vbuf, n)) or kbuf.shape[-2] < n + add:
                    b, h, _, d = key_states.shape
                    cap = n + add + max(_GROW_TOKENS, (n + add) // 4)
                    kbuf = key_states.new_empty(b, h, cap, d)
                    vbuf = value_states.new_empty(b, h, cap, value_states.shape[-1])
                    if n:
                        kbuf[:, :, :n] = self.keys
                        vbuf[:, :, :n] = self.values
                    self._kbuf, self._vbuf = kbuf, vbuf
                kbuf[:, :, n: n + add] = key_states
                vbuf[:, :, n: n + add] = value_states
                self.keys, self.values = kbuf[:, :, : n + add], vbuf[:, :, : n + add]
                return self.keys, self.values

        _AppendLayer = AppendLayer
    return _AppendLayer()


_AppendLayer = None


def _views(t: torch.Tensor | None, buf: torch.Tensor | None, n: int) -> bool:
    """t is buf[:, :, :n] (the layer's keys/values were not replaced since the last update)."""
    return (t is not None and buf is not None and t.data_ptr() == buf.data_ptr() and t.shape[:2] == buf.shape[:2]
            and t.shape[-2] == n and t.stride() == buf.stride())


def _pad_left(x: torch.Tensor, n: int) -> torch.Tensor:
    """Left-pad a [B, heads, T, head_dim] cache tensor along T with zeros (masked out anyway)."""
    return x if n == 0 else torch.nn.functional.pad(x, (0, 0, n, 0))


def _pad_left_2d(mask: torch.Tensor, n: int) -> torch.Tensor:
    return mask if n == 0 else torch.nn.functional.pad(mask, (n, 0))


def _eos_ids(lm_dir: Path, cfg) -> tuple:
    """End ids from generation_config.json, else from config.json (an int or a list in either)."""
    eos = None
    gen = lm_dir / "generation_config.json"
    if gen.exists():
        eos = json.loads(gen.read_text()).get("eos_token_id")
    if eos is None:
        eos = getattr(cfg, "eos_token_id", None)
    if eos is None:
        return ()
    return tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))
