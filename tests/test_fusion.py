"""Fusion: our prompt (chat template + tokenizers + fake ids + prompt table) against transformers' AF3 processor
and model, and the fusion model adapter's tensor contract (with a fake Triton utils module)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from af3trt.runtime.stages import contract, lengths
from af3trt.runtime.stages.prompt import FusionLimits, PromptBuilder, PromptError, check_sampling
from af3trt.triton_repo import configs

from fakes import pb_utils as fake_pb


@pytest.fixture(scope="module")
def hf(ref):
    return ref.processor, ref.model  # transformers' AF3 processor and model, loaded once per session (conftest)


@pytest.fixture(scope="module")
def limits(hf):
    _, model = hf
    t = model.config.text_config
    return FusionLimits(vocab_size=t.vocab_size, hidden_size=t.hidden_size, dtype="float32", end_id=t.eos_token_id,
                        pad_id=t.bos_token_id, max_input_len=2000, max_output_len=64, default_max_tokens=16)


def reference(hf, prompt, wave, system=None):
    processor, model = hf
    content = ([{"type": "audio", "audio": wave}] if wave is not None else []) + [{"type": "text", "text": prompt}]
    conv = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
    inputs = processor.apply_chat_template(conv, tokenize=True, return_dict=True, add_generation_prompt=True)
    with torch.no_grad():
        if wave is None:
            return inputs, None, None
        tower = model.model.audio_tower(inputs["input_features"], input_features_mask=inputs["input_features_mask"])
        full = model.model.multi_modal_projector(tower.last_hidden_state)  # [W, 750, H]
        valid = model.get_audio_features(inputs["input_features"], inputs["input_features_mask"]).pooler_output
    return inputs, full.numpy(), valid.numpy()


@pytest.mark.parametrize("seconds,system", [(5.0, None), (70.0, "Answer briefly."), (0.5, None), (None, None),
                                            (None, "You are terse.")])
def test_prompt_matches_processor(hf, limits, tiny_ckpt, seconds, system):
    rng = np.random.default_rng(3)
    wave = None if seconds is None else (0.1 * rng.standard_normal(int(16000 * seconds))).astype(np.float32)
    inputs, full, valid = reference(hf, "What is in the audio?", wave, system)
    builder = PromptBuilder(tiny_ckpt, limits)
    windows = [] if wave is None else [inputs["input_features"].shape[0]]
    embeds = full if full is not None else np.zeros((1, lengths.EMBEDS_PER_WINDOW, limits.hidden_size), np.float32)
    mask = inputs.get("input_features_mask", torch.zeros(1, lengths.WINDOW_FRAMES)).numpy()
    ids, table = builder.build("What is in the audio?", system, embeds, mask, windows)

    want = inputs["input_ids"][0].numpy()
    audio_id = hf[1].config.audio_token_id
    fake = ids >= limits.vocab_size
    assert fake.sum() == (want == audio_id).sum()
    assert np.array_equal(ids[~fake], want[want != audio_id])  # the text ids, in place
    assert np.array_equal(np.flatnonzero(fake), np.flatnonzero(want == audio_id))
    assert np.array_equal(ids[fake], limits.vocab_size + np.arange(fake.sum()))  # rows 0..N-1 in order
    if valid is not None:
        np.testing.assert_array_equal(table, valid)  # exactly AF3's masked_scatter source


def test_two_clips_get_consecutive_rows(limits, tiny_ckpt):
    builder = PromptBuilder(tiny_ckpt, limits)
    embeds = np.random.default_rng(0).standard_normal((3, lengths.EMBEDS_PER_WINDOW, limits.hidden_size)).astype(np.float32)
    mask = np.zeros((3, lengths.WINDOW_FRAMES), np.int32)
    mask[0, :] = 1
    mask[1, :1000] = 1  # clip 0: 1.5 windows
    mask[2, :400] = 1  # clip 1: one short window
    ids, table = builder.build("Compare them.", None, embeds, mask, [2, 1])
    n0 = lengths.EMBEDS_PER_WINDOW + lengths.audio_token_count(1000)
    n1 = lengths.audio_token_count(400)
    assert len(table) == n0 + n1
    np.testing.assert_array_equal(table[n0:], embeds[2, :n1])
    fake = ids[ids >= limits.vocab_size] - limits.vocab_size
    assert fake.tolist() == list(range(n0 + n1))
    assert builder.tokenizer.decode(ids[ids < limits.vocab_size].tolist(), skip_special_tokens=False).count(
        "<|im_start|>user\nCompare them.") == 1


def test_prompt_errors(limits, tiny_ckpt):
    builder = PromptBuilder(tiny_ckpt, limits)
    empty = np.zeros((0, lengths.EMBEDS_PER_WINDOW, limits.hidden_size), np.float32)
    no_mask = np.zeros((0, lengths.WINDOW_FRAMES), np.int32)
    with pytest.raises(PromptError, match="may not contain <sound>"):
        builder.build("hi <sound>", None, empty, no_mask, [])
    with pytest.raises(PromptError, match="prompt too long"):
        builder.build("word " * 5000, None, empty, no_mask, [])


def test_sampling_defaults_and_errors(limits):
    s = check_sampling(limits)
    assert (s.max_tokens, s.top_k, s.top_p, s.temperature, s.repetition_penalty, s.seed, s.stream) == \
        (limits.default_max_tokens, 0, 0.0, 1.0, 1.0, 0, False)  # TensorRT-LLM's greedy defaults
    assert check_sampling(limits, temperature=0.0).top_k == 1
    assert check_sampling(limits, temperature=0.7, top_p=0.9, seed=5).seed == 5
    for kw, needle in [(dict(max_tokens=0), "max_tokens"), (dict(max_tokens=65), "max_tokens"),
                       (dict(temperature=-1), "temperature"), (dict(temperature=float("nan")), "temperature"),
                       (dict(top_k=-2), "top_k"), (dict(top_p=1.5), "top_p"), (dict(repetition_penalty=0), "repetition")]:
        with pytest.raises(PromptError, match=needle):
            check_sampling(limits, **kw)


def _spec(hf, dtype, tiny_ckpt):
    t = hf[1].config.text_config
    return configs.RepoSpec(target="cpu", hidden_size=t.hidden_size, decoder_dtype=dtype, vocab_size=t.vocab_size,
                            end_id=t.eos_token_id, pad_id=t.bos_token_id, max_input_len=2000, max_output_len=64,
                            default_max_tokens=16, fusion_params={"tokenizer_dir": str(tiny_ckpt)})


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fusion_adapter_emits_the_tensorrtllm_inputs(hf, tiny_ckpt, dtype, speech_bytes):
    from af3trt.runtime.stages.audio import prepare_clips

    spec = _spec(hf, dtype, tiny_ckpt)
    cfg = configs.fusion_config(spec)
    model = fake_pb.load_model("fusion", cfg)
    batch = prepare_clips([speech_bytes])
    embeds = np.random.default_rng(1).standard_normal((1, 750, spec.hidden_size)).astype(np.float32)
    req = fake_pb.Request({"text_input": np.array([b"What is said?"], object), "audio_embeds": embeds,
                           "input_features_mask": batch.mask, "audio_windows": np.array([1], np.int32),
                           "max_tokens": np.array([8], np.int32), "temperature": np.array([0.0], np.float32)})
    (resp,) = model.execute([req])
    assert not resp.has_error(), resp.error
    declared = {o.name: o for o in cfg.output}
    assert set(resp.outputs) == set(declared) - set(contract.FUSION_PER_REQUEST)  # no thinking, no guide here
    n = batch.tokens_per_clip[0]
    table = resp.outputs["prompt_embedding_table"]._array
    assert tuple(table.shape) == (1, n, spec.hidden_size)
    assert str(table.dtype).endswith(dtype)
    ids = resp.outputs["input_ids"].as_numpy()
    assert ids.shape[0] == 1 and resp.outputs["input_lengths"].as_numpy().tolist() == [[ids.shape[1]]]
    assert (ids >= spec.vocab_size).sum() == n
    assert resp.outputs["runtime_top_k"].as_numpy().tolist() == [[1]]  # temperature 0 → greedy
    assert resp.outputs["request_output_len"].as_numpy().tolist() == [[8]]
    assert resp.outputs["seed"].as_numpy().dtype == np.uint64
    for name, t in resp.outputs.items():
        if name != "prompt_embedding_table":
            want = fake_pb_dtype(declared[name].data_type)
            assert t.as_numpy().dtype == want, name


def fake_pb_dtype(triton_type):
    from tritonclient.grpc import model_config_pb2 as mc

    return {mc.TYPE_INT32: np.int32, mc.TYPE_FP32: np.float32, mc.TYPE_BOOL: np.bool_, mc.TYPE_UINT64: np.uint64,
            mc.TYPE_STRING: np.object_}[triton_type]


def test_fusion_adapter_errors_are_per_request(hf, tiny_ckpt):
    model = fake_pb.load_model("fusion", configs.fusion_config(_spec(hf, "float32", tiny_ckpt)))
    placeholder = dict(audio_embeds=np.zeros((1, 750, 64), np.float32), input_features_mask=np.zeros((1, 3000), np.int32),
                       audio_windows=np.zeros((0,), np.int32))
    good = fake_pb.Request({"text_input": np.array([b"Hello"], object), **placeholder})
    bad = fake_pb.Request({"text_input": np.array([b"Hello"], object), "top_p": np.array([3.0], np.float32),
                           **placeholder})
    not_utf8 = fake_pb.Request({"text_input": np.array([b"\xff\xfe"], object), **placeholder})
    r_good, r_bad, r_utf = model.execute([good, bad, not_utf8])
    assert not r_good.has_error()
    assert r_good.outputs["prompt_vocab_size"].as_numpy().tolist() == [[1]]  # text-only: one unused row
    assert "top_p" in r_bad.error.message()
    assert "UTF-8" in r_utf.error.message()


def test_fusion_cpu_path_reads_inputs_that_arrive_on_the_gpu(hf, tiny_ckpt, speech_bytes):
    """On the GPU target fusion takes inputs where Triton holds them (FORCE_CPU_ONLY_INPUT_TENSORS "no"), so its CPU
    path (the fallback when its process has no CUDA) can be handed the encoder's audio_embeds in GPU memory, where
    as_numpy() raises (python_backend r26.04 src/pb_tensor.cc); it reads them through DLPack instead."""
    from af3trt.runtime.stages.audio import prepare_clips

    spec = _spec(hf, "float32", tiny_ckpt)
    model = fake_pb.load_model("fusion", configs.fusion_config(spec))
    batch = prepare_clips([speech_bytes])
    embeds = np.random.default_rng(1).standard_normal((1, 750, spec.hidden_size)).astype(np.float32)
    inputs = {"text_input": np.array([b"What is said?"], object), "audio_embeds": embeds,
              "input_features_mask": batch.mask, "audio_windows": np.array([1], np.int32)}
    on_host = fake_pb.Request(inputs)
    on_gpu = fake_pb.Request(inputs)
    for name in ("audio_embeds", "input_features_mask", "audio_windows"):
        on_gpu.inputs[name] = fake_pb.GpuTensor(name, inputs[name])
    want, got = model.execute([on_host, on_gpu])
    assert not got.has_error(), got.error.message()
    for name in ("input_ids", "prompt_vocab_size"):
        assert np.array_equal(got.outputs[name].as_numpy(), want.outputs[name].as_numpy())
    assert np.array_equal(np.asarray(got.outputs["prompt_embedding_table"]._array),
                          np.asarray(want.outputs["prompt_embedding_table"]._array))


def test_fusion_adapter_ignore_eos_and_min_tokens(hf, tiny_ckpt):
    """ignore_eos: end_id -1 (the tensorrtllm backend's "no end id") and no stop_words_list; min_tokens passes through
    as the backend's min_tokens input; a min_tokens above max_tokens is that request's error."""
    import dataclasses

    spec = dataclasses.replace(_spec(hf, "float32", tiny_ckpt), stop_ids=(3,))
    model = fake_pb.load_model("fusion", configs.fusion_config(spec))
    placeholder = dict(audio_embeds=np.zeros((1, 750, spec.hidden_size), np.float32),
                       input_features_mask=np.zeros((1, 3000), np.int32), audio_windows=np.zeros((0,), np.int32))

    def ask(**values):
        inputs = {"text_input": np.array([b"Hello"], object), "max_tokens": np.array([8], np.int32), **placeholder}
        inputs.update({k: np.array([v], np.bool_ if isinstance(v, bool) else np.int32) for k, v in values.items()})
        (resp,) = model.execute([fake_pb.Request(inputs)])
        return resp

    plain = ask()
    assert plain.outputs["end_id"].as_numpy().tolist() == [[spec.end_id]] and "stop_words_list" in plain.outputs
    assert plain.outputs["min_tokens"].as_numpy().tolist() == [[0]]
    ignoring = ask(ignore_eos=True, min_tokens=5)
    assert not ignoring.has_error(), ignoring.error
    assert ignoring.outputs["end_id"].as_numpy().tolist() == [[-1]] and "stop_words_list" not in ignoring.outputs
    assert ignoring.outputs["min_tokens"].as_numpy().tolist() == [[5]]
    bad = ask(min_tokens=9)
    assert bad.has_error() and "min_tokens" in str(bad.error)


def _uncached_ids(builder, conv, rows, windows):
    """build_ids as it was before the text cache: render, tokenize, expand each <sound> token by token."""
    ids = builder.tokenizer.encode(builder.render_conversation(conv), add_special_tokens=False).ids
    per_clip, w = [], 0
    for n in windows:
        per_clip.append(sum(rows[w:w + n]))
        w += n
    first = np.concatenate([[0], np.cumsum(per_clip)]).astype(int)
    runs = builder._placeholder_runs(conv, ids.count(builder.audio_token_id))
    out, k = [], 0
    for t in ids:
        if t == builder.audio_token_id:
            for clip in runs[k]:
                out.extend(range(builder.limits.vocab_size + first[clip],
                                 builder.limits.vocab_size + first[clip] + per_clip[clip]))
            k += 1
        else:
            out.append(t)
    return np.asarray(out, np.int32)


def test_cached_text_ids_equal_the_uncached_path(tiny_ckpt):
    """Many prompts and conversations, each built twice (a miss, then a hit of the text cache), with audio of
    different lengths between the two: every id equals rendering and tokenizing anew; the cache is bounded."""
    import json as _json

    from af3trt.runtime.stages import conversation

    cfg = _json.loads((tiny_ckpt / "config.json").read_text())["text_config"]
    limits = FusionLimits(vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], dtype="float32",
                          end_id=cfg["eos_token_id"], pad_id=cfg["bos_token_id"], max_input_len=8000,
                          max_output_len=64, default_max_tokens=16)
    builder = PromptBuilder(tiny_ckpt, limits)
    builder.TEXT_CACHE_ENTRIES = 8
    rng = np.random.default_rng(5)
    words = ["What", "is", "said", "in", "the", "audio", "?", "Transcribe", "ça", "音声", "\n", "  ", "😀", "it."]
    convs = []
    for i in range(40):
        prompt = " ".join(rng.choice(words, size=int(rng.integers(1, 12))))
        n_clips = int(rng.integers(0, 3))
        system = None if i % 3 else f"You are assistant {i}."
        convs.append(conversation.shorthand(prompt, system, n_clips))
    convs.append(conversation.parse(_json.dumps([
        {"role": "user", "content": [{"type": "audio", "audio_index": 0}, {"type": "text", "text": "First?"}]},
        {"role": "assistant", "content": "A dog."},
        {"role": "user", "content": [{"type": "text", "text": "And"}, {"type": "audio", "audio_index": 1},
                                     {"type": "text", "text": " this one?"}]}]), 2))
    convs.append(conversation.with_think_suffix(convs[-1]))
    convs += convs[:5]  # seen again after others: hits where the LRU kept them, misses where it evicted them
    for conv in convs:
        n = len(conv.audio_order())
        windows = [int(rng.integers(1, 3)) for _ in range(n)]
        for _ in range(2):
            rows = [int(rng.integers(1, lengths.EMBEDS_PER_WINDOW + 1)) for _ in range(sum(windows))]
            got = builder.build_ids(conv, rows, windows)
            assert got.dtype == np.int32
            np.testing.assert_array_equal(got, _uncached_ids(builder, conv, rows, windows))
    assert builder.text_cache_stats["hits"] >= len(convs)  # every second build of a conversation at least
    assert len(builder._text_ids) == 8  # bounded: least recently used conversations evicted
