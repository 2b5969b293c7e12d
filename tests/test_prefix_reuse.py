"""KV-cache reuse in the CPU decoder (runtime/engines/decoder.py): a prompt that starts with blocks an earlier prompt had
prefills only the rest, with the same tokens as without reuse; audio rows count as the same only with the same
prompt_table_extra_ids."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from af3trt.runtime.engines.decoder import PREFIX_BLOCK, DecodeError, DecoderEngine, GenerationRequest

N = 12


@pytest.fixture(scope="module")
def engines(lm_dir):
    with DecoderEngine(lm_dir, max_batch_size=4) as plain, \
            DecoderEngine(lm_dir, max_batch_size=4, prefix_cache_bytes=1 << 30) as reuse:
        yield plain, reuse


def _req(ids, **kw):
    return GenerationRequest(input_ids=np.asarray(ids, np.int32), max_new_tokens=N, **kw)


def test_a_prompt_seen_again_reuses_its_blocks_and_answers_the_same(engines):
    plain, reuse = engines
    rng = np.random.default_rng(0)
    first = rng.integers(0, plain.vocab_size, 2 * PREFIX_BLOCK + 20)
    turn2 = np.concatenate([first, rng.integers(0, plain.vocab_size, 50)])  # the first prompt, then more
    before = reuse.stats["reused_tokens"]
    assert reuse.generate(_req(first)) == plain.generate(_req(first))
    assert reuse.stats["reused_tokens"] == before  # nothing stored yet
    assert reuse.generate(_req(first)) == plain.generate(_req(first))  # a retry
    assert reuse.stats["reused_tokens"] == before + 2 * PREFIX_BLOCK
    assert reuse.generate(_req(turn2)) == plain.generate(_req(turn2))  # the next turn
    assert reuse.stats["reused_tokens"] == before + 4 * PREFIX_BLOCK
    other = first.copy()
    other[3] = (other[3] + 1) % plain.vocab_size  # differs in the first block: nothing to reuse
    assert reuse.generate(_req(other)) == plain.generate(_req(other))
    assert reuse.stats["reused_tokens"] == before + 4 * PREFIX_BLOCK


def test_audio_rows_are_reused_only_with_the_same_extra_ids(engines):
    plain, reuse = engines
    v, h = plain.vocab_size, plain.hidden_size
    rng = np.random.default_rng(1)
    text = rng.integers(0, v, 20)
    ids = np.concatenate([text, v + np.arange(2 * PREFIX_BLOCK), text])  # audio rows in the middle
    table_a, table_b = (torch.randn(2 * PREFIX_BLOCK, h, generator=torch.Generator().manual_seed(s)) for s in (1, 2))
    extra_a = np.where(ids >= v, 11, 0).astype(np.uint64)
    extra_b = np.where(ids >= v, 22, 0).astype(np.uint64)
    before = reuse.stats["reused_tokens"]
    a = reuse.generate(_req(ids, prompt_table=table_a, extra_ids=extra_a))
    assert a == plain.generate(_req(ids, prompt_table=table_a))
    b = reuse.generate(_req(ids, prompt_table=table_b, extra_ids=extra_b))  # other audio: no reuse
    assert b == plain.generate(_req(ids, prompt_table=table_b)) and reuse.stats["reused_tokens"] == before
    no_ids = reuse.generate(_req(ids, prompt_table=table_b))  # audio rows without extra ids: never reused
    assert no_ids == b and reuse.stats["reused_tokens"] == before
    assert reuse.generate(_req(ids, prompt_table=table_a, extra_ids=extra_a)) == a
    assert reuse.stats["reused_tokens"] == before + 2 * PREFIX_BLOCK
    with pytest.raises(DecodeError, match="one id per input token"):
        reuse.generate(_req(ids, prompt_table=table_a, extra_ids=extra_a[:-1]))


def test_the_audio_of_a_prompt_is_reused_under_other_text_and_by_longer_audio_that_starts_with_it(engines):
    """The blocks up to the end of a prompt's audio are kept on their own: another question about the same audio, and
    a prompt whose audio starts with the same windows (a live session's commit after its turn was sent ahead,
    runtime/openai/realtime_session.py), prefill only what follows them, answering as without reuse."""
    plain, reuse = engines
    v, h = plain.vocab_size, plain.hidden_size
    rng = np.random.default_rng(2)
    head, q1, q2 = rng.integers(0, v, 30), rng.integers(0, v, 40), rng.integers(0, v, 45)
    rows = 3 * PREFIX_BLOCK + 10  # one window's rows
    table = torch.randn(3 * rows, h, generator=torch.Generator().manual_seed(3))  # three windows

    def prompt(windows, question):  # the windows' fake ids, each window with its own extra id (prompt.table_extra_ids)
        ids = np.concatenate([head, v + np.arange(windows * rows), question])
        extra = np.zeros(len(ids), np.uint64)
        extra[len(head): len(head) + windows * rows] = np.repeat(np.arange(1, windows + 1, dtype=np.uint64), rows)
        return _req(ids, prompt_table=table[: windows * rows], extra_ids=extra)

    def same(r):
        want = plain.generate(_req(r.input_ids, prompt_table=r.prompt_table))
        return reuse.generate(r) == want

    before = reuse.stats["reused_tokens"]
    assert same(prompt(2, q1))
    audio_end = (len(head) + 2 * rows) // PREFIX_BLOCK * PREFIX_BLOCK  # the last block inside the audio
    assert same(prompt(2, q2)) and reuse.stats["reused_tokens"] == before + audio_end  # another question
    assert same(prompt(3, q1)) and reuse.stats["reused_tokens"] == before + 2 * audio_end  # longer audio
