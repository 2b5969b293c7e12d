"""AF3's audio front end for serving: bytes → mono 16 kHz → 30-s windows → log-mel features + mask.

Produces what AudioFlamingo3Processor produces (input_features, input_features_mask, the number of
<sound> tokens) without importing transformers, which the serving container may not have, cropped to the
frame bucket of the request's longest window (request_frames): the encoder's kept tokens depend only on a
window's first L+2 frames, so its cost follows the valid audio (runtime/stages/lengths.py). The crop is of the
full-window log-mel (the clamp uses the whole 30-s window's maximum); log_mel computes only the frames that
differ from the window's constant padding value, which is what makes it cheap for short clips.
Only bytes are decoded: no path or URL is ever opened.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator

import numpy as np
import soundfile as sf

from af3trt.runtime.stages import audio_cache, lengths
from af3trt.runtime.stages.errors import InvalidRequest
from af3trt.runtime.stages.resample import StreamResampler
from af3trt.runtime.stages.lengths import HOP, N_FFT, N_MELS, SAMPLE_RATE, WINDOW_FRAMES, WINDOW_SAMPLES

# Refusal limits (client errors, checked from the header before decoding and again while decoding).
MAX_CLIP_SECONDS = 3600.0
MIN_SAMPLE_RATE = 1000
MAX_SAMPLE_RATE = 384000
MAX_CHANNELS = 32
# libsndfile containers we accept (soundfile's format names).
ACCEPTED_FORMATS = frozenset({"WAV", "WAVEX", "RF64", "FLAC", "OGG", "MP3"})

_BLOCK_SECONDS = 30
# At most this many float32 source values (all channels) are decoded at a time: 16 MB.
DECODE_BLOCK_VALUES = 1 << 22


class AudioError(InvalidRequest):
    """The client sent audio we cannot use; the message says why (and which clip)."""


# ---------------------------------------------------------------------------------------------
# decoding


@dataclass
class DecodedClip:
    wave: np.ndarray  # float32 [n] mono 16 kHz, at most keep_samples long
    seconds: float  # the clip's duration: decoded, or the header's when decoding stopped early
    truncated: bool  # decoding stopped at keep_samples; the rest of the stream was never decoded


def decode_audio(data: bytes, *, max_seconds: float = MAX_CLIP_SECONDS) -> np.ndarray:
    """Decode a WAV/FLAC/OGG/MP3 byte stream to float32 [n] mono at 16 kHz (channels averaged), all of it."""
    return decode_clip(data, None, max_seconds=max_seconds).wave


def decode_clip(data: bytes, keep_samples: int | None, *, max_seconds: float = MAX_CLIP_SECONDS) -> DecodedClip:
    """Decode at most the first keep_samples (at 16 kHz) of a clip, resampling block by block as it is read.

    Memory bound (per clip): the encoded bytes, one block of DECODE_BLOCK_VALUES float32 source samples (all
    channels), and the kept 16-kHz output (keep_samples float32: 38.4 MB for AF3's 600 s) — whatever length the
    file claims. Decoding stops once the kept samples are final; the samples equal those of decoding the whole
    stream and resampling it with scipy's resample_poly, then cutting."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"decode_audio takes the encoded bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise AudioError("empty (0 bytes)")
    stream = open_audio(io.BytesIO(data), max_seconds)
    with stream:
        rate = stream.samplerate
        wave, read, stopped = _read_mono_16k(stream, _block(stream), int(max_seconds * rate), max_seconds,
                                             keep_samples)
        claimed = stream.frames if 0 < stream.frames < 2**62 else read
    if read == 0:
        raise AudioError("audio has no samples")
    return DecodedClip(wave, max(claimed, read) / rate if stopped else read / rate, stopped)


def _read_mono_16k(stream: sf.SoundFile, block: int, max_frames: int, max_seconds: float,
                   keep: int | None) -> tuple[np.ndarray, int, bool]:
    """Read block by block, averaging channels and resampling per block; stop once `keep` outputs are final.

    Returns (wave [<= keep] float32, source frames read, stopped early)."""
    rate = stream.samplerate
    resampler = StreamResampler(rate, SAMPLE_RATE) if rate != SAMPLE_RATE else None
    # Source frames that fix the first `keep` outputs (the filter reaches a little past them).
    need = None if keep is None else (keep if resampler is None else resampler.inputs_needed(keep))
    parts: list[np.ndarray] = []
    total = 0
    while need is None or total < need:
        mono = _read_mono(stream, block if need is None else min(block, need - total), total, max_frames,
                          max_seconds)
        if mono is None:
            break
        total += len(mono)
        parts.append(mono if resampler is None else resampler.feed(mono))
    stopped = need is not None and total >= need and len(stream.read(1, dtype="float32")) > 0
    if resampler is not None and not stopped:
        parts.append(resampler.finish())
    wave = np.concatenate(parts) if parts else np.zeros(0, np.float32)
    if keep is not None and len(wave) > keep:
        wave = wave[:keep]
        stopped = True
    return wave, total, stopped


def open_audio(source, max_seconds: float = MAX_CLIP_SECONDS) -> sf.SoundFile:
    """Open an encoded stream (bytes in a BytesIO, or a file object such as an upload spooled to disk) and check its
    header: container, sample rate, channels, and the claimed length against max_seconds."""
    try:
        stream = sf.SoundFile(source)
    except (sf.SoundFileError, RuntimeError) as e:
        raise AudioError(f"could not decode: not a WAV/FLAC/OGG/MP3 stream ({_reason(e)})") from e
    rate, channels = stream.samplerate, stream.channels
    problem = None
    if stream.format not in ACCEPTED_FORMATS:
        problem = f"could not decode: unsupported container {stream.format} (send WAV, FLAC, OGG or MP3)"
    elif not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        problem = f"sample rate {rate} Hz is outside {MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} Hz"
    elif not 1 <= channels <= MAX_CHANNELS:
        problem = f"{channels} channels; at most {MAX_CHANNELS} are accepted"
    elif stream.frames > int(max_seconds * rate):
        problem = f"audio is {stream.frames / rate:.1f} s long; the limit is {max_seconds:g} s"
    if problem:
        stream.close()
        raise AudioError(problem)
    return stream


def _block(stream: sf.SoundFile) -> int:
    return max(1, min(int(stream.samplerate * _BLOCK_SECONDS), DECODE_BLOCK_VALUES // stream.channels))


def _read_mono(stream: sf.SoundFile, n: int, total: int, max_frames: int, max_seconds: float) -> np.ndarray | None:
    """The next at most n source frames, channels averaged: [t] float32; None at the end of the stream."""
    try:
        frames = stream.read(n, dtype="float32", always_2d=True)  # [t, C]
    except (sf.SoundFileError, RuntimeError) as e:
        raise AudioError(f"could not decode: corrupt stream ({_reason(e)})") from e
    if len(frames) == 0:
        return None
    if total + len(frames) > max_frames:  # the header undercounted
        raise AudioError(f"audio is longer than the limit of {max_seconds:g} s")
    if not np.isfinite(frames).all():
        raise AudioError("audio has non-finite samples (NaN or Inf)")
    return frames[:, 0].copy() if frames.shape[1] == 1 else frames.mean(axis=1)


def iter_mono_16k(stream: sf.SoundFile, max_seconds: float = MAX_CLIP_SECONDS) -> Iterator[np.ndarray]:
    """The whole of an opened stream (open_audio) as mono 16-kHz float32 blocks, one decode block at a time: memory
    holds one block whatever the file's length (long-form transcription reads a 3-hour upload this way). The
    blocks' concatenation equals decode_audio of the same bytes."""
    rate = stream.samplerate
    resampler = StreamResampler(rate, SAMPLE_RATE) if rate != SAMPLE_RATE else None
    block, max_frames, total = _block(stream), int(max_seconds * rate), 0
    while (mono := _read_mono(stream, block, total, max_frames, max_seconds)) is not None:
        total += len(mono)
        out = mono if resampler is None else resampler.feed(mono)
        if len(out):
            yield out
    if total == 0:
        raise AudioError("audio has no samples")
    if resampler is not None:
        tail = resampler.finish()
        if len(tail):
            yield tail


def _reason(e: Exception) -> str:
    return getattr(e, "error_string", None) or str(e)


# ---------------------------------------------------------------------------------------------
# windows


def split_windows(wave: np.ndarray, max_windows: int = lengths.MAX_WINDOWS) -> tuple[list[np.ndarray], bool]:
    """Cut a mono 16-kHz clip into 30-s chunks (last one partial), keeping at most max_windows."""
    counts = lengths.window_sample_counts(len(wave), max_windows)
    _, truncated = lengths.window_count(len(wave), max_windows)
    return [wave[i * WINDOW_SAMPLES : i * WINDOW_SAMPLES + n] for i, n in enumerate(counts)], truncated


# ---------------------------------------------------------------------------------------------
# log-mel features


@lru_cache(maxsize=1)
def mel_filters() -> torch.Tensor:
    """Slaney-scale, Slaney-normalised triangular filters over 0..8000 Hz: [N_MELS, N_FFT//2+1] float32."""
    fft_hz = np.linspace(0.0, SAMPLE_RATE / 2, N_FFT // 2 + 1)  # [201]
    mel_edges = np.linspace(_hz_to_mel(0.0), _hz_to_mel(SAMPLE_RATE / 2), N_MELS + 2)
    hz_edges = _mel_to_hz(mel_edges)  # [130]
    width = np.diff(hz_edges)  # [129]
    to_edge = hz_edges[None, :] - fft_hz[:, None]  # [201, 130]
    rising = -to_edge[:, :-2] / width[:-1]
    falling = to_edge[:, 2:] / width[1:]
    tri = np.maximum(0.0, np.minimum(rising, falling))  # [201, 128]
    tri *= 2.0 / (hz_edges[2:] - hz_edges[:-2])  # equal area per filter
    import torch

    return torch.from_numpy(tri.T.astype(np.float32)).contiguous()


_F_SP = 200.0 / 3  # Hz per mel in the linear part
_LOG_HZ = 1000.0  # where the log part starts
_LOG_MEL = _LOG_HZ / _F_SP  # 15 mel
_LOG_STEP = math.log(6.4) / 27.0


def _hz_to_mel(hz):
    hz = np.asarray(hz, dtype=np.float64)
    linear = hz / _F_SP
    log = _LOG_MEL + np.log(np.maximum(hz, _LOG_HZ) / _LOG_HZ) / _LOG_STEP
    return np.where(hz >= _LOG_HZ, log, linear)


def _mel_to_hz(mel):
    mel = np.asarray(mel, dtype=np.float64)
    linear = mel * _F_SP
    log = _LOG_HZ * np.exp(_LOG_STEP * (np.maximum(mel, _LOG_MEL) - _LOG_MEL))
    return np.where(mel >= _LOG_MEL, log, linear)


@lru_cache(maxsize=1)
def _hann() -> torch.Tensor:
    import torch

    return torch.hann_window(N_FFT)  # periodic, float32


def request_frames(chunks: list[np.ndarray]) -> int:
    """Frames T a request's windows are cropped to: the largest frame bucket of its windows (lengths.frame_bucket
    of each window's valid frames); the shorter windows are padded to it (their mask says how much). No window:
    the smallest bucket."""
    return max((lengths.frame_bucket(lengths.valid_frames(len(c))) for c in chunks), default=lengths.FRAME_BUCKETS[0])


def log_mel(chunks: list[np.ndarray], frames: int = WINDOW_FRAMES) -> tuple[np.ndarray, np.ndarray]:
    """Whisper log-mel of each chunk zero-padded to 30 s, cropped to its first `frames` frames.

    Returns features [W, 128, frames] float32 and mask [W, frames] int32 (1 on frames holding samples).
    frames = 3000 is the full window (what AudioFlamingo3Processor returns); serving passes request_frames(chunks).
    """
    if not 1 <= frames <= WINDOW_FRAMES:
        raise ValueError(f"frames must be in 1..{WINDOW_FRAMES}, got {frames}")
    import torch  # here, not at import: the OpenAI front decodes audio with this module and never needs torch

    n = len(chunks)
    features = np.empty((n, N_MELS, frames), np.float32)
    mask = np.zeros((n, frames), np.int32)
    for i, chunk in enumerate(chunks):
        if chunk.ndim != 1 or len(chunk) > WINDOW_SAMPLES:
            raise ValueError(f"a chunk is mono with at most {WINDOW_SAMPLES} samples, got {chunk.shape}")
        mask[i, : lengths.valid_frames(len(chunk))] = 1
        with torch.no_grad():
            features[i] = _log_mel_padded(torch.from_numpy(np.ascontiguousarray(chunk, np.float32)), frames).numpy()
    return features, mask


def _log_mel_padded(chunk: torch.Tensor, frames: int = WINDOW_FRAMES) -> torch.Tensor:
    """chunk: [n] float32, n <= 480000 → [128, frames]: the first `frames` frames of the log-mel of the chunk
    zero-padded to 30 s.

    Only the frames that can see a sample are transformed. Frame t covers samples [160 t - 200, 160 t + 200) of
    the padded window (reflect-padded at its ends), so with a prefix of n + 400 samples every frame the STFT
    returns equals the full window's frame (its reflected tail is zeros, as the window's is) and every later
    frame of the full window is all zeros: power 0, mel 0, log10 clamped to -10, the smallest value a frame can
    have. So the window's peak is the peak of the transformed frames, and every later frame's feature is the
    constant (max(-10, peak - 8) + 4) / 4: filled in, not computed. Equal to transforming the padded window
    (bit for bit up to the mel product's summation order over fewer columns).
    """
    import torch

    n = chunk.shape[0]
    k = n + N_FFT if n + N_FFT < WINDOW_SAMPLES else WINDOW_SAMPLES
    wave = torch.zeros(1, k)  # [1, k]
    wave[0, :n] = chunk
    spec = torch.stft(wave, N_FFT, HOP, window=_hann(), center=True, pad_mode="reflect", return_complex=True)
    f = min(spec.shape[-1], WINDOW_FRAMES)  # the full window's last frame (3000) is dropped
    spec = spec[0, :, :f]  # [201, f] complex
    power = spec.real.square() + spec.imag.square()  # |X|^2; 5x faster than complex abs() ** 2 on one thread
    log = (mel_filters() @ power).clamp_(min=1e-10).log10_()  # [128, f]
    peak = log.amax()  # the window's: its other frames are at -10, the floor
    floor = torch.clamp(peak - 8.0, min=-10.0)
    out = torch.empty(N_MELS, frames)  # [128, frames]
    kept = min(f, frames)
    out[:, :kept] = torch.maximum(log[:, :kept], peak - 8.0)
    out[:, kept:] = floor  # zero-power frames: max(-10, peak - 8)
    return out.add_(4.0).div_(4.0)


# ---------------------------------------------------------------------------------------------
# a request's clips


@dataclass
class AudioBatch:
    features: np.ndarray  # [W_total, 128, T] float32, the clips' windows in order, cropped to T (request_frames);
    #                       a torch tensor on the device with log_mel_fn=af3trt.kernels.logmel.log_mel
    mask: np.ndarray  # [W_total, T] int32
    windows_per_clip: list[int]
    tokens_per_clip: list[int]  # <sound> tokens each clip expands to
    seconds_per_clip: list[float]  # decoded duration, before AF3's truncation
    truncated: list[bool]  # clip was longer than max_windows * 30 s; only the start is used
    keys: np.ndarray  # [W_total, 2] uint64: each window's key (audio_cache.content_keys: its samples and T)


def truncation_notice(index: int, seconds: float, limit: float) -> str:
    """What a request is told when a clip is longer than the audio AF3 reads (limit: seconds)."""
    return (f"audio clip {index}: {seconds:.1f} s is longer than the {limit:g} s AF3 reads; only the first {limit:g} s "
            "were used")


def featurize(chunks: list[np.ndarray], frames: int, keys: np.ndarray, log_mel_fn=log_mel,
              cache: audio_cache.LruBytes | None = None) -> tuple[np.ndarray, np.ndarray]:
    """log_mel_fn(chunks, frames), with each window's row taken from `cache` under its key when there and the rows
    computed put there (host features only: the numpy log-mel). Equal to log_mel_fn(chunks, frames) row for row."""
    if cache is None or not chunks:
        return log_mel_fn(chunks, frames)
    names = [b"w" + audio_cache.key_bytes(k) for k in keys]  # b"w": apart from the request digests in the same cache
    rows = [cache.get(n) for n in names]
    todo = [i for i, row in enumerate(rows) if row is None]
    if todo:
        features, mask = log_mel_fn([chunks[i] for i in todo], frames)  # [n, 128, T], [n, T]
        for j, i in enumerate(todo):
            rows[i] = (features[j].copy(), mask[j].copy())  # its own copy: the entry holds one window
            cache.put(names[i], rows[i])
    return np.stack([f for f, _ in rows]), np.stack([m for _, m in rows])


def prepare_clips(clips: list[bytes], max_windows: int = lengths.MAX_WINDOWS, crop: bool = True,
                  log_mel_fn=log_mel, window_cache: audio_cache.LruBytes | None = None) -> AudioBatch:
    """Decode, window and featurise a request's clips; AudioError messages name the clip index.
    crop=False: full 30-s windows (3000 frames) instead of the request's frame bucket.
    log_mel_fn: (chunks, frames) → (features, mask) like log_mel; the GPU target passes af3trt.kernels.logmel.log_mel
    bound to its device (features then stay a torch tensor on that device).
    window_cache: log-mel rows of windows seen before, by content key (featurize)."""
    chunks: list[np.ndarray] = []
    windows, tokens, seconds, truncated = [], [], [], []
    for index, data in enumerate(clips):
        try:
            clip = decode_clip(data, max_windows * WINDOW_SAMPLES)  # never more than AF3 reads
            wave = clip.wave
            n_tokens = lengths.audio_tokens_for_samples(len(wave), max_windows)
            if n_tokens == 0:
                raise AudioError(
                    f"too short ({len(wave)} samples at 16 kHz): AF3 needs at least "
                    f"{lengths.min_samples_with_tokens()} to produce an audio token"
                )
        except AudioError as e:
            raise AudioError(f"audio clip {index}: {e}") from e
        clip_chunks, clip_truncated = split_windows(wave, max_windows)
        chunks += clip_chunks
        windows.append(len(clip_chunks))
        tokens.append(n_tokens)
        seconds.append(clip.seconds)
        truncated.append(clip_truncated or clip.truncated)
    frames = request_frames(chunks) if crop else WINDOW_FRAMES
    keys = audio_cache.content_keys(chunks, frames)
    features, mask = featurize(chunks, frames, keys, log_mel_fn, window_cache)
    return AudioBatch(features, mask, windows, tokens, seconds, truncated, keys)
