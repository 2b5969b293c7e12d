"""Triton adapter: token ids → text (af3trt.runtime.stages.detok), incremental for streams.

Called once per decoder response. Streamed answers are released as complete UTF-8 characters: the incomplete
tail of each request is kept here between its responses (hence a single instance), keyed by request id.

A stream's last response is not flagged to the steps after the decoder, so it is recognised here: it is empty (the
request ended on its end id, which the tensorrtllm backend leaves out of output_ids: see runtime/engines/decoder.py), or it
brings the answer to max_tokens (resolved by fusion, read from the request context). There the held-back text of
strip_prefix (a possible prefix, the closing quote and full stop) is settled, so a streamed answer joins to exactly
the non-streamed one.
"""

import json
import time

import numpy as np
import triton_python_backend_utils as pb

from af3trt.runtime.stages.params import PostprocessParams
from af3trt.runtime.triton import triton_io as io
from af3trt.runtime.triton.context import STALE_SECONDS, RequestContext, RunningRequests
from af3trt.runtime.stages.contract import (IGNORE_EOS, MAX_TOKENS, NOTICE, OUTPUT_IDS, PROMPT_TOKENS, SEQUENCE_LENGTH, STREAM,
                                     STRIP_PREFIX, TEXT_OUTPUT)
from af3trt.runtime.stages.detok import Detokenizer, StreamState, strip_transcription_prefix
from af3trt.runtime.stages.stop_words import trim_stop_token

PURGE_EVERY_S = 10.0


class TritonPythonModel:
    def initialize(self, args):
        p = PostprocessParams.parse(io.params(args))
        self.detok = Detokenizer(io.resolve(args, p.tokenizer_dir) / "tokenizer.json")
        self.ctx = RequestContext()
        self.running = RunningRequests(args["model_name"])  # the supervisor's drain reads it
        self.states: dict[str, tuple[float, StreamState, dict]] = {}
        self.stop_ids = list(p.stop_ids)
        self._next_purge = 0.0

    def execute(self, requests):
        with self.running.of(len(requests)):
            out = io.per_request(pb, requests, self.run)
        self._purge()
        return out

    def run(self, r):
        ids = io.tensor(pb, r, OUTPUT_IDS)  # [1, beam, T]
        n = int(io.tensor(pb, r, SEQUENCE_LENGTH).reshape(-1)[0])
        tokens = ids[0, 0, : min(n, ids.shape[-1])]
        rid = r.request_id()
        entry = self.states.get(rid) if rid else None
        first = entry is None
        if first:
            ctx = self.ctx.get(rid)
            self.ctx.drop(rid)
            entry = (time.monotonic(), StreamState(strip_prefix=bool(ctx.get(STRIP_PREFIX))), ctx)
        _, state, ctx = entry
        if not ctx.get(IGNORE_EOS):  # the decoder keeps stop words, as TensorRT-LLM does
            tokens = trim_stop_token(tokens, self.stop_ids)
        data = self.detok.to_bytes(tokens)
        if ctx.get(STREAM):
            state.tokens += len(tokens)
            final = len(tokens) == 0 or state.tokens >= ctx.get(MAX_TOKENS, float("inf"))
            text = state.feed(data, final=final)
            if final:
                self.states.pop(rid, None)
            else:
                self.states[rid] = (time.monotonic(), state, ctx)
        else:  # the whole answer in one response
            text = data.decode("utf-8", errors="replace")
            if ctx.get(STRIP_PREFIX):
                text = strip_transcription_prefix(text)
            self.states.pop(rid, None)
        notice = json.dumps(ctx.get("notices")) if first and ctx.get("notices") else ""
        return pb.InferenceResponse([
            io.bytes_tensor(pb, TEXT_OUTPUT, [text.encode()]),
            pb.Tensor(OUTPUT_IDS, np.ascontiguousarray(tokens, np.int32)),
            io.bytes_tensor(pb, NOTICE, [notice.encode()]),
            pb.Tensor(PROMPT_TOKENS, np.array([ctx.get(PROMPT_TOKENS, -1)], np.int32)),
        ])

    def _purge(self):
        """Drop the held text of streams that stopped coming (STALE_SECONDS); a scan of all of them, so at most once
        every PURGE_EVERY_S, not on each response."""
        now = time.monotonic()
        if now < self._next_purge:
            return
        self._next_purge = now + PURGE_EVERY_S
        for rid in [k for k, (t, _, _) in self.states.items() if now - t > STALE_SECONDS]:
            del self.states[rid]
