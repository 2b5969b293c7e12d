"""The CPU decoder: greedy parity with transformers' AF3 generate, TensorRT-LLM's request semantics, batching."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from af3trt.export.extract_lm import extract_language_model
from af3trt.runtime.engines.decoder import DecodeError, DecoderEngine, GenerationRequest

N_NEW = 24


@pytest.fixture(scope="module")
def af3(ref):
    return ref.model, ref.processor  # transformers' AF3 and its processor, loaded once per session (conftest)


@pytest.fixture(scope="module")
def engine(lm_dir):
    with DecoderEngine(lm_dir, max_batch_size=4) as eng:
        yield eng


def _chat(af3, text, seconds=None):
    """Processor outputs for one user turn, with a fixed synthetic clip when `seconds` is given."""
    _, processor = af3
    content = [{"type": "text", "text": text}]
    if seconds:
        wav = (0.1 * np.random.default_rng(7).standard_normal(int(16000 * seconds))).astype(np.float32)
        content.insert(0, {"type": "audio", "audio": wav})
    return processor.apply_chat_template([{"role": "user", "content": content}], tokenize=True,
                                         add_generation_prompt=True, return_dict=True, return_tensors="pt")


def _reference(af3, inputs, end_id, n=N_NEW):
    """transformers' greedy answer, in TensorRT-LLM's convention: input and end token excluded."""
    model, _ = af3
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, do_sample=False, eos_token_id=end_id)
    tokens = out[0, inputs["input_ids"].shape[1]:].tolist()
    return tokens[:tokens.index(end_id)] if end_id in tokens else tokens


def _our_request(af3, inputs, **kw) -> GenerationRequest:
    """Same prompt for our decoder: <sound> positions become vocab_size + 0..N-1, the table the audio embeddings."""
    model, _ = af3
    ids = inputs["input_ids"][0].numpy().astype(np.int32)
    table = None
    audio = np.flatnonzero(ids == model.config.audio_token_id)
    if audio.size:
        with torch.no_grad():
            table = model.get_audio_features(inputs["input_features"], inputs["input_features_mask"]).pooler_output
        assert table.shape[0] == audio.size
        ids[audio] = model.config.text_config.vocab_size + np.arange(audio.size)
    kw.setdefault("max_new_tokens", N_NEW)
    return GenerationRequest(input_ids=ids, prompt_table=table, prompt_vocab_size=0 if table is None else
                             table.shape[0], **kw)


def _text_request(af3, text, **kw) -> GenerationRequest:
    return _our_request(af3, _chat(af3, text), **kw)


def _collect(engine, requests):
    """Submit all requests at once; return (tokens per request, emit calls per request, errors per request).

    The worker is held at the first request's admission until all are queued (its cancellation poll runs on the
    worker thread before the prefill), so they start together however fast the worker runs beside this thread."""
    n = len(requests)
    tokens, calls, errors = [[] for _ in range(n)], [[] for _ in range(n)], [None] * n
    pending, queued = threading.Semaphore(0), threading.Event()

    def hold_until_queued() -> bool:
        assert queued.wait(60)
        return False  # never cancelled

    def callbacks(i):
        def emit(new, final):
            calls[i].append((list(new), final))
            tokens[i].extend(new)
            if final:
                pending.release()

        def on_error(exc):
            errors[i] = exc
            pending.release()
        return emit, on_error

    for i, r in enumerate(requests):
        engine.submit(r, *callbacks(i), cancelled=hold_until_queued if i == 0 else None)
    queued.set()
    for _ in range(n):
        assert pending.acquire(timeout=60)
    return tokens, calls, errors


def test_engine_reads_the_model_config(engine, af3):
    model, _ = af3
    assert engine.vocab_size == model.config.text_config.vocab_size
    assert engine.hidden_size == model.config.text_config.hidden_size
    assert engine.dtype == torch.float32
    assert engine.eos_ids == (642, 640)


def test_greedy_parity_audio(engine, af3):
    inputs = _chat(af3, "Describe the sound.", seconds=3)
    end_id = engine.eos_ids[0]
    ours = engine.generate(_our_request(af3, inputs, end_id=end_id))
    assert ours == _reference(af3, inputs, end_id)
    assert len(ours) == N_NEW  # the damped special tokens keep the tiny model talking


def test_greedy_parity_text_only(engine, af3):
    inputs = _chat(af3, "What is the weather tomorrow?")
    end_id = engine.eos_ids[0]
    assert engine.generate(_our_request(af3, inputs, end_id=end_id)) == _reference(af3, inputs, end_id)


def test_continuous_batching_equals_alone(engine, af3):
    requests = [
        _our_request(af3, _chat(af3, "Describe the sound.", seconds=3), max_new_tokens=20),
        _text_request(af3, "Hi", max_new_tokens=7),
        _text_request(af3, "Please summarize the conversation, list the instruments.", max_new_tokens=30),
        _our_request(af3, _chat(af3, "Transcribe.", seconds=1.5), max_new_tokens=12),
    ]
    alone = [engine.generate(r) for r in requests]
    steps, rows = engine.stats["decode_steps"], engine.stats["decode_rows"]
    together, _, errors = _collect(engine, requests)
    assert errors == [None] * 4
    assert together == alone
    assert [len(t) for t in together] == [20, 7, 30, 12]
    steps, rows = engine.stats["decode_steps"] - steps, engine.stats["decode_rows"] - rows
    assert rows > 2 * steps  # they really shared decode steps (alone: one row per step)


def test_join_mid_flight(engine, af3):
    """A request that arrives while others are decoding joins the running batch and changes nobody's answer."""
    first = _text_request(af3, "The quick brown fox", max_new_tokens=16, streaming=True)
    late = _our_request(af3, _chat(af3, "Describe the sound.", seconds=2), max_new_tokens=10)
    expected_first, expected_late = engine.generate(first), engine.generate(late)
    late_tokens, done = [], threading.Event()
    first_tokens, first_done = [], threading.Event()

    def emit_first(new, final):
        first_tokens.extend(new)
        if len(first_tokens) == 4:  # from the worker thread, mid-generation
            engine.submit(late, lambda new, final: (late_tokens.extend(new), final and done.set()))
        if final:
            first_done.set()

    engine.submit(first, emit_first)
    assert first_done.wait(60) and done.wait(60)
    assert first_tokens == expected_first and late_tokens == expected_late


