"""Stand-ins for the encoder and the decoder: the serving path measured without the model's cost.

`af3trt build --stand-in-tokens-per-s R` renders a repository whose encoder and decoder models run these instead of
ONNX Runtime and the CPU decoder. Everything else (preprocess, fusion, postprocess, the ensemble, gRPC, the OpenAI
front) is the real code, so `af3trt bench --serving-path` measures what those cost per request and per streamed
token at GPU-like token rates on a CPU (perf/serving_path.py).

- StandInEncoder: the encoder's interface (rows, hidden_size, run) returning zeros of the right shape [W, T/4, H].
- StandInDecoder: DecoderEngine's submit / generate / stop with the same request validation and the same response
  pattern (streamed: one token per response; else one response with all tokens), in-flight batched: every running
  request gets one token per step, R steps per second (a step that falls behind is not made up). Tokens are
  deterministic (a function of the prompt and the position) and never an end or stop id, so every request runs to
  its max_new_tokens (what a fixed-length benchmark asks for). It loads no weights: only the LM's config.json.

    engine = StandInDecoder(lm_dir, tokens_per_s=200.0, max_batch_size=16)
    engine.generate(GenerationRequest(input_ids=ids, max_new_tokens=8))  # → 8 ids
"""

from __future__ import annotations

import json
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from af3trt.runtime.stages import lengths
from af3trt.runtime.engines.decoder import (CANCEL_CHECK_S, DecodeError, Emit, GenerationRequest, OnError, RequestCancelled,
                                    ServerBusy)

TOKEN_SPAN = 64  # tokens cycle over ids FIRST_TOKEN … FIRST_TOKEN + TOKEN_SPAN - 1 (ends ids are skipped)
FIRST_TOKEN = 32  # byte-level BPE vocabularies (Qwen2's) spell ids 0…93 as printable ASCII


