"""Stand-ins for the encoder and the decoder: the serving path measured without the model's cost.

`af3trt build --stand-in-tokens-per-s R` renders a repository whose encoder and decoder models run these instead of
ONNX Runtime and the CPU decoder. Everything else (preprocess, fusion, postprocess, the ensemble, gRPC, the OpenAI
front) is the real code, so `af3trt bench --serving-path` measures what those cost per request and per streamed
token at GPU-like token rates on a CPU (perf/serving_path.py).

- StandInEncoder: the encoder's interface (rows, hidden_size, run) returning zeros of the right shape [W, T/4, H].
- StandInDecoder: a decoder engine on the same skeleton as the CPU decoder (runtime/engines/decoder.py
  BatchingEngine: submit / generate / stop, request validation, queue bound, cancellation, the response pattern);
  only its step is its own: in-flight batched, every running request gets one token per step, R steps per second
  (a step that falls behind is not made up). Tokens are deterministic (a function of the prompt and the position)
  and never an end id of the LM's config, so every request runs to its max_new_tokens (what a fixed-length benchmark
  asks for; end_id and stop words are not looked at). It loads no weights: only the LM's config.json.

    engine = StandInDecoder(lm_dir, tokens_per_s=200.0, max_batch_size=16)
    engine.generate(GenerationRequest(input_ids=ids, max_new_tokens=8))  # → 8 ids
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from af3trt.runtime.stages import lengths
from af3trt.runtime.engines.decoder import BatchingEngine, DecodeError, GenerationRequest, Row

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


@dataclass(eq=False, kw_only=True)
class _Run(Row):
    first: int = 0  # the prompt's position in the token cycle


class StandInDecoder(BatchingEngine):
    """A decoder engine whose step makes one token for every running request, `tokens_per_s` steps per second."""

    def __init__(self, lm_dir: Path, *, tokens_per_s: float, max_batch_size: int = 8, max_input_len: int = 4096,
                 max_new_tokens_limit: int = 4096, max_queue_size: int = 0):
        if not tokens_per_s > 0:
            raise DecodeError(f"tokens_per_s must be > 0, got {tokens_per_s}")
        super().__init__(max_batch_size=max_batch_size, max_input_len=max_input_len,
                         max_new_tokens_limit=max_new_tokens_limit, max_queue_size=max_queue_size,
                         worker_name="af3trt-stand-in-decoder")
        cfg = json.loads((Path(lm_dir) / "config.json").read_text())
        cfg = cfg.get("text_config", cfg)
        self.vocab_size, self.hidden_size = int(cfg["vocab_size"]), int(cfg["hidden_size"])
        self.interval = 1.0 / float(tokens_per_s)
        eos = cfg.get("eos_token_id")
        self._ends = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self._ids = [i for i in range(FIRST_TOKEN, FIRST_TOKEN + TOKEN_SPAN) if i < self.vocab_size
                     and i not in self._ends]
        self.stats.update({"steps": 0, "late_steps": 0})
        self._due: float | None = None  # when the next step is due; None while idle
        self._start_worker()

    def token(self, first: int, k: int) -> int:
        """The k-th generated token of a prompt whose position in the cycle is `first`."""
        return self._ids[(first + k) % len(self._ids)]

    def _row(self, request: GenerationRequest, ids: np.ndarray, **fields) -> _Run:
        return _Run(req=request, first=int(ids.astype(np.int64).sum()) % len(self._ids), **fields)

    def _prefill(self, run: _Run) -> None:
        self._rows.append(run)

    def _step(self) -> None:
        """One token for every running request, then wait until the next step is due."""
        if self._due is None:  # the clock starts again with the first step after an idle spell
            self._due = time.monotonic()
        self.stats["steps"] += 1
        keep = []
        for run in self._rows:
            if self._gone(run):
                continue
            run.generated.append(self.token(run.first, len(run.generated)))
            final = len(run.generated) >= run.req.max_new_tokens
            try:
                self._respond(run, final)
            except Exception as exc:  # noqa: BLE001 — that request only
                self._fail(run, exc)
                continue
            if not final:
                keep.append(run)
        self._rows = keep
        self._due += self.interval
        wait = self._due - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        else:  # behind: the next step starts now, the lost time is not made up
            self.stats["late_steps"] += 1
            self._due = time.monotonic()
        if not self._rows:
            self._due = None