def test_bfloat16_engine(af3, tiny_ckpt, tmp_path):
    """A bf16 checkpoint gives a bf16 engine that wants a bf16 table, and still matches transformers greedily."""
    import copy

    model, processor = af3
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    src = tmp_path / "af3-bf16"
    bf16.save_pretrained(src)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (src / name).write_bytes((tiny_ckpt / name).read_bytes())
    assert extract_language_model(src, tmp_path / "lm-bf16")["dtype"] == "bfloat16"
    inputs = _chat(af3, "Describe the sound.", seconds=2)
    inputs["input_features"] = inputs["input_features"].to(torch.bfloat16)
    end_id = 642
    expected = _reference((bf16, processor), inputs, end_id, n=12)
    request = _our_request((bf16, processor), inputs, end_id=end_id, max_new_tokens=12)
    assert request.prompt_table.dtype == torch.bfloat16
    with DecoderEngine(tmp_path / "lm-bf16", max_batch_size=2) as eng:
        assert eng.dtype == torch.bfloat16
        assert eng.generate(request) == expected
        with pytest.raises(DecodeError, match="dtype"):
            eng.submit(GenerationRequest(input_ids=request.input_ids, prompt_table=request.prompt_table.float(),
                                         prompt_vocab_size=request.prompt_vocab_size, max_new_tokens=2),
                       lambda new, final: None)


def test_streaming_one_token_per_call(engine, af3):
    plain = engine.generate(_text_request(af3, "Numbers and times matter"))
    _, calls, errors = _collect(engine, [_text_request(af3, "Numbers and times matter", streaming=True)])
    assert errors == [None]
    calls = calls[0]
    assert all(len(new) == 1 for new, _ in calls)
    assert [final for _, final in calls] == [False] * (len(calls) - 1) + [True]
    assert [t for new, _ in calls for t in new] == plain


def test_end_id_excluded_like_trtllm(engine, af3):
    """TensorRT-LLM stops on end_id without counting it: output_ids (and sequence_length) stop before it."""
    free = engine.generate(_text_request(af3, "Tell me the mood of the song", max_new_tokens=N_NEW))
    k = next(i for i in range(3, N_NEW) if free[i] not in free[:i])  # first occurrence, a few steps in
    end_id = free[k]
    assert engine.generate(_text_request(af3, "Tell me the mood of the song", end_id=end_id)) == free[:k]
    # streaming: k one-token responses, then a last, empty, final one (the end token is never sent)
    _, calls, _ = _collect(engine, [_text_request(af3, "Tell me the mood of the song", end_id=end_id,
                                                  streaming=True)])
    assert calls[0] == [([t], False) for t in free[:k]] + [([], True)]


