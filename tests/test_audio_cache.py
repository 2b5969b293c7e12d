"""The audio cache (runtime/stages/audio_cache.py): a clip seen again skips decoding (preprocess) and the encoder, a
window seen again (by its content, in any request) its log-mel and the encoder, keyed by what preprocess computes once;
bounded in bytes, least recently used out first, exact."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf

from af3trt.export.onnx_export import export_encoder
from af3trt.runtime.stages import audio, audio_cache
from af3trt.triton_repo import configs

from fakes import pb_utils as fake_pb
from helpers import fading_noise


def test_lru_evicts_by_bytes_least_recently_used_first():
    cache = audio_cache.LruBytes(max_bytes=3000)
    a, b, c = (np.full(250, i, np.float32) for i in range(3))  # 1000 bytes each
    for key, value in ((b"a", a), (b"b", b), (b"c", c)):
        assert cache.put(key, value)
    assert cache.bytes == 3000 and len(cache) == 3
    assert cache.get(b"a") is a  # a is now the most recently used: b goes first
    assert cache.put(b"d", np.zeros(250, np.float32))
    assert b"b" not in cache and {b"a", b"c", b"d"} <= set(cache._items) and cache.bytes == 3000
    assert cache.put(b"e", np.zeros(500, np.float32))  # 2000 bytes: c and a go (least recent first)
    assert set(cache._items) == {b"d", b"e"} and cache.bytes == 3000 and cache.stats["evictions"] == 3
    assert not cache.put(b"big", np.zeros(751, np.float32))  # alone over the bound: not kept, nothing evicted
    assert b"big" not in cache and len(cache) == 2
    assert cache.get(b"b") is None and cache.stats["misses"] == 1
    off = audio_cache.LruBytes(0)
    assert not off.put(b"a", a) and off.get(b"a") is None  # 0 bytes: the cache is off


def test_digest_and_window_keys():
    d = audio_cache.audio_digest([b"one", b"two"], 20, True)
    assert d == audio_cache.audio_digest([b"one", b"two"], 20, True) and len(d) == 16
    others = {audio_cache.audio_digest([b"onet", b"wo"], 20, True), audio_cache.audio_digest([b"two", b"one"], 20, True),
              audio_cache.audio_digest([b"one", b"two"], 20, False), audio_cache.audio_digest([b"one", b"two"], 2, True)}
    assert d not in others and len(others) == 4  # clip boundaries, order and settings are in the digest
    keys = audio_cache.window_keys(d, 3)
    assert keys.dtype == np.uint64 and keys.shape == (3, 2) and len({audio_cache.key_bytes(k) for k in keys}) == 3


def _float_wav(wave: np.ndarray) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wave, 16000, format="WAV", subtype="FLOAT")
    return buf.getvalue()


def test_windows_are_keyed_by_content_and_their_log_mel_found_in_any_request():
    """A live session sends a stream's windows ahead, then the whole stream (runtime/openai/realtime.py): the whole
    clip's windows carry the keys the earlier requests gave them, and only its new window is transformed."""
    wave = fading_noise(65 * 16000)
    cache = audio_cache.LruBytes(1 << 30)
    transformed = []

    def counting(chunks, frames):
        transformed.append(len(chunks))
        return audio.log_mel(chunks, frames)

    one, two, whole = (audio.prepare_clips([_float_wav(wave[:n])], log_mel_fn=counting, window_cache=cache)
                       for n in (30 * 16000, 60 * 16000, len(wave)))
    assert transformed == [1, 1, 1]  # each request transformed only the window not seen before
    plain = audio.prepare_clips([_float_wav(wave)])  # no cache: what the whole clip computes by itself
    assert np.array_equal(whole.features, plain.features) and np.array_equal(whole.mask, plain.mask)
    assert np.array_equal(whole.keys, plain.keys) and whole.keys.dtype == np.uint64 and whole.keys.shape == (3, 2)
    assert np.array_equal(whole.keys[:2], two.keys) and np.array_equal(two.keys[:1], one.keys)
    assert len({audio_cache.key_bytes(k) for k in whole.keys}) == 3
    # the same samples cropped to another frame count T are another window
    short = audio.prepare_clips([_float_wav(wave[:5 * 16000])])
    padded = audio.prepare_clips([_float_wav(wave[:5 * 16000]), _float_wav(wave[:30 * 16000])])
    assert short.features.shape[2] < 3000 == padded.features.shape[2]
    assert not np.array_equal(short.keys[0], padded.keys[0]) and np.array_equal(padded.keys[1], one.keys[0])


def _spec(**kw):
    return configs.RepoSpec(target="cpu", hidden_size=64, decoder_dtype="float32", vocab_size=704, end_id=1, pad_id=1,
                            **kw)


