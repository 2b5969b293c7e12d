"""Streamed tokens coalesced into fewer responses when they come faster than one per interval.

Every streamed response crosses tritonserver's ensemble and the postprocess stub: about 0.3-0.5 ms of CPU per
response whatever it carries (perf/serving_path.py measures it). When the decoder makes tokens faster than one per
`interval_s` for a request, sending them one response each buys the client nothing it can read and costs the serving
path that much per token; here they are held and sent together, at most one response per interval:

- the first token of a request is sent alone and at once (time to first token is unchanged);
- later tokens are held until `interval_s` has passed since the last response, then sent with the held ones;
- the decoder's last call (final) is sent alone, as it came, after the held tokens in a response of their own: a
  stream's last response keeps what postprocess recognises it by (empty when the request ended on its end id, else
  the token that reached max_tokens or a stop word: runtime/engines/decoder.py, triton_repo/postprocess).

Joined, the responses carry exactly the tokens, in order, that one-per-token responses would. interval_s 0 turns
it off. The tensorrtllm backend (GPU target) sends one response per generated token itself: it has no such option
(TensorRT-LLM triton_backend/all_models/inflight_batcher_llm/tensorrt_llm/config.pbtxt lists no stream-interval
parameter, nor does tensorrtllm_backend r26.04 docs/model_config.md).

    send = Coalescer(0.02, lambda tokens, final: sender.send(...))
    send([t], False) ... send([], True)
"""

from __future__ import annotations

import time
from typing import Callable


class Coalescer:
    """One streamed request's responses: `__call__(tokens, final)` as the decoder emits; `send(tokens, final)` as
    they go out."""

    def __init__(self, interval_s: float, send: Callable[[list, bool], None],
                 clock: Callable[[], float] = time.monotonic):
        self.interval_s, self.send, self.clock = float(interval_s), send, clock
        self.held: list = []
        self.last_sent: float | None = None  # None: nothing sent yet (the first token goes at once)

    def __call__(self, tokens: list, final: bool) -> None:
        if final:
            if self.held:
                self.send(self.held, False)
                self.held = []
            self.send(list(tokens), True)
            return
        self.held.extend(tokens)
        now = self.clock()
        if self.last_sent is None or now - self.last_sent >= self.interval_s:
            self.send(self.held, False)
            self.held, self.last_sent = [], now