def test_seeded_sampling(engine, af3):
    def sample(seed, **kw):
        return _text_request(af3, "Describe the music in detail.", top_k=50, top_p=0.95, temperature=1.5,
                             repetition_penalty=1.2, seed=seed, **kw)

    a, b, c = (engine.generate(sample(s)) for s in (1, 1, 2))
    assert a == b
    assert a != c
    greedy = engine.generate(_text_request(af3, "Describe the music in detail."))
    assert a != greedy
    # per-request generators: the same seeds give the same tokens inside a batch
    together, _, _ = _collect(engine, [sample(1), sample(2), sample(1)])
    assert together == [a, c, a]


def test_top_k_one_is_greedy(engine, af3):
    greedy = engine.generate(_text_request(af3, "A train arrives"))
    assert engine.generate(_text_request(af3, "A train arrives", top_k=1, temperature=0.7, seed=3)) == greedy


def _bad_requests(engine, good: GenerationRequest):
    ids, v, h = good.input_ids, engine.vocab_size, engine.hidden_size
    table = torch.zeros(4, h)

    def r(**kw):
        base = dict(input_ids=ids, max_new_tokens=4)
        base.update(kw)
        return GenerationRequest(**base)

    fake = np.concatenate([ids, [v, v + 1, v + 2, v + 3]]).astype(np.int32)
    return {
        "empty input": r(input_ids=np.zeros(0, np.int32)),
        "2-D input": r(input_ids=ids[None]),
        "float input": r(input_ids=ids.astype(np.float32)),
        "negative id": r(input_ids=np.array([1, -2, 3], np.int32)),
        "fake id without table": r(input_ids=fake),
        "fake id past the table": r(input_ids=np.append(fake, v + 4).astype(np.int32), prompt_table=table,
                                    prompt_vocab_size=4),
        "prompt_vocab_size without table": r(prompt_vocab_size=4),
        "prompt_vocab_size over table rows": r(input_ids=fake, prompt_table=table, prompt_vocab_size=5),
        "table dtype": r(input_ids=fake, prompt_table=table.to(torch.bfloat16), prompt_vocab_size=4),
        "table hidden": r(input_ids=fake, prompt_table=torch.zeros(4, h + 1), prompt_vocab_size=4),
        "table 3-D": r(input_ids=fake, prompt_table=table[None], prompt_vocab_size=4),
        "input too long": r(input_ids=np.ones(engine.max_input_len + 1, np.int32)),
        "max_new_tokens 0": r(max_new_tokens=0),
        "max_new_tokens over limit": r(max_new_tokens=engine.max_new_tokens_limit + 1),
        "end_id out of vocab": r(end_id=v),
        "negative temperature": r(temperature=-0.5),
        "NaN temperature": r(temperature=float("nan")),
        "top_p above 1": r(top_p=1.5),
        "negative top_p": r(top_p=-0.1),
        "NaN top_p": r(top_p=float("nan")),
        "negative top_k": r(top_k=-1),
        "zero repetition_penalty": r(repetition_penalty=0.0),
        "negative repetition_penalty": r(repetition_penalty=-1.0),
    }


def test_decode_errors(engine, af3):
    good = _text_request(af3, "Hi")
    cases = _bad_requests(engine, good)
    for name, request in cases.items():
        with pytest.raises(DecodeError):
            engine.submit(request, lambda new, final: None)
            pytest.fail(f"accepted: {name}")
    # the valid edge of each range is accepted
    assert len(engine.generate(GenerationRequest(input_ids=good.input_ids, max_new_tokens=1, temperature=0.0,
                                                 top_p=1.0))) == 1


def test_prompt_table_rows_are_used(engine, af3):
    """Fake ids take table rows: the same prompt with a different table row answers differently."""
    inputs = _chat(af3, "Describe the sound.", seconds=1)
    r = _our_request(af3, inputs)
    flipped = GenerationRequest(input_ids=r.input_ids, prompt_table=r.prompt_table.flip(0).contiguous(),
                                prompt_vocab_size=r.prompt_vocab_size, max_new_tokens=N_NEW)
    assert engine.generate(r) != engine.generate(flipped)


def test_failing_request_does_not_disturb_the_batch(engine, af3):
    requests = [_text_request(af3, "Hello world", max_new_tokens=12),
                _text_request(af3, "This one breaks", max_new_tokens=12, streaming=True),
                _text_request(af3, "The spoken content of the audio", max_new_tokens=15)]
    alone = [engine.generate(requests[0]), engine.generate(requests[2])]
    results, errors, done = {}, {}, threading.Semaphore(0)

    def emit_for(i):
        def emit(new, final):
            if i == 1 and len(results.setdefault(i, [])) == 3:
                raise RuntimeError("client went away")
            results.setdefault(i, []).extend(new)
            if final:
                done.release()
        return emit

    def on_error_for(i):
        def on_error(exc):
            errors[i] = exc
            done.release()
        return on_error

    for i, r in enumerate(requests):
        engine.submit(r, emit_for(i), on_error_for(i))
    for _ in range(3):
        assert done.acquire(timeout=60)
    assert set(errors) == {1} and "client went away" in str(errors[1])
    assert results[0] == alone[0] and results[2] == alone[1]
    assert engine.generate(requests[0]) == alone[0]  # and the engine keeps serving