def test_preprocess_skips_decoding_a_clip_seen_again(speech_bytes, monkeypatch):
    model = fake_pb.load_model("preprocess", configs.preprocess_config(_spec()))
    calls = []
    real = audio.prepare_clips
    monkeypatch.setattr(audio, "prepare_clips", lambda *a, **k: calls.append(1) or real(*a, **k))
    buf = io.BytesIO()
    sf.write(buf, 0.1 * np.random.default_rng(0).standard_normal(32000), 16000, format="WAV")
    other = buf.getvalue()
    first, again, different = (model.execute([fake_pb.Request({"audio": np.array([c], object)})])[0]
                               for c in (speech_bytes, speech_bytes, other))
    assert len(calls) == 2  # the repeated clip was neither decoded nor featurised again
    for name in ("input_features", "input_features_mask", "audio_windows", "audio_digest"):
        assert np.array_equal(first.outputs[name].as_numpy(), again.outputs[name].as_numpy()), name
    keys = first.outputs["audio_digest"].as_numpy()
    assert keys.shape == (first.outputs["input_features"].as_numpy().shape[0], 2)
    assert not np.array_equal(different.outputs["audio_digest"].as_numpy()[0], keys[0])


@pytest.fixture(scope="module")
def encoder_onnx(tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache-encoder") / "encoder.onnx"
    export_encoder(tiny_ckpt, out)
    return out


def _encoder(onnx, cache_bytes):
    spec = _spec(encoder_params={"onnx_path": str(onnx), "cache_bytes": cache_bytes})
    return fake_pb.load_model("encoder", configs.encoder_config(spec), {"model_repository": str(onnx.parent)})


def _window_requests(seconds: list[float], digests: list[bytes | None]):
    reqs = []
    for i, (s, d) in enumerate(zip(seconds, digests)):
        wave = (0.1 * np.random.default_rng(i).standard_normal(int(16000 * s))).astype(np.float32)
        f, m = audio.log_mel([wave], audio.request_frames([wave]))
        inputs = {"input_features": f, "input_features_mask": m}
        if d is not None:
            inputs["audio_digest"] = audio_cache.window_keys(d, 1)
        reqs.append(fake_pb.Request(inputs))
    return reqs


def test_encoder_cache_is_exact_skips_the_encoder_and_evicts_by_bytes(encoder_onnx):
    digests = [bytes([i]) * 16 for i in range(3)]
    plain = _encoder(encoder_onnx, 0)  # cache off: what every request computes
    cached = _encoder(encoder_onnx, 1 << 30)
    runs = []
    real_run = cached.encoder.run
    cached.encoder.run = lambda f, m: runs.append(len(f)) or real_run(f, m)

    want = [r.outputs["audio_embeds"].as_numpy() for r in plain.execute(_window_requests([5.0, 5.0], digests[:2]))]
    first = cached.execute(_window_requests([5.0, 5.0], digests[:2]))
    again = cached.execute(_window_requests([5.0, 5.0], digests[:2]))
    assert runs == [2]  # the second time no window ran
    for w, a, b in zip(want, first, again):
        assert np.array_equal(a.outputs["audio_embeds"].as_numpy(), w)  # bit for bit
        assert np.array_equal(b.outputs["audio_embeds"].as_numpy(), w)
    (no_key,) = cached.execute(_window_requests([5.0], [None]))  # a request without keys is computed, not kept
    assert runs == [2, 1] and len(cached.cache) == 2

    entry = cached.cache.bytes // 2  # one 5-s window's rows
    small = _encoder(encoder_onnx, entry * 2)  # room for two windows
    small.execute(_window_requests([5.0, 5.0], digests[:2]))
    small.execute(_window_requests([5.0], digests[:1]))  # window 0 becomes the most recently used
    small.execute(_window_requests([5.0], digests[2:]))  # window 1 is evicted, not 0
    assert small.cache.bytes <= entry * 2 and small.cache.stats["evictions"] == 1
    # the encoder's key: (think/'s variant?, the window's digest); these are base windows
    assert (False, audio_cache.key_bytes(audio_cache.window_keys(digests[0], 1)[0])) in small.cache
    assert (False, audio_cache.key_bytes(audio_cache.window_keys(digests[1], 1)[0])) not in small.cache


def test_a_copy_that_cannot_be_made_is_not_kept_and_raises_nothing():
    """A capped GPU stub may not have room for the cache's copy of a window (round 3, item 3): nothing is kept, the
    failure is counted, the caller's request goes on."""
    import torch

    from af3trt.runtime.stages.audio_cache import LruBytes, keep_computed

    class NoRoom:
        def clone(self):
            raise torch.OutOfMemoryError("CUDA out of memory")

    cache = LruBytes(1 << 20)
    rows = {0: np.zeros((4, 2), np.float32), 1: NoRoom(), 2: np.zeros((4, 2), np.float32)}
    assert keep_computed(cache, [b"k0", b"k1", b"k2"], rows) == 1
    assert len(cache) == 1 and cache.stats["failed_puts"] == 1
