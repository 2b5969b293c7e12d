"""runtime/stages/sampling.py: the one validation fusion and the CPU decoder share, and next-token selection, checked
against transformers' logits processors on random logits."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TopKLogitsWarper,
                                                    TopPLogitsWarper)

from af3trt.runtime.stages import sampling
from af3trt.runtime.stages.sampling import SamplingError, SamplingParams

V = 1000
GOOD = dict(temperature=1.0, top_k=0, top_p=0.0, repetition_penalty=1.0)


def _logits(seed: int = 0) -> torch.Tensor:
    return torch.randn(V, generator=torch.Generator().manual_seed(seed)) * 3  # [V]


@pytest.mark.parametrize("name, value", [
    ("temperature", 0.0), ("temperature", 1e-6), ("temperature", 100.0),
    ("top_k", 0), ("top_k", 1), ("top_k", 10 ** 6),
    ("top_p", 0.0), ("top_p", 1.0), ("top_p", 1e-9),
    ("repetition_penalty", 1e-6), ("repetition_penalty", 1.0), ("repetition_penalty", 10.0),
])
def test_validation_accepts_the_edges(name, value):
    sampling.validate(**{**GOOD, name: value})


@pytest.mark.parametrize("name, value, message", [
    ("temperature", -1e-6, "temperature must be a finite number >= 0, got -1e-06"),
    ("temperature", math.nan, "temperature must be a finite number >= 0, got nan"),
    ("temperature", math.inf, "temperature must be a finite number >= 0, got inf"),
    ("top_k", -1, "top_k must be >= 0, got -1"),
    ("top_p", -1e-9, "top_p must be in [0, 1], got -1e-09"),
    ("top_p", 1.0000001, "top_p must be in [0, 1], got 1.0000001"),
    ("top_p", math.nan, "top_p must be in [0, 1], got nan"),
    ("repetition_penalty", 0.0, "repetition_penalty must be a finite number > 0, got 0.0"),
    ("repetition_penalty", -1.0, "repetition_penalty must be a finite number > 0, got -1.0"),
    ("repetition_penalty", math.inf, "repetition_penalty must be a finite number > 0, got inf"),
    ("repetition_penalty", math.nan, "repetition_penalty must be a finite number > 0, got nan"),
])
def test_validation_refuses_past_the_edges(name, value, message):
    with pytest.raises(SamplingError) as e:
        sampling.validate(**{**GOOD, name: value})
    assert str(e.value) == message
    assert isinstance(e.value, ValueError)  # the Triton adapters report ValueErrors as the client's fault


def test_from_request_defaults_are_trtllm_greedy():
    assert sampling.from_request() == SamplingParams(top_k=0, top_p=0.0, temperature=1.0, repetition_penalty=1.0,
                                                     seed=0)
    assert sampling.from_request().greedy
    zero = sampling.from_request(temperature=0.0, top_k=50, top_p=0.9)
    assert (zero.top_k, zero.temperature, zero.greedy) == (1, 1.0, True)  # temperature 0 → greedy
    hot = sampling.from_request(temperature=0.7, top_p=0.9, seed=5)
    assert (hot.top_k, hot.top_p, hot.temperature, hot.seed, hot.greedy) == (0, pytest.approx(0.9), 0.7, 5, False)
    with pytest.raises(SamplingError, match="top_k"):
        sampling.from_request(top_k=-3)


@pytest.mark.parametrize("seed", range(5))
def test_greedy_is_argmax(seed):
    logits = _logits(seed)
    assert sampling.next_token(logits, SamplingParams()) == int(torch.argmax(logits))
    # top_k = 1 is greedy whatever the temperature and seed
    assert sampling.next_token(logits, SamplingParams(top_k=1, temperature=5.0, seed=seed),
                               rng=sampling.generator(seed)) == int(torch.argmax(logits))
    # a tiny top_p keeps only the most likely token
    tiny = SamplingParams(top_p=1e-6, temperature=2.0)
    assert not tiny.greedy
    draws = {sampling.next_token(logits, tiny, rng=sampling.generator(s)) for s in range(20)}
    assert draws == {int(torch.argmax(logits))}


@pytest.mark.parametrize("penalty", [0.5, 1.3, 2.0])
def test_repetition_penalty_is_transformers(penalty):
    logits = _logits(1)
    ids = torch.tensor([3, 17, 17, 250, 999, 0])  # a repeated id counts once, as in transformers
    seen = torch.zeros(V, dtype=torch.bool)
    seen[ids] = True
    ours = sampling.apply_repetition_penalty(logits, seen, penalty)
    theirs = RepetitionPenaltyLogitsProcessor(penalty)(ids[None], logits[None].clone())[0]
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    lowered = seen & (logits != 0)
    if penalty > 1:  # a seen token's logit goes down, the others are untouched
        assert (ours[lowered] < logits[lowered]).all()
    assert torch.equal(ours[~seen], logits[~seen])
    # next_token applies it: the greedy pick avoids a repeated favourite
    top = int(torch.argmax(logits))
    only_top = torch.zeros(V, dtype=torch.bool)
    only_top[top] = True
    assert logits[top] > 0
    shifted = sampling.next_token(logits, SamplingParams(repetition_penalty=1e6), seen=only_top)
    assert shifted == int(torch.topk(logits, 2).indices[1])


@pytest.mark.parametrize("k", [1, 5, 40])
def test_top_k_keeps_what_transformers_keeps(k):
    logits = _logits(2)
    ours = sampling.logits_to_probs(logits, top_k=k) > 0
    theirs = torch.isfinite(TopKLogitsWarper(k)(None, logits[None].clone())[0])
    assert torch.equal(ours, theirs) and int(ours.sum()) == k


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_top_p_keeps_what_transformers_keeps(p):
    logits = _logits(3)
    ours = sampling.logits_to_probs(logits, top_p=p) > 0
    theirs = torch.isfinite(TopPLogitsWarper(p)(None, logits[None].clone())[0])
    assert torch.equal(ours, theirs) and 1 <= int(ours.sum()) < V
    probs = sampling.logits_to_probs(logits, top_p=p)
    assert probs.sum().item() == pytest.approx(1.0, abs=1e-5)


def test_temperature_sharpens_and_flattens():
    logits = _logits(4)
    cold, hot = sampling.logits_to_probs(logits, 0.5), sampling.logits_to_probs(logits, 2.0)
    assert cold.max() > sampling.logits_to_probs(logits).max() > hot.max()


@pytest.mark.parametrize("temperature", [1.401298464324817e-45, 1.1754943508222875e-38, 1e-30])
def test_a_tiny_temperature_samples_its_limit_not_nan(temperature):
    """A valid but tiny temperature (a denormal) overflowed logits / temperature to ±inf and softmax to NaN: the
    request failed INTERNAL in torch.multinomial (found by af3trt fuzz over gRPC). Now it samples softmax's limit, the
    arg-max, as greedy does; a usual temperature is computed as before."""
    logits = _logits(6)
    probs = sampling.logits_to_probs(logits, temperature, top_k=36, top_p=0.29)
    assert torch.isfinite(probs).all() and probs.sum().item() == pytest.approx(1.0)
    assert int(torch.argmax(probs)) == int(torch.argmax(logits)) and probs.max().item() == 1.0
    params = SamplingParams(top_k=36, top_p=0.0, temperature=temperature, seed=1)
    assert sampling.next_token(logits, params, rng=sampling.generator(1)) == int(torch.argmax(logits))
    assert torch.equal(sampling.logits_to_probs(logits, 0.7), torch.softmax(logits / 0.7, dim=-1))


def test_seeded_sampling_is_reproducible():
    logits = _logits(5)
    params = SamplingParams(top_k=50, top_p=0.95, temperature=1.5, seed=7)

    def draws(seed):
        rng = sampling.generator(seed)
        return [sampling.next_token(logits, params, rng=rng) for _ in range(32)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)
    assert len(set(draws(7))) > 1  # it does sample
    assert draws(None) == draws(0)  # no seed: TensorRT-LLM's default seed 0


def test_fusion_does_not_load_torch():
    """Fusion validates with this module; on the CPU target its process never needs torch."""
    code = "import sys, af3trt.runtime.stages.prompt; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "False"


def test_fusion_refuses_in_the_same_words():
    """Fusion's check_sampling goes through the same validation (its PromptError carries the message)."""
    from af3trt.runtime.stages.prompt import FusionLimits, PromptError, check_sampling

    limits = FusionLimits(vocab_size=10, hidden_size=4, dtype="float32", end_id=1, pad_id=0, max_input_len=8,
                          max_output_len=8, default_max_tokens=4)
    for kw, message in [(dict(top_p=2.0), "top_p must be in [0, 1], got 2.0"),
                        (dict(repetition_penalty=0.0), "repetition_penalty must be a finite number > 0, got 0.0")]:
        with pytest.raises(PromptError) as e:
            check_sampling(limits, **kw)
        assert str(e.value) == message
    assert check_sampling(limits, temperature=0.0, top_k=40).top_k == 1


def test_next_tokens_batched_equals_row_by_row():
    import torch

    from af3trt.runtime.stages.sampling import SamplingParams, generator, next_token, next_tokens

    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(3))
    seen = torch.zeros(50, dtype=torch.bool)
    seen[logits[2].argmax()] = True  # the penalised row's best token was seen: its answer moves
    params = [SamplingParams(), SamplingParams(top_k=1), SamplingParams(repetition_penalty=5.0),
              SamplingParams(top_k=5, seed=7), SamplingParams(temperature=0.0)]
    seens = [None, None, seen, None, None]
    want = [next_token(logits[i], p, seen=seens[i], rng=generator(p.seed) if not p.greedy else None)
            for i, p in enumerate(params)]
    got = next_tokens(logits, params, seen=seens, rngs=[generator(p.seed) if not p.greedy else None for p in params])
    assert got == want and got[2] != int(logits[2].argmax())
