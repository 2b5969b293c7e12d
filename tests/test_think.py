"""AF3's thinking mode on a real tritonserver: base and thinking requests to ONE deployment built from a checkpoint
with think/, token for token against transformers (base) and transformers + PEFT (thinking: non_lora_trainables.bin
loaded with strict=False, then PeftModel.from_pretrained(..., subfolder="think"); tests/reference.py), single,
streamed, in one mixed batch and in a multi-turn conversation; and a deployment built without think/ refusing
thinking with its typed code. The think suffix is written into the reference's prompts here, by hand, where
docs/thinking.md says it goes: the end of the last user turn, after a space."""

from __future__ import annotations

import threading

import pytest

from af3trt.runtime.client.library import AF3Client, AF3Error
from af3trt.runtime.stages.errors import ErrorCode
from reference import MAX_TOKENS, Reference, mono16k

pytestmark = pytest.mark.integration

SUFFIX = " Please think and reason about the input audio before you respond."


@pytest.fixture(scope="module")
def think_ckpt(tmp_path_factory):
    from af3trt.export.synth import write_checkpoint
    from af3trt.export.think import write_think

    ckpt = write_checkpoint(tmp_path_factory.mktemp("ckpt-think") / "af3-tiny-think", "tiny", seed=0)
    write_think(ckpt, seed=0)
    return ckpt


@pytest.fixture(scope="module")
def think_build(think_ckpt, tmp_path_factory):
    from af3trt.build.build_engines import BuildOptions, ServingConfig, build

    out = tmp_path_factory.mktemp("build-think") / "out"
    build(BuildOptions(hf_model=think_ckpt, out=out, serving=ServingConfig(max_output_len=64, default_max_tokens=16)))
    return out


@pytest.fixture(scope="module")
def think_client(think_build):
    from af3trt.runtime.serve.server import TritonServer

    srv = TritonServer(think_build / "model_repository", log_path=think_build / "tritonserver.log")
    srv.start(timeout=300)
    try:
        yield AF3Client(srv.grpc_url, timeout=120)
    finally:
        srv.stop()
        print(f"--- tail of {srv.log_path}\n{srv.log_tail(30)}")


@pytest.fixture(scope="module")
def base_ref(think_ckpt):
    return Reference(think_ckpt)


@pytest.fixture(scope="module")
def think_ref(think_ckpt):
    return Reference(think_ckpt, think=True)


