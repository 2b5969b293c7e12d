"""The whole ensemble on a real tritonserver (127.0.0.1, free ports) against transformers' AF3, token for token.

The reference is `AudioFlamingo3ForConditionalGeneration.generate` (greedy) on the same tiny checkpoint, fed by
`AudioFlamingo3Processor.apply_chat_template` with the same audio decoded independently (soundfile, and scipy for
resampling): tests/reference.py. The build, the server, the client and the reference are session fixtures in
tests/conftest.py, shared with the other integration modules. Generation stops on any of the
checkpoint's end ids (TensorRT-LLM: end_id + stop_words_list, runtime/stages/stop_words.py); the reference's trailing end
token is dropped before comparing.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from af3trt.runtime.client.library import AF3Client
from reference import MAX_TOKENS, mono16k, run_alongside, wav_bytes

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def long_clip(speech_bytes) -> bytes:
    """70 s (3 windows): speech, a tone and noise, as 16 kHz FLAC."""
    speech = mono16k(speech_bytes)
    rng = np.random.default_rng(7)
    t = np.arange(16000 * 70) / 16000
    wave = 0.05 * np.sin(2 * np.pi * 440 * t) + 0.01 * rng.standard_normal(len(t))
    for start in range(0, len(t) - len(speech), len(speech) * 3):
        wave[start: start + len(speech)] += speech
    return wav_bytes(wave.astype(np.float32), 16000, "FLAC")


def test_speech_clip_matches_transformers(client, ref, speech_bytes):
    got = client.ask("What is said in the audio?", [speech_bytes], max_tokens=MAX_TOKENS)
    want = ref.generate("What is said in the audio?", mono16k(speech_bytes))
    assert len(want) > 5
    assert got.token_ids == want


def test_long_clip_three_windows_matches_transformers(client, ref, long_clip):
    got = client.ask("Describe the sounds.", [long_clip], max_tokens=MAX_TOKENS, system_prompt="Be precise.")
    assert got.token_ids == ref.generate("Describe the sounds.", mono16k(long_clip), system="Be precise.")
    assert got.notices == []


def test_text_only_matches_transformers(client, ref):
    got = client.ask("Tell me about the weather tomorrow.", [], max_tokens=MAX_TOKENS)
    assert got.token_ids == ref.generate("Tell me about the weather tomorrow.")


def test_stream_equals_non_stream(client, speech_bytes):
    whole = client.ask("What is said?", [speech_bytes], max_tokens=MAX_TOKENS, stream=False)
    chunks = list(client.stream("What is said?", [speech_bytes], max_tokens=MAX_TOKENS, stream=True))
    assert whole.chunks == 1
    assert len(whole.token_ids) >= 5
    # the first token alone (time to first token); later tokens that come faster than the build's stream interval
    # (50 ms) share a response (runtime/stages/coalesce.py), so a response carries one token or more, and joined they are
    # the whole answer; the last response is the decoder's own final one (empty on the end id, as TRT-LLM's)
    assert len(chunks[0].token_ids) == 1 and all(len(c.token_ids) >= 1 for c in chunks[:-1])
    assert [t for c in chunks for t in c.token_ids] == whole.token_ids
    assert "".join(c.text for c in chunks) == whole.text
    assert [c.t for c in chunks] == sorted(c.t for c in chunks)


def test_stereo_44k_equals_reference_resample(client, ref, speech_bytes):
    from scipy.signal import resample_poly

    mono = mono16k(speech_bytes)
    up = resample_poly(mono, 441, 160).astype(np.float32)
    stereo = np.stack([up, 0.5 * up], axis=1)  # different channels: the mix matters
    data = wav_bytes(stereo, 44100)
    got = client.ask("What is said?", [data], max_tokens=MAX_TOKENS)
    assert got.token_ids == ref.generate("What is said?", mono16k(data))


def test_eight_concurrent_mixed_requests(client, ref, speech_bytes, long_clip):
    jobs = [("What is said?", speech_bytes), ("Describe the sounds.", long_clip), ("Say something nice.", None),
            ("Is this music?", speech_bytes)] * 2
    results: dict[int, list[int] | Exception] = {}

    def run(i, prompt, clip):
        try:
            results[i] = client.ask(prompt, [clip] if clip else [], max_tokens=MAX_TOKENS,
                                    stream=bool(i % 2)).token_ids
        except Exception as e:  # noqa: BLE001
            results[i] = e

    threads = [threading.Thread(target=run, args=(i, p, c)) for i, (p, c) in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    for i, (prompt, clip) in enumerate(jobs):
        assert results[i] == ref.generate(prompt, mono16k(clip) if clip else None), f"request {i}"


def test_bad_requests_fail_alone(client, ref, speech_bytes):
    """Corrupt bytes, empty audio, an over-long prompt and bad sampling values each get their own clear error
    while good requests in flight alongside them still succeed."""
    bad = {
        "corrupt": (dict(prompt="x", audio=[b"RIFF\x00\x00garbage" * 10]), "could not decode"),
        "empty": (dict(prompt="x", audio=[b""]), "empty"),
        "too long": (dict(prompt="word " * 20000), "prompt too long"),
        "top_p": (dict(prompt="x", top_p=2.0), "top_p"),
        "max_tokens": (dict(prompt="x", max_tokens=100000), "max_tokens"),
    }
    def bad_call(kw):
        return lambda: client.ask(kw.pop("prompt"), kw.pop("audio", []), **kw)

    good, errors = run_alongside(
        lambda: client.ask("What is said?", [speech_bytes], max_tokens=MAX_TOKENS, stream=True).token_ids,
        {name: bad_call(dict(kw)) for name, (kw, _) in bad.items()})
    for name, (_, needle) in bad.items():
        assert needle in errors[name], f"{name}: {errors[name]}"
    want = ref.generate("What is said?", mono16k(speech_bytes))
    assert good == {0: want, 1: want}


def test_truncation_is_reported(client, ref, speech_bytes):
    speech = mono16k(speech_bytes)
    wave = np.tile(speech, int(np.ceil(16000 * 610 / len(speech))))[: 16000 * 610]  # 10 min 10 s
    got = client.ask("What is said?", [wav_bytes(wave, 16000, "FLAC")], max_tokens=8)
    assert len(got.notices) == 1 and "only the first 600 s" in got.notices[0]
    assert got.token_ids == ref.generate("What is said?", wave, max_new_tokens=8)


def test_strip_prefix_flag_reaches_postprocess(client, speech_bytes):
    plain = client.ask("What is said?", [speech_bytes], max_tokens=MAX_TOKENS, stream=False)
    stripped = client.ask("What is said?", [speech_bytes], max_tokens=MAX_TOKENS, stream=False, strip_prefix=True)
    assert stripped.token_ids == plain.token_ids
    from af3trt.runtime.stages.detok import strip_transcription_prefix

    assert stripped.text == strip_transcription_prefix(plain.text)


def test_perf_analyzer_measures_the_ensemble(server, tmp_path, speech_bytes):
    """perf_analyzer 2.51 (from the tritonclient wheel) drives the decoupled ensemble over gRPC."""
    from af3trt.perf.analyzer import find_perf_analyzer, run_perf_analyzer, write_input_data

    data = write_input_data(tmp_path / "inputs.json", [("What is said?", speech_bytes)], max_tokens=8, stream=True)
    result = run_perf_analyzer(find_perf_analyzer(), server.grpc_url, data, concurrency=[1], streaming=True,
                               requests_per_level=6, out_dir=tmp_path)
    point = result[0]
    assert point["concurrency"] == 1 and point["throughput_rps"] > 0 and point["p50_latency_us"] > 0


def test_bf16_checkpoint_carries_bf16_end_to_end(bf16_repo, bf16_ref, speech_bytes):
    """A bf16 checkpoint (like the real AF3): the prompt table crosses fusion → decoder as bf16 (DLPack), and the
    answer equals transformers' bf16 generate."""
    from af3trt.runtime.serve.server import TritonServer
    from af3trt.triton_repo import configs

    out = bf16_repo
    decoder = configs.parse((out / "model_repository" / "decoder" / "config.pbtxt").read_text())
    table = next(i for i in decoder.input if i.name == "prompt_embedding_table")
    assert configs.mc.DataType.Name(table.data_type) == "TYPE_BF16"
    want = bf16_ref.generate("What is said?", mono16k(speech_bytes), max_new_tokens=16)
    with TritonServer(out / "model_repository", log_path=out / "tritonserver.log") as srv:
        got = AF3Client(srv.grpc_url, timeout=120).ask("What is said?", [speech_bytes], max_tokens=16)
    assert got.token_ids == want


@pytest.mark.parametrize("stream", [False, True])
def test_ignore_eos_generates_max_tokens(client, ref, stream):
    """ignore_eos (AIPerf's fixed-length advice): exactly max_tokens tokens; up to where the reference stops on an end
    id the answer is the reference's (greedy), an end id the model then picks stays in the answer."""
    prompt, n = "Tell me about the weather tomorrow.", 40
    want = ref.generate(prompt, max_new_tokens=n)
    got = client.ask(prompt, [], max_tokens=n, ignore_eos=True, stream=stream)
    assert len(got.token_ids) == n and got.token_ids[:len(want)] == want
    least = client.ask(prompt, [], max_tokens=n, min_tokens=n, stream=stream)  # the end id masked up to n
    assert least.token_ids[:len(want)] == want and ref.end_id not in least.token_ids