def test_max_batch_size_caps_the_batch(lm_dir, af3):
    with DecoderEngine(lm_dir, max_batch_size=2) as small:
        requests = [_text_request(af3, f"Request number {i}", max_new_tokens=5 + i) for i in range(5)]
        tokens, _, errors = _collect(small, requests)
        assert errors == [None] * 5
        assert [len(t) for t in tokens] == [5, 6, 7, 8, 9]
        assert small.stats["max_batch"] == 2


def test_stop_fails_queued_and_running_requests(lm_dir, af3):
    eng = DecoderEngine(lm_dir, max_batch_size=1)
    first, second = [], []
    queued = threading.Event()

    def stop_on_first_token(new, final):
        # on the worker thread, with the first request running: wait until the second is queued (else a fast worker
        # stops before the test submits it, and that submit is refused), then stop without waiting
        assert queued.wait(60)
        eng.stop()

    eng.submit(_text_request(af3, "first", max_new_tokens=8, streaming=True), stop_on_first_token, first.append)
    eng.submit(_text_request(af3, "second", max_new_tokens=3), lambda new, final: None, second.append)
    queued.set()
    eng.stop()
    assert isinstance(first[0], DecodeError) and isinstance(second[0], DecodeError)
    with pytest.raises(DecodeError, match="stopped"):
        eng.submit(_text_request(af3, "late", max_new_tokens=3), lambda new, final: None)


def test_cancelled_request_leaves_the_batch(engine, af3, monkeypatch):
    """A request whose client went away (Triton's is_cancelled) stops generating and gets RequestCancelled; a
    request decoding beside it is untouched."""
    from af3trt.runtime.engines import decoder
    from af3trt.runtime.engines.decoder import RequestCancelled

    # `cancelled` is polled before every decode step instead of at most every 50 ms, so the request ends at the step
    # after its second token however fast the machine decodes (a fast CPU finished all 40 tokens within 50 ms)
    monkeypatch.setattr(decoder, "CANCEL_CHECK_S", 0.0)

    keep = _text_request(af3, "Hello world", max_new_tokens=12)
    alone = engine.generate(keep)
    tokens, errors, done = [], {}, threading.Semaphore(0)
    gone = threading.Event()

    def emit_cancelled(new, final):
        tokens.extend(new)
        if len(tokens) == 2:
            gone.set()  # the client disconnects after two tokens
        if final:
            done.release()

    def on_error(exc):
        errors["c"] = exc
        done.release()

    cancelled = _text_request(af3, "This one is abandoned", max_new_tokens=40, streaming=True, end_id=None)
    cancelled.cancelled = gone.is_set
    results = {}

    def emit_keep(new, final):
        results.setdefault("k", []).extend(new)
        if final:
            done.release()

    engine.submit(cancelled, emit_cancelled, on_error)
    engine.submit(keep, emit_keep, lambda e: errors.setdefault("k", e))
    for _ in range(2):
        assert done.acquire(timeout=60)
    assert isinstance(errors.get("c"), RequestCancelled) and "k" not in errors
    assert len(tokens) == 2
    assert results["k"] == alone


def test_min_tokens_masks_the_end_id_and_no_end_id_runs_to_max(engine, af3):
    """TensorRT-LLM's minTokens: the end id cannot be chosen before min_tokens tokens; end_id None (the backend's
    -1, what fusion sends for ignore_eos) never ends a request: exactly max_new_tokens tokens."""
    prompt = "Tell me the mood of the song"
    free = engine.generate(_text_request(af3, prompt, max_new_tokens=N_NEW))
    assert len(free) == N_NEW
    k = next(i for i in range(3, N_NEW - 4) if free[i] not in free[:i])
    end_id = free[k]
    assert engine.generate(_text_request(af3, prompt, end_id=end_id)) == free[:k]  # ends at k without min_tokens
    longer = engine.generate(_text_request(af3, prompt, end_id=end_id, min_tokens=k + 2))
    assert longer[:k] == free[:k] and len(longer) >= k + 2 and end_id not in longer[:k + 2]
    assert engine.generate(_text_request(af3, prompt, end_id=None, max_new_tokens=N_NEW)) == free
    with pytest.raises(DecodeError, match="min_tokens"):
        engine.submit(_text_request(af3, prompt, min_tokens=N_NEW + 1), lambda *a: None)
