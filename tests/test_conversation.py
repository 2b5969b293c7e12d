"""Conversations (the `messages` input): parsing and its errors, our rendering against AudioFlamingo3Processor's
input ids, several clips against a model-level reference (tests/reference.py), the fusion adapter, and the whole
ensemble over gRPC against AudioFlamingo3ForConditionalGeneration.generate, token for token."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from af3trt.runtime.stages import conversation
from af3trt.runtime.stages.conversation import Audio, PromptError
from af3trt.runtime.stages.prompt import FusionLimits, PromptBuilder
from af3trt.triton_repo import configs
from reference import MAX_TOKENS, mono16k, run_alongside, wav_bytes

from fakes import pb_utils as fake_pb


def user(*parts):
    return {"role": "user", "content": [{"type": "audio", "audio_index": p} if isinstance(p, int)
                                        else {"type": "text", "text": p} for p in parts]}


def assistant(text):
    return {"role": "assistant", "content": text}


# The model card's conversation: audio + question, the answer, a follow-up about the same audio.
CARD = [user(0, "What is happening in this audio?"), assistant("Someone is speaking."), user("Why do you think so?")]
LATER = [user("I will play you a clip."), assistant("Go ahead."), user("Here it is. What is said?", 0)]
SYSTEM = [{"role": "system", "content": "You are a careful listener."}, *CARD]
SYSTEM_PARTS = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]}, *LATER]
TEXT_ONLY = [user("Hello."), assistant("Hi! How can I help?"), {"role": "user", "content": "Tell me a joke."}]
ONE_AUDIO = {"card": CARD, "later": LATER, "system": SYSTEM, "system_parts": SYSTEM_PARTS}
# Several clips (the processor refuses these): in different turns, out of order, two in one turn, one reused.
TWO_AUDIO = {
    "two_turns": [user(0, "What is this?"), assistant("Speech."), user(1, "And this one?")],
    "reversed": [user(1, "First this."), assistant("A tone."), user("Now the other.", 0)],
    "one_turn": [{"role": "system", "content": "Compare clips."}, user(0, 1, "Which is speech?")],
    "reused": [user(0, "Listen."), assistant("OK."), user(1, "Is it like this one?", 0)],
}


# ---------------------------------------------------------------------------------------------------------------
# parsing

def test_parse_keeps_the_structure():
    conv = conversation.parse(json.dumps(TWO_AUDIO["one_turn"]), 2)
    assert [m.role for m in conv.messages] == ["system", "user"]
    assert conv.messages[1].content == (Audio(0), Audio(1), "Which is speech?")
    assert conv.audio_order() == [0, 1] and conv.audio_per_message() == [2]
    assert conversation.parse(json.dumps(TWO_AUDIO["reused"]).encode(), 2).audio_order() == [0, 1, 0]
    short = conversation.shorthand("What?", "Be brief.", 2)
    assert short.template_messages() == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "audio", "audio": "clip 0", "audio_index": 0},
                                     {"type": "audio", "audio": "clip 1", "audio_index": 1},
                                     {"type": "text", "text": "What?"}]}]


@pytest.mark.parametrize("messages,clips,needle", [
    ("[{", 0, "not valid JSON"),
    (b"\xff\xfe", 0, "not valid JSON"),
    ({"role": "user", "content": "hi"}, 0, "non-empty JSON list"),
    ([], 0, "non-empty JSON list"),
    (["hi"], 0, r"messages\[0\] must be an object"),
    ([{"role": "robot", "content": "hi"}], 0, "role must be one of system, user, assistant"),
    ([{"role": "user", "content": "hi", "name": "x"}], 0, "unknown keys"),
    ([{"role": "user"}], 0, "content must be a string or a list of parts, got nothing"),
    ([{"role": "user", "content": 5}], 0, "got int"),
    ([{"role": "user", "content": "  "}], 0, r"messages\[0\] \(user\) has empty content"),
    ([{"role": "user", "content": []}], 0, "empty content"),
    ([user("")], 0, "empty content"),
    ([{"role": "user", "content": [{"type": "image", "url": "x"}]}], 0, 'type must be "text" or "audio"'),
    ([{"role": "user", "content": [{"type": "text", "text": 3}]}], 0, "a text part is"),
    ([{"role": "user", "content": [{"type": "audio", "audio_index": "0"}]}], 1, "an audio part is"),
    ([{"role": "user", "content": [{"type": "audio", "audio_index": True}]}], 1, "an audio part is"),
    ([{"role": "user", "content": [{"type": "audio", "audio_index": 0, "url": "http://x"}]}], 1, "an audio part is"),
    ([user(2, "x")], 2, "audio_index 2 is out of range: the request has 2 audio clips"),
    ([user(-1, "x")], 1, "audio_index -1 is out of range"),
    ([user(0, "x")], 0, "has 0 audio clips"),
    ([user("x")], 1, "audio clip 0 of 1 is never referenced"),
    ([user(1, "x")], 3, "audio clips 0, 2 of 3 are never referenced"),
    ([assistant("hi")], 0, r"messages\[0\]: role assistant out of order"),
    ([user("a"), user("b")], 0, r"messages\[1\]: role user out of order"),
    ([user("a"), assistant("b"), {"role": "system", "content": "c"}], 0, "only the first message may be a system"),
    ([user("a"), assistant("b")], 0, "the last message must be from the user"),
    ([{"role": "system", "content": "s"}], 0, "no user message"),
    ([{"role": "assistant", "content": [{"type": "audio", "audio_index": 0}]}], 1, "audio parts are allowed in user"),
    ([user("say <sound> now")], 0, "may not contain <sound>"),
])
def test_bad_conversations_are_named(messages, clips, needle):
    data = messages if isinstance(messages, (str, bytes)) else json.dumps(messages)
    with pytest.raises(PromptError, match=needle):
        conversation.parse(data, clips)


# ---------------------------------------------------------------------------------------------------------------
# rendering against the processor, and several clips against the model-level reference

@pytest.fixture(scope="module")
def waves():
    """Two clips: 3 s of noisy speech-band tones (one window) and 33 s of noise with a tone (two windows)."""
    rng = np.random.default_rng(11)
    t = np.arange(48000) / 16000
    a = (0.1 * np.sin(2 * np.pi * 300 * t) * np.sin(2 * np.pi * 3 * t) + 0.02 * rng.standard_normal(len(t)))
    t = np.arange(16000 * 33) / 16000
    b = 0.05 * rng.standard_normal(len(t)) + 0.05 * np.sin(2 * np.pi * 880 * t)
    return [a.astype(np.float32), b.astype(np.float32)]


@pytest.fixture(scope="module")
def limits(ref):
    t = ref.model.config.text_config
    return FusionLimits(vocab_size=t.vocab_size, hidden_size=t.hidden_size, dtype="float32", end_id=t.eos_token_id,
                        pad_id=t.bos_token_id, max_input_len=2000, max_output_len=64, default_max_tokens=16)


def encode(ref, waves):
    """What preprocess + encoder hand fusion for these clips in clip order: (embeds [W,750,H], mask [W,3000],
    windows per clip), from the processor's features through the model's own tower and projector."""
    feats = [ref.processor(text=ref.processor.audio_token, audio=w) for w in waves]
    features = torch.cat([f["input_features"] for f in feats])
    mask = torch.cat([f["input_features_mask"] for f in feats])
    with torch.no_grad():
        tower = ref.model.model.audio_tower(features, input_features_mask=mask)
        embeds = ref.model.model.multi_modal_projector(tower.last_hidden_state)
    return embeds.numpy(), mask.numpy(), [f["input_features"].shape[0] for f in feats]


def check_against_reference(ref, limits, builder, messages, waves):
    """Our ids equal the reference's with each fake id in a <sound> slot, and the prompt-table rows the fake ids
    address are, in order, the audio features the model scatters into those slots."""
    used = sorted({p["audio_index"] for m in messages if not isinstance(m["content"], str)
                   for p in m["content"] if p["type"] == "audio"})
    clips = [waves[k] for k in range(len(used))]
    inputs = ref.model_inputs(messages, clips)
    embeds, mask, windows = encode(ref, clips)
    conv = conversation.parse(json.dumps(messages), len(clips))
    ids, table = builder.build_conversation(conv, embeds, mask, windows)

    want = inputs["input_ids"][0].numpy()
    slots = want == ref.model.config.audio_token_id
    fake = ids >= limits.vocab_size
    assert len(ids) == len(want) and np.array_equal(fake, slots)
    assert np.array_equal(ids[~fake], want[~slots])
    with torch.no_grad():
        scattered = ref.model.get_audio_features(inputs["input_features"], inputs["input_features_mask"]).pooler_output
    np.testing.assert_allclose(table[ids[fake] - limits.vocab_size], scattered.numpy(), rtol=0, atol=1e-5)
    return ids


@pytest.mark.parametrize("name", sorted(ONE_AUDIO) + ["text_only"])
def test_one_audio_conversation_ids_equal_the_processor(ref, limits, tiny_ckpt, waves, name):
    messages = ONE_AUDIO.get(name, TEXT_ONLY)
    builder = PromptBuilder(tiny_ckpt, limits)
    if name == "text_only":
        want = ref.processor.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                 add_generation_prompt=True)["input_ids"][0].numpy()
        empty = np.zeros((0, 750, limits.hidden_size), np.float32)
        ids, _ = builder.build_conversation(conversation.parse(json.dumps(messages), 0), empty,
                                            np.zeros((0, 3000), np.int32), [])
        assert np.array_equal(ids, want)
        return
    # model_inputs is the processor's own apply_chat_template for one audio
    ids = check_against_reference(ref, limits, builder, messages, waves)
    assert (ids >= limits.vocab_size).sum() > 10


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TWO_AUDIO))
def test_several_clips_match_the_model_level_reference(ref, limits, tiny_ckpt, waves, name):
    assert encode(ref, waves)[2] == [1, 2]  # windows per clip: the second clip spans two windows
    ids = check_against_reference(ref, limits, PromptBuilder(tiny_ckpt, limits), TWO_AUDIO[name], waves)
    if name == "reversed":  # clip 1's rows come first in the prompt, but the table stays in clip order
        assert ids[ids >= limits.vocab_size][0] > limits.vocab_size


def test_shorthand_is_a_one_turn_conversation(ref, limits, tiny_ckpt, waves):
    builder = PromptBuilder(tiny_ckpt, limits)
    embeds, mask, windows = encode(ref, waves[:1])
    short = builder.build("What is it?", "Be brief.", embeds, mask, windows)
    messages = [{"role": "system", "content": "Be brief."}, user(0, "What is it?")]
    conv = builder.build_conversation(conversation.parse(json.dumps(messages), 1), embeds, mask, windows)
    assert np.array_equal(short[0], conv[0]) and np.array_equal(short[1], conv[1])


def test_long_conversations_are_refused(ref, limits, tiny_ckpt):
    builder = PromptBuilder(tiny_ckpt, limits)
    turns = [user("word " * 200), assistant("ok")] * 5 + [user("done?")]
    empty = np.zeros((0, 750, limits.hidden_size), np.float32)
    with pytest.raises(PromptError, match="prompt too long"):
        builder.build_conversation(conversation.parse(json.dumps(turns), 0), empty, np.zeros((0, 3000), np.int32), [])


# ---------------------------------------------------------------------------------------------------------------
# the fusion adapter

def test_fusion_adapter_takes_messages_or_the_shorthand(ref, limits, tiny_ckpt):
    t = ref.model.config.text_config
    spec = configs.RepoSpec(target="cpu", hidden_size=t.hidden_size, decoder_dtype="float32", vocab_size=t.vocab_size,
                            end_id=t.eos_token_id, pad_id=t.bos_token_id, max_input_len=2000, max_output_len=64,
                            default_max_tokens=16, fusion_params={"tokenizer_dir": str(tiny_ckpt)})
    model = fake_pb.load_model("fusion", configs.fusion_config(spec))
    placeholder = dict(audio_embeds=np.zeros((1, 750, t.hidden_size), np.float32),
                       input_features_mask=np.zeros((1, 3000), np.int32), audio_windows=np.zeros((0,), np.int32))

    def req(**kw):
        return fake_pb.Request({k: np.array([v.encode() if isinstance(v, str) else v], object) for k, v in kw.items()}
                               | placeholder)

    text = json.dumps(TEXT_ONLY)
    responses = model.execute([req(messages=text), req(text_input="Hello."), req(messages=text, text_input="x"),
                               req(messages=text, system_prompt="x"), req(), req(messages="[1"),
                               req(messages=json.dumps([user(0, "x")]))])
    ok, short, both, both_sys, neither, bad_json, no_clip = responses
    assert not ok.has_error() and not short.has_error()
    want = ref.processor.apply_chat_template(TEXT_ONLY, tokenize=True, add_generation_prompt=True,
                                             return_dict=True)["input_ids"][0].tolist()
    assert ok.outputs["input_ids"].as_numpy()[0].tolist() == want
    assert "either messages or text_input" in both.error.message()
    assert "either messages or text_input" in both_sys.error.message()
    assert "text_input or messages is required" in neither.error.message()
    assert "not valid JSON" in bad_json.error.message()
    assert "out of range" in no_clip.error.message()


# ---------------------------------------------------------------------------------------------------------------
# over gRPC on the real tritonserver, against generate

@pytest.fixture(scope="module")
def clips(waves):
    return [wav_bytes(w, 16000, "FLAC") for w in waves]


@pytest.mark.integration
@pytest.mark.parametrize("name", sorted(ONE_AUDIO) + sorted(TWO_AUDIO))
def test_conversation_over_grpc_equals_generate(client, ref, clips, name):
    messages = ONE_AUDIO.get(name) or TWO_AUDIO[name]
    n = 1 if name in ONE_AUDIO else 2
    got = client.ask(messages=messages, audio=clips[:n], max_tokens=MAX_TOKENS, stream=name == "card")
    want = ref.generate_conversation(messages, [mono16k(c) for c in clips[:n]])
    assert len(want) > 5
    assert got.token_ids == want


@pytest.mark.integration
def test_bad_conversations_fail_alone_over_grpc(client, ref, clips):
    bad = {
        "out of range": (dict(messages=[user(3, "x")], audio=clips[:1]), "audio_index 3 is out of range"),
        "unreferenced": (dict(messages=[user(0, "x")], audio=clips), "audio clip 1 of 2 is never referenced"),
        "order": (dict(messages=[user("a"), user("b")]), "role user out of order"),
        "empty": (dict(messages=[{"role": "user", "content": ""}]), "empty content"),
        "json": (dict(messages='[{"role": "user"'), "not valid JSON"),
        "types": (dict(messages=[{"role": "user", "content": [{"type": "audio", "audio_index": "0"}]}],
                       audio=clips[:1]), "an audio part is"),
        "too long": (dict(messages=[user("word " * 20000)]), "prompt too long"),
        "both": (dict(messages=TEXT_ONLY, prompt="x"), "either messages or text_input"),
    }
    good, errors = run_alongside(
        lambda: client.ask(messages=CARD, audio=clips[:1], max_tokens=MAX_TOKENS, stream=True).token_ids,
        {name: (lambda kw=kw: client.ask(**kw)) for name, (kw, _) in bad.items()})
    for name, (_, needle) in bad.items():
        assert needle in errors[name], f"{name}: {errors[name]}"
    want = ref.generate_conversation(CARD, [mono16k(clips[0])])
    assert good == {0: want, 1: want}
