"""The audio front end (runtime/stages/lengths.py, runtime/stages/audio.py) against AudioFlamingo3Processor."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf
from scipy.signal import resample_poly

from af3trt.runtime.stages import audio, lengths
from af3trt.runtime.stages.audio import AudioError, decode_audio, log_mel, prepare_clips, split_windows

from helpers import fading_noise

SR = lengths.SAMPLE_RATE
FEATURE_TOL = 1e-5  # measured: 0.0 (bit-exact) on this machine


@pytest.fixture(scope="module")
def processor(tiny_ckpt):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_ckpt)


def encode(wave: np.ndarray, rate: int, fmt: str, subtype: str | None = None) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wave, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def run_processor(processor, waves: list[np.ndarray]):
    out = processor(text=[f"clip {i} <sound> end" for i in range(len(waves))], audio=waves)
    tokens = (out["input_ids"] == processor.audio_token_id).sum(-1).tolist()
    return out["input_features"].numpy(), out["input_features_mask"].numpy(), tokens


# ---------------------------------------------------------------------------------------------
# lengths


def test_constants():
    assert (lengths.WINDOW_SAMPLES, lengths.WINDOW_FRAMES) == (480000, 3000)
    assert (lengths.EMBEDS_PER_WINDOW, lengths.MAX_WINDOWS) == (750, 20)
    assert (lengths.HOP, lengths.N_FFT, lengths.N_MELS) == (160, 400, 128)


@pytest.mark.parametrize(
    "n, frames",
    [(0, 0), (1, 1), (159, 1), (160, 1), (161, 2), (320, 2), (321, 3), (479999, 3000), (480000, 3000)],
)
def test_valid_frames(n, frames):
    assert lengths.valid_frames(n) == frames


def test_token_count_edges():
    assert [lengths.audio_token_count(L) for L in range(1, 8)] == [0, 0, 1, 1, 1, 1, 2]
    assert lengths.min_samples_with_tokens() == 321
    assert lengths.audio_tokens_for_samples(320) == 0 and lengths.audio_tokens_for_samples(321) == 1


def test_window_count():
    W = lengths.WINDOW_SAMPLES
    assert lengths.window_count(0) == (1, False)
    assert lengths.window_count(W) == (1, False)
    assert lengths.window_count(W + 1) == (2, False)
    assert lengths.window_count(20 * W) == (20, False)
    assert lengths.window_count(20 * W + 1) == (20, True)
    assert lengths.window_count(5 * W, max_windows=2) == (2, True)


def test_per_window_rows_sum_to_clip_tokens():
    # The model masks each window's [750, H] output on its own; the clip's tokens use the summed frames.
    edges = [k * 480000 + d for k in range(1, 4) for d in (-321, -1, 0, 1, 160, 321, 977)]
    for n in list(range(0, 2000, 7)) + edges:
        per_window = sum(lengths.embeds_valid_per_window(f) for f in lengths.frames_per_window(n))
        assert per_window == lengths.audio_tokens_for_samples(n), n


def test_frame_buckets():
    # Every bucket is even with whole rows, the last is the full window, and each window's bucket is the smallest
    # one that holds its valid frames plus the two a kept token can still see (L + 2), capped at the window.
    assert lengths.FRAME_BUCKETS[-1] == lengths.WINDOW_FRAMES and len(set(lengths.FRAME_BUCKETS)) == 30
    assert all(b % 4 == 0 for b in lengths.FRAME_BUCKETS)
    assert lengths.encoder_rows(lengths.WINDOW_FRAMES) == lengths.EMBEDS_PER_WINDOW
    for L in range(lengths.WINDOW_FRAMES + 1):
        T = lengths.frame_bucket(L)
        assert T in lengths.FRAME_BUCKETS and T >= min(L + 2, lengths.WINDOW_FRAMES)
        assert T == lengths.FRAME_BUCKETS[0] or T - lengths.FRAME_BUCKET_STEP < min(L + 2, lengths.WINDOW_FRAMES)
        assert lengths.embeds_valid_per_window(L) <= lengths.encoder_rows(T)
    assert [lengths.frame_bucket(L) for L in (0, 98, 99, 2998, 2999, 3000)] == [100, 100, 200, 3000, 3000, 3000]
    assert lengths.encoded_frames_for_samples(65 * SR) == [3000, 3000, 600]
    with pytest.raises(ValueError):
        lengths.frame_bucket(3001)


# ---------------------------------------------------------------------------------------------
# windows, features and tokens against the processor

LENGTHS = {
    "1 sample": 1,
    "1 s": SR,
    "30 s": 30 * SR,
    "30 s + 1": 30 * SR + 1,
    "70 s": 70 * SR,
    "11 min": 660 * SR,
}
SLOW_LENGTHS = {"11 min"}  # left to the full run (scripts/test.sh --fast)


@pytest.mark.parametrize("n", [pytest.param(n, marks=pytest.mark.slow if k in SLOW_LENGTHS else ())
                               for k, n in LENGTHS.items()], ids=LENGTHS.keys())
def test_matches_processor(processor, n):
    wave = fading_noise(n)
    ref_features, ref_mask, (ref_tokens,) = run_processor(processor, [wave])

    chunks, truncated = split_windows(wave)
    n_windows, expect_truncated = lengths.window_count(n)
    assert len(chunks) == n_windows == ref_features.shape[0]
    assert truncated == expect_truncated == (n > 600 * SR)
    assert np.array_equal(np.concatenate(chunks), wave[: 600 * SR])

    assert ref_mask.sum(-1).tolist() == lengths.frames_per_window(n)
    assert lengths.audio_tokens_for_samples(n) == ref_tokens

    features, mask = log_mel(chunks)
    assert features.dtype == np.float32 and mask.dtype == np.int32
    assert features.shape == ref_features.shape and np.array_equal(mask, ref_mask)
    diff = float(np.abs(features - ref_features).max())
    assert diff <= FEATURE_TOL, f"max abs diff of features {diff:.3g}"


def test_log_mel_of_nothing():
    features, mask = log_mel([])
    assert features.shape == (0, 128, 3000) and mask.shape == (0, 3000)


def test_speech_end_to_end(processor, speech_bytes):
    batch = prepare_clips([speech_bytes])
    wave, rate = sf.read(io.BytesIO(speech_bytes), dtype="float32")
    assert rate == SR and wave.ndim == 1
    ref_features, ref_mask, ref_tokens = run_processor(processor, [wave])

    assert batch.windows_per_clip == [1] and batch.truncated == [False]
    assert batch.seconds_per_clip == [len(wave) / SR] and 4.0 < batch.seconds_per_clip[0] < 6.0
    assert batch.tokens_per_clip == ref_tokens
    # cropped after the full-window log-mel to the frame bucket of the 5-s clip (500 valid frames → 600)
    T = lengths.frame_bucket(int(ref_mask.sum()))
    assert T == 600 and batch.features.shape == (1, 128, T) and batch.mask.shape == (1, T)
    assert np.array_equal(batch.mask, ref_mask[:, :T]) and ref_mask[:, T:].sum() == 0
    diff = float(np.abs(batch.features - ref_features[:, :, :T]).max())
    assert diff <= FEATURE_TOL, f"max abs diff of features {diff:.3g}"


@pytest.mark.parametrize("n", [1, 160 * 97, 160 * 98 + 1, SR, 7 * SR + 5, 30 * SR - 1, 30 * SR])
def test_cropped_log_mel_is_the_full_window_log_mel_cropped(n):
    # Only the frames that see a sample are transformed; the rest is the window's constant floor. Equal to the
    # full-window features cropped, for short clips, bucket edges and a full window.
    chunks = [fading_noise(n, seed=n), fading_noise(min(n, 321), seed=1)]
    T = audio.request_frames(chunks)
    assert T == lengths.frame_bucket(lengths.valid_frames(n))
    full, full_mask = log_mel(chunks)
    cropped, mask = log_mel(chunks, T)
    assert cropped.shape == (2, 128, T) and mask.shape == (2, T)
    assert np.array_equal(mask, full_mask[:, :T])
    diff = float(np.abs(cropped - full[:, :, :T]).max())
    assert diff <= FEATURE_TOL, f"max abs diff {diff:.3g}"


def test_prepare_clips_without_cropping(speech_bytes):
    cropped, full = prepare_clips([speech_bytes]), prepare_clips([speech_bytes], crop=False)
    assert cropped.features.shape == (1, 128, 600) and full.features.shape == (1, 128, 3000)
    assert np.array_equal(full.mask[:, :600], cropped.mask) and full.tokens_per_clip == cropped.tokens_per_clip
    assert float(np.abs(full.features[:, :, :600] - cropped.features).max()) <= FEATURE_TOL


def test_request_frames():
    assert audio.request_frames([]) == 100
    assert audio.request_frames([np.zeros(SR, np.float32), np.zeros(7 * SR + 5, np.float32)]) == 800  # 701 → 800
    assert audio.request_frames([np.zeros(30 * SR, np.float32)]) == 3000
    with pytest.raises(ValueError, match="frames"):
        log_mel([np.zeros(10, np.float32)], 0)


def test_several_clips_in_order(processor, speech_bytes):
    long_wave = fading_noise(31 * SR, seed=1)
    batch = prepare_clips([encode(long_wave, SR, "WAV", "FLOAT"), speech_bytes])
    speech, _ = sf.read(io.BytesIO(speech_bytes), dtype="float32")
    ref_features, ref_mask, ref_tokens = run_processor(processor, [long_wave, speech])

    assert batch.windows_per_clip == [2, 1]
    assert batch.tokens_per_clip == ref_tokens
    assert batch.features.shape == ref_features.shape  # a full window: nothing cropped
    assert np.array_equal(batch.mask, ref_mask)
    diff = float(np.abs(batch.features - ref_features).max())
    assert diff <= FEATURE_TOL, f"max abs diff of features {diff:.3g}"


def test_no_clips():
    batch = prepare_clips([])
    assert batch.features.shape == (0, 128, 100) and batch.features.dtype == np.float32
    assert batch.mask.shape == (0, 100) and batch.mask.dtype == np.int32
    assert batch.windows_per_clip == batch.tokens_per_clip == batch.seconds_per_clip == batch.truncated == []


# ---------------------------------------------------------------------------------------------
# decoding


def test_decode_lossless_formats():
    wave = fading_noise(SR // 2) / 4
    ints = np.round(wave * 32768).astype(np.int16)  # libsndfile reads 16-bit PCM as int / 32768
    for fmt, subtype, source, want in [
        ("WAV", "FLOAT", wave, wave),
        ("WAV", "PCM_16", ints, ints / 32768),
        ("FLAC", "PCM_16", ints, ints / 32768),
    ]:
        got = decode_audio(encode(source, SR, fmt, subtype))
        assert got.dtype == np.float32 and got.shape == want.shape, (fmt, subtype)
        assert np.array_equal(got, want.astype(np.float32)), (fmt, subtype)


@pytest.mark.parametrize("fmt, subtype", [("OGG", "VORBIS"), ("MP3", None)])
def test_decode_lossy_formats(fmt, subtype):
    tone = (0.5 * np.sin(2 * np.pi * 440 * np.arange(SR) / SR)).astype(np.float32)
    got = decode_audio(encode(tone, SR, fmt, subtype))
    assert got.dtype == np.float32 and got.shape == tone.shape
    assert np.corrcoef(got, tone)[0, 1] > 0.95


def test_stereo_44k_to_mono_16k():
    rng = np.random.default_rng(3)
    stereo = (rng.standard_normal((44100, 2)) * 0.2).astype(np.float32)  # 1 s
    got = decode_audio(encode(stereo, 44100, "WAV", "FLOAT"))
    want = resample_poly(stereo.mean(axis=1), 160, 441)  # 16000/44100 reduced by their gcd
    assert got.dtype == np.float32 and got.shape == (16000,)
    assert np.array_equal(got, want.astype(np.float32))


def test_decode_reads_in_blocks_exactly(monkeypatch):
    stereo = np.random.default_rng(4).standard_normal((8000, 2)).astype(np.float32) * 0.2
    data = encode(stereo, 8000, "WAV", "FLOAT")
    whole = decode_audio(data)
    monkeypatch.setattr(audio, "_BLOCK_SECONDS", 0.01)  # 80-frame blocks: same samples
    assert np.array_equal(decode_audio(data), whole)
    assert np.array_equal(whole, resample_poly(stereo.mean(axis=1), 2, 1).astype(np.float32))


def bad(data: bytes, match: str, **kwargs):
    with pytest.raises(AudioError, match=match):
        decode_audio(data, **kwargs)


def test_decode_errors():
    bad(b"", r"^empty \(0 bytes\)$")
    bad(b"not audio at all" * 8, r"^could not decode: not a WAV/FLAC/OGG/MP3 stream \(")
    bad(encode(np.zeros(0, np.float32), SR, "WAV"), "^audio has no samples$")
    bad(encode(np.array([0.0, np.nan, 0.0], np.float32), SR, "WAV", "FLOAT"), "non-finite")
    bad(encode(np.zeros(100, np.float32), 500, "WAV"), "sample rate 500 Hz")
    bad(encode(np.zeros(100, np.float32), 400000, "WAV"), "sample rate 400000 Hz")
    bad(encode(np.zeros((10, 33), np.float32), SR, "WAV"), "33 channels")
    too_long = encode(np.zeros(2 * SR, np.float32), SR, "WAV")
    bad(too_long, "audio is 2.0 s long; the limit is 1 s", max_seconds=1)
    bad(encode(np.zeros(100, np.float32), SR, "AIFF"), "unsupported container AIFF")
    with pytest.raises(TypeError):
        decode_audio("/etc/passwd")  # a path is never opened


def test_prepare_clips_errors_name_the_clip(speech_bytes):
    with pytest.raises(AudioError, match=r"^audio clip 1: empty \(0 bytes\)$"):
        prepare_clips([speech_bytes, b""])
    with pytest.raises(AudioError, match=r"^audio clip 0: too short \(320 samples at 16 kHz\).*321"):
        prepare_clips([encode(np.zeros(320, np.float32), SR, "WAV")])


def test_long_clip_is_truncated_not_refused():
    batch = prepare_clips([encode(np.zeros(61 * 8000, np.float32), 8000, "WAV")], max_windows=2)
    assert batch.truncated == [True] and batch.windows_per_clip == [2]
    assert batch.seconds_per_clip == [61.0] and batch.tokens_per_clip == [1500]
