"""Streamed tokens coalesced into fewer responses (runtime/stages/coalesce.py): first token alone and at once, the same
tokens in the same order, the decoder's final response kept as postprocess recognises it."""

from __future__ import annotations

from af3trt.runtime.stages.coalesce import Coalescer


def _run(interval, calls):
    """calls: (time, tokens, final) as the decoder emits → the responses sent, as (tokens, final)."""
    now = [0.0]
    sent = []
    c = Coalescer(interval, lambda tokens, final: sent.append((list(tokens), final)), clock=lambda: now[0])
    for t, tokens, final in calls:
        now[0] = t
        c(tokens, final)
    return sent


def test_fast_tokens_share_responses_and_join_to_the_same_answer():
    calls = [(0.001 * k, [k], False) for k in range(1, 10)] + [(0.010, [], True)]  # 1 per ms, then the end id
    sent = _run(0.004, calls)
    assert sent[0] == ([1], False)  # the first token alone, at once
    assert [t for tokens, _ in sent for t in tokens] == list(range(1, 10))  # same tokens, same order
    assert sent[-1] == ([], True)  # the end id's empty final response stays empty and alone
    assert len(sent) < 10 and all(not final for _, final in sent[:-1])


def test_the_final_token_goes_alone_after_the_held_ones():
    """A request that reaches max_tokens (or a stop word) ends with that token: postprocess counts it (or trims the
    stop word to an empty final response), so it is not merged with held tokens."""
    sent = _run(0.1, [(0.0, [5], False), (0.001, [6], False), (0.002, [7], True)])
    assert sent == [([5], False), ([6], False), ([7], True)]


def test_slow_tokens_and_interval_zero_are_one_response_each():
    calls = [(0.05 * k, [k], False) for k in range(4)] + [(0.2, [9], True)]
    assert _run(0.02, calls) == [([k], False) for k in range(4)] + [([9], True)]
    fast = [(0.0001 * k, [k], False) for k in range(4)] + [(0.001, [9], True)]
    assert _run(0.0, fast) == [([k], False) for k in range(4)] + [([9], True)]
