"""Sampling as pure functions: one validation of a request's sampling parameters, and next-token selection.

Fusion (runtime/stages/prompt.py) validates what a client sent and maps it to the decoder's inputs; the CPU decoder
(runtime/engines/decoder.py) validates what it is given (a direct client of the decoder model skips fusion) and picks each
token. Both call `validate` here, so a value is refused with the same words wherever it enters.

The semantics are TensorRT-LLM's (1.2 executor `SamplingConfig`, what the `tensorrtllm` backend's runtime_top_k,
runtime_top_p, temperature, repetition_penalty and seed inputs set):
- greedy unless asked otherwise: top_k == 1, or top_k == 0 and top_p == 0 (both "off"), is greedy; the client-facing
  temperature 0 is mapped to top_k = 1 by `from_request` (TensorRT-LLM itself does not accept a temperature of 0);
- the repetition penalty divides a seen token's positive logit and multiplies a negative one (as transformers'
  RepetitionPenaltyLogitsProcessor and TensorRT-LLM's penalty kernel do), over prompt and generated tokens;
- temperature, then top-k, then top-p (the smallest set of most likely tokens whose probability reaches top_p);
- a request without a seed samples with seed 0 (DefaultDecodingParams::getSeed()), so it is reproducible too.

torch is imported inside the selection functions only: fusion imports this module for `validate` and, on the CPU
target, never loads torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from af3trt.runtime.stages.errors import InvalidRequest

if TYPE_CHECKING:  # pragma: no cover
    import torch

DEFAULT_SEED = 0  # TensorRT-LLM's DefaultDecodingParams::getSeed()


class SamplingError(InvalidRequest):
    """A sampling parameter outside its range; the message names the parameter, its range and the value."""


@dataclass(frozen=True)
class SamplingParams:
    """One request's sampling, in the decoder's (TensorRT-LLM's) terms; 0 switches top_k / top_p off."""

    top_k: int = 0
    top_p: float = 0.0
    temperature: float = 1.0
    repetition_penalty: float = 1.0
    seed: int = DEFAULT_SEED

    @property
    def greedy(self) -> bool:
        return is_greedy(self.top_k, self.top_p, self.temperature)


def is_greedy(top_k: int, top_p: float, temperature: float) -> bool:
    """TensorRT-LLM picks the arg-max when top_k is 1, or both top_k and top_p are off; temperature 0 also means it."""
    return top_k == 1 or (top_k == 0 and top_p == 0.0) or temperature == 0.0


def validate(*, temperature: float, top_k: int, top_p: float, repetition_penalty: float) -> None:
    """Raise SamplingError for the first value outside its range (NaN and infinities included)."""
    if not (temperature >= 0.0) or math.isinf(temperature):  # `not >=` also refuses NaN
        raise SamplingError(f"temperature must be a finite number >= 0, got {temperature}")
    if top_k < 0:
        raise SamplingError(f"top_k must be >= 0, got {top_k}")
    if not 0.0 <= top_p <= 1.0:  # also refuses NaN
        raise SamplingError(f"top_p must be in [0, 1], got {top_p}")
    if not (repetition_penalty > 0.0) or math.isinf(repetition_penalty):
        raise SamplingError(f"repetition_penalty must be a finite number > 0, got {repetition_penalty}")


def from_request(temperature=None, top_k=None, top_p=None, repetition_penalty=None, seed=None) -> SamplingParams:
    """A client's optional values (None: not sent) → validated SamplingParams with TensorRT-LLM's defaults
    (greedy, seed 0). Temperature 0 asks for greedy: top_k 1 (the temperature then plays no part: 1)."""
    temp = 1.0 if temperature is None else float(temperature)
    k = 0 if top_k is None else int(top_k)
    p = 0.0 if top_p is None else float(top_p)
    rp = 1.0 if repetition_penalty is None else float(repetition_penalty)
    validate(temperature=temp, top_k=k, top_p=p, repetition_penalty=rp)
    if temperature is not None and temp == 0.0:
        k, temp = 1, 1.0
    return SamplingParams(top_k=k, top_p=p, temperature=temp, repetition_penalty=rp,
                          seed=DEFAULT_SEED if seed is None else int(seed))


def generator(seed: int | None) -> "torch.Generator":
    """The request's own random generator (seed None: TensorRT-LLM's default seed)."""
    import torch

    return torch.Generator().manual_seed(DEFAULT_SEED if seed is None else int(seed))


def apply_repetition_penalty(logits: "torch.Tensor", seen: "torch.Tensor", penalty: float) -> "torch.Tensor":
    """logits [V] float, seen bool [V] (prompt and generated ids) → penalised copy: positive / penalty,
    negative * penalty, for seen tokens only."""
    import torch

    out = logits.clone()
    hit = out[seen]
    out[seen] = torch.where(hit > 0, hit / penalty, hit * penalty)
    return out


def logits_to_probs(logits: "torch.Tensor", temperature: float = 1.0, top_k: int = 0,
                    top_p: float = 0.0) -> "torch.Tensor":
    """logits [V] → probabilities [V] after temperature, top-k (k > 0) and top-p (0 < p < 1); tokens cut by
    top-k/top-p get probability 0."""
    import torch

    scaled = logits / temperature
    if not torch.isfinite(scaled[torch.isfinite(logits)]).all():
        # a temperature so small (1e-38, a denormal) that logits overflow to ±inf and softmax gives NaN (torch's
        # multinomial then failed the request: found by af3trt fuzz over gRPC): shifted by the maximum first, the
        # largest logits scale to 0 and the rest to -inf or far below, softmax's limit as the temperature goes to 0
        scaled = (logits - logits.max()) / temperature
    logits = scaled
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = torch.cumsum(probs, dim=-1) - probs >= top_p  # keep the smallest prefix reaching top_p
        logits = logits.index_fill(0, order[drop], -math.inf)
    return torch.softmax(logits, dim=-1)


def next_token(logits: "torch.Tensor", params: SamplingParams, *, seen: "torch.Tensor | None" = None,
               rng: "torch.Generator | None" = None) -> int:
    """One token id from logits [V] (any float dtype): repetition penalty over `seen` (bool [V]), then the arg-max
    when greedy, else a draw from logits_to_probs with `rng` (the request's generator)."""
    import torch

    logits = logits.float()
    if seen is not None and params.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return int(torch.argmax(logits))
    probs = logits_to_probs(logits, params.temperature, params.top_k, params.top_p)
    return int(torch.multinomial(probs, 1, generator=rng))


def next_tokens(logits: "torch.Tensor", params: list[SamplingParams], *, seen: list, rngs: list) -> list[int]:
    """One token id per row of logits [B, V]: the rows that pick the arg-max without a penalty share one batched
    argmax (one call for the whole batch instead of one per row, the common greedy case); the others go through
    next_token with their own `seen` and generator. Each row's id equals next_token's for that row."""
    import torch

    plain = [p.greedy and (seen[i] is None or p.repetition_penalty == 1.0) for i, p in enumerate(params)]
    out = torch.argmax(logits, dim=-1).tolist() if any(plain) else [0] * len(params)  # [B]
    for i, p in enumerate(params):
        if not plain[i]:
            out[i] = next_token(logits[i], p, seen=seen[i], rng=rngs[i])
    return out