class StandInEncoder:
    """The encoder's interface (runtime/engines/encoder.py OnnxEncoder) at no cost: zeros [W, T/4, H]."""

    def __init__(self, hidden_size: int):
        self.hidden_size = int(hidden_size)

    def rows(self, frames: int) -> int:
        return lengths.encoder_rows(frames)

    def run(self, features: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return np.zeros((features.shape[0], self.rows(features.shape[2]), self.hidden_size), np.float32)


@dataclass(eq=False)
class _Run:
    req: GenerationRequest
    emit: Emit
    on_error: OnError | None
    cancelled: object = None
    first: int = 0  # the prompt's position in the token cycle
    generated: list = field(default_factory=list)
    next_cancel_check: float = 0.0


class StandInDecoder:
    """DecoderEngine's API; tokens at `tokens_per_s` steps per second for every running request."""

    def __init__(self, lm_dir: Path, *, tokens_per_s: float, max_batch_size: int = 8, max_input_len: int = 4096,
                 max_new_tokens_limit: int = 4096, max_queue_size: int = 0):
        if not tokens_per_s > 0:
            raise DecodeError(f"tokens_per_s must be > 0, got {tokens_per_s}")
        cfg = json.loads((Path(lm_dir) / "config.json").read_text())
        cfg = cfg.get("text_config", cfg)
        self.vocab_size, self.hidden_size = int(cfg["vocab_size"]), int(cfg["hidden_size"])
        self.interval = 1.0 / float(tokens_per_s)
        self.max_batch_size, self.max_input_len = int(max_batch_size), int(max_input_len)
        self.max_new_tokens_limit, self.max_queue_size = int(max_new_tokens_limit), int(max_queue_size)
        eos = cfg.get("eos_token_id")
        self._ends = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self._ids = [i for i in range(FIRST_TOKEN, FIRST_TOKEN + TOKEN_SPAN) if i < self.vocab_size
                     and i not in self._ends]
        self.stats = {"steps": 0, "late_steps": 0, "max_batch": 0}
        self._queue: queue.Queue = queue.Queue()
        self._rows: list[_Run] = []
        self._stopped = threading.Event()
        self._worker = threading.Thread(target=self._run, name="af3trt-stand-in-decoder", daemon=True)
        self._worker.start()

    def token(self, first: int, k: int) -> int:
        """The k-th generated token of a prompt whose position in the cycle is `first`."""
        return self._ids[(first + k) % len(self._ids)]

    def validate(self, r: GenerationRequest) -> np.ndarray:
        ids = np.asarray(r.input_ids)
        if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise DecodeError(f"input_ids must be a non-empty 1-D integer array, got {ids.dtype} {ids.shape}")
        if ids.size > self.max_input_len:
            raise DecodeError(f"input length {ids.size} exceeds max_input_len {self.max_input_len}")
        if not 1 <= r.max_new_tokens <= self.max_new_tokens_limit:
            raise DecodeError(f"max_new_tokens {r.max_new_tokens} outside 1..{self.max_new_tokens_limit}")
        if not 0 <= r.min_tokens <= r.max_new_tokens:
            raise DecodeError(f"min_tokens {r.min_tokens} outside 0..{r.max_new_tokens} (max_new_tokens)")
        return ids

    def submit(self, request: GenerationRequest, emit: Emit, on_error: OnError | None = None,
               cancelled=None) -> None:
        if self._stopped.is_set():
            raise DecodeError("decoder engine is stopped")
        ids = self.validate(request)
        if self.max_queue_size and self._queue.qsize() >= self.max_queue_size:
            raise ServerBusy(f"server busy: {self._queue.qsize()} requests already wait for the decoder "
                             f"(max_queue_size {self.max_queue_size}); retry later")
        self._queue.put(_Run(req=request, emit=emit, on_error=on_error,
                             cancelled=cancelled if cancelled is not None else request.cancelled,
                             first=int(ids.astype(np.int64).sum()) % len(self._ids)))

    def generate(self, request: GenerationRequest, timeout: float | None = None) -> list[int]:
        done, tokens, errors = threading.Event(), [], []
        self.submit(request, lambda new, final: (tokens.extend(new), final and done.set()),
                    lambda exc: (errors.append(exc), done.set()))
        if not done.wait(timeout):
            raise TimeoutError(f"stand-in decoder did not finish within {timeout} s")
        if errors:
            raise errors[0]
        return tokens

    def stop(self) -> None:
        self._stopped.set()
        self._queue.put(None)
        if threading.current_thread() is not self._worker:
            self._worker.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    # ---------------------------------------------------------------- worker: one step every `interval` seconds

    def _run(self) -> None:
        next_step = time.monotonic()
        while not self._stopped.is_set():
            idle = not self._rows
            self._admit()  # blocks while idle
            if not self._rows:
                continue
            if idle:  # the clock starts again with the first request after an idle spell
                next_step = time.monotonic()
            self._step()
            next_step += self.interval
            wait = next_step - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            else:  # behind: the next step starts now, the lost time is not made up
                self.stats["late_steps"] += 1
                next_step = time.monotonic()
        for run in self._rows:
            self._fail(run, DecodeError("decoder engine is stopped"))

    def _admit(self) -> None:
        while len(self._rows) < self.max_batch_size:
            try:
                item = self._queue.get(block=not self._rows)
            except queue.Empty:
                return
            if item is None:
                return
            self._rows.append(item)
        self.stats["max_batch"] = max(self.stats["max_batch"], len(self._rows))

    def _step(self) -> None:
        self.stats["steps"] += 1
        keep = []
        now = time.monotonic()
        for run in self._rows:
            if run.cancelled is not None and now >= run.next_cancel_check:
                run.next_cancel_check = now + CANCEL_CHECK_S
                if run.cancelled():
                    self._fail(run, RequestCancelled(f"request cancelled by the client after "
                                                     f"{len(run.generated)} tokens"))
                    continue
            token = self.token(run.first, len(run.generated))
            run.generated.append(token)
            final = len(run.generated) >= run.req.max_new_tokens
            try:
                if run.req.streaming:
                    run.emit([token], final)
                elif final:
                    run.emit(list(run.generated), True)
            except Exception as exc:  # noqa: BLE001 — that request only
                self._fail(run, exc)
                continue
            if not final:
                keep.append(run)
        self._rows = keep

    @staticmethod
    def _fail(run: _Run, exc: BaseException) -> None:
        if run.on_error is not None:
            run.on_error(exc)