def test_build_has_both_modes(think_build):
    import json

    manifest = json.loads((think_build / "manifest.json").read_text())
    think = manifest["think"]
    assert think["encoder_variant"] and think["task_id"] == 1
    assert "model.multi_modal_projector.linear_1.weight" in think["encoder_overrides"]
    assert any(k.startswith("model.audio_tower.") for k in think["encoder_overrides"])
    assert think["lora"]["modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert (think_build / "artifacts/think/encoder.onnx").exists()


def test_thinking_matches_transformers_peft(think_client, base_ref, think_ref, speech_bytes):
    prompt = "What is said in the audio?"
    want = think_ref.generate(prompt + SUFFIX, mono16k(speech_bytes))
    base = base_ref.generate(prompt, mono16k(speech_bytes))
    assert len(want) > 5 and want != base  # the adapter changes the answer (else the test proves nothing)
    whole = think_client.ask(prompt, [speech_bytes], max_tokens=MAX_TOKENS, thinking=True, stream=False)
    streamed = list(think_client.stream(prompt, [speech_bytes], max_tokens=MAX_TOKENS, thinking=True, stream=True))
    assert whole.token_ids == want
    assert [t for c in streamed for t in c.token_ids] == want
    # the same deployment answers base requests with the base model
    assert think_client.ask(prompt, [speech_bytes], max_tokens=MAX_TOKENS).token_ids == base


def test_thinking_text_only_and_explicit_off(think_client, base_ref, think_ref):
    prompt = "Tell me about the weather tomorrow."
    assert think_client.ask(prompt, [], max_tokens=MAX_TOKENS, thinking=True).token_ids == \
        think_ref.generate(prompt + SUFFIX)
    assert think_client.ask(prompt, [], max_tokens=MAX_TOKENS, thinking=False).token_ids == base_ref.generate(prompt)


def test_mixed_batch_base_and_thinking(think_client, base_ref, think_ref, speech_bytes):
    """Base and thinking requests at once: one decoder batch (the adapter per row), each still exact."""
    jobs = [("What is said?", speech_bytes, False), ("What is said?", speech_bytes, True),
            ("Say something nice.", None, True), ("Is this music?", speech_bytes, False)] * 2
    results: dict[int, list[int]] = {}

    def run(i, prompt, clip, thinking):
        results[i] = think_client.ask(prompt, [clip] if clip else [], max_tokens=MAX_TOKENS,
                                      thinking=thinking, stream=i % 2 == 0).token_ids

    threads = [threading.Thread(target=run, args=(i, *job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    for i, (prompt, clip, thinking) in enumerate(jobs):
        wave = None if clip is None else mono16k(clip)
        want = think_ref.generate(prompt + SUFFIX, wave) if thinking else base_ref.generate(prompt, wave)
        assert results[i] == want, (i, prompt, thinking)


def test_multi_turn_thinking_suffix_on_last_user_turn(think_client, think_ref, base_ref, speech_bytes):
    messages = [
        {"role": "system", "content": "Be precise."},
        {"role": "user", "content": [{"type": "audio", "audio_index": 0}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "A voice."},
        {"role": "user", "content": "Why do you think so?"},
    ]
    thought = [*messages[:3], {"role": "user", "content": "Why do you think so?" + SUFFIX}]
    wave = mono16k(speech_bytes)
    want = think_ref.generate_conversation(thought, [wave])
    assert want != base_ref.generate_conversation(messages, [wave])
    for stream in (False, True):
        got = think_client.ask(messages=messages, audio=[speech_bytes], max_tokens=MAX_TOKENS, thinking=True,
                               stream=stream)
        assert got.token_ids == want


def test_build_without_think_refuses_thinking(client, speech_bytes):
    """The session's tiny build has no think/: a thinking request gets a clear UNSUPPORTED error; base still works."""
    with pytest.raises(AF3Error) as e:
        client.ask("What is said?", [speech_bytes], max_tokens=4, thinking=True)
    assert e.value.code is ErrorCode.UNSUPPORTED
    assert "built without AF3's think/ adapter" in str(e.value)
    assert len(client.ask("What is said?", [speech_bytes], max_tokens=4).token_ids) == 4


def test_a_realtime_session_thinks_as_its_one_request_reference(think_client, think_ref, base_ref, speech_bytes):
    """WS /v1/realtime with reasoning.effort "high" (thinking on) then a response with effort "none" (off), through the
    openai package's realtime client: token ids equal the same conversation sent as one ordinary request (thinking
    on / off) and transformers (+ PEFT)."""
    import asyncio
    import base64

    import numpy as np

    from af3trt.runtime.openai.common import RealtimeOptions, Settings
    from af3trt.runtime.stages.live import InputFormat
    from helpers import openai_front

    openai = pytest.importorskip("openai")
    wave = mono16k(speech_bytes)
    raw = (np.clip(wave, -1, 1 - 2**-15) * 32768).astype("<i2").tobytes()
    clip = InputFormat("pcm16", 16000).wav(raw)  # the turn as the session sends it
    wave = mono16k(clip)

    with openai_front(Settings(triton_url=think_client.url, realtime=RealtimeOptions(max_speed=0))) as (url, app):
        async def go():
            client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
            async with client.realtime.connect(model="af3") as conn:
                await conn.session.update(session={
                    "type": "realtime", "reasoning": {"effort": "high"}, "max_output_tokens": MAX_TOKENS,
                    "audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000}, "turn_detection": None}}})
                await conn.input_audio_buffer.append(audio=base64.b64encode(raw).decode())
                await conn.input_audio_buffer.commit()
                await conn.response.create()
                texts = []
                async for ev in conn:
                    if ev.type == "response.done":
                        texts.append(ev.response.output[0].content[0].text)
                        if len(texts) == 2:
                            break
                        await conn.conversation.item.create(item={
                            "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Why?"}]})
                        await conn.response.create(response={"reasoning": {"effort": "none"}})
                (session,) = app.state.realtime_sessions
                return texts, [ids for _, ids in session.answers]

        texts, (thought, plain) = asyncio.run(asyncio.wait_for(go(), 300))
    first = [{"role": "user", "content": [{"type": "audio", "audio_index": 0}]}]
    want = think_ref.generate_conversation([{"role": "user", "content": [
        {"type": "audio", "audio_index": 0}, {"type": "text", "text": SUFFIX.strip()}]}], [wave])
    assert thought == want == think_client.ask(messages=first, audio=[clip], max_tokens=MAX_TOKENS,
                                               thinking=True, stream=False).token_ids
    second = first + [{"role": "assistant", "content": texts[0]}, {"role": "user", "content": "Why?"}]
    assert plain == base_ref.generate_conversation(second, [wave]) == \
        think_client.ask(messages=second, audio=[clip], max_tokens=MAX_TOKENS, stream=True).token_ids
