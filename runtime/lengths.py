"""AF3's audio length arithmetic: samples → 30-s windows → mel frames → audio tokens.

The one home of these numbers. Export, preprocessing, fusion and tests import them from here;
nothing else recomputes them. Pure Python, no numpy/torch/transformers, so any process can import it.

The chain, per clip of n samples at 16 kHz:
  windows   n_win = max(1, ceil(n / 480000)), capped at MAX_WINDOWS (the rest is dropped: "truncated")
  frames    each window is zero-padded to 30 s; its valid mel frames are ceil(samples_in_window / 160)
            (the feature extractor's attention mask is the sample mask sampled every HOP samples)
  tokens    L = valid frames summed over the clip's windows;
            conv = (L - 1) // 2 + 1   (encoder conv, stride 2)
            post = (conv - 2) // 2 + 1 (avg-pool, stride 2) — the number of <sound> tokens.
The encoder applies the same formula per window to pick the valid rows of its [750, H] output;
since every window but the last is full (3000 frames → 750 rows), the per-window counts sum to the
clip's count (see embeds_valid_per_window).
"""

from __future__ import annotations

# Feature-extractor facts (WhisperFeatureExtractor as configured for AF3).
SAMPLE_RATE = 16000
HOP = 160
N_FFT = 400
N_MELS = 128
WINDOW_SECONDS = 30
MAX_AUDIO_SECONDS = 600  # AudioFlamingo3Processor.max_audio_len

# Derived.
WINDOW_SAMPLES = SAMPLE_RATE * WINDOW_SECONDS  # 480000
WINDOW_FRAMES = WINDOW_SAMPLES // HOP  # 3000
MAX_WINDOWS = MAX_AUDIO_SECONDS // WINDOW_SECONDS  # 20


def audio_token_count(valid_frames: int) -> int:
    """Tokens (= valid encoder rows) for `valid_frames` mel frames; works elementwise on int arrays too."""
    conv = (valid_frames - 1) // 2 + 1
    return (conv - 2) // 2 + 1


EMBEDS_PER_WINDOW = audio_token_count(WINDOW_FRAMES)  # 750


def embeds_valid_per_window(mask_sum: int) -> int:
    """Valid rows of one window's [EMBEDS_PER_WINDOW, H] encoder output, given that window's mask sum.

    The model masks each window with this (its `post_lengths`); for a clip, the sum over its windows
    equals audio_token_count of the summed frames, because all windows but the last are full.
    """
    return audio_token_count(mask_sum)


def window_count(n_samples: int, max_windows: int = MAX_WINDOWS) -> tuple[int, bool]:
    """(windows used, whether the clip was cut to max_windows). An empty clip still takes one window."""
    if n_samples < 0 or max_windows < 1:
        raise ValueError(f"bad lengths: n_samples={n_samples}, max_windows={max_windows}")
    n_windows = max(1, -(-n_samples // WINDOW_SAMPLES))
    if n_windows > max_windows:
        return max_windows, True
    return n_windows, False


def valid_frames(n_samples_in_window: int) -> int:
    """Mask sum of one window holding this many samples (padded to 30 s): ceil(n / HOP), at most 3000."""
    if not 0 <= n_samples_in_window <= WINDOW_SAMPLES:
        raise ValueError(f"a window holds 0..{WINDOW_SAMPLES} samples, got {n_samples_in_window}")
    return -(-n_samples_in_window // HOP)


def window_sample_counts(n_samples: int, max_windows: int = MAX_WINDOWS) -> list[int]:
    """Samples in each window of the clip: all full but the last; what lies beyond the cap is dropped."""
    n_windows, _ = window_count(n_samples, max_windows)
    kept = min(n_samples, n_windows * WINDOW_SAMPLES)
    return [min(WINDOW_SAMPLES, kept - i * WINDOW_SAMPLES) for i in range(n_windows)]


def frames_per_window(n_samples: int, max_windows: int = MAX_WINDOWS) -> list[int]:
    """Valid mel frames of each window of the clip (the rows of input_features_mask summed)."""
    return [valid_frames(s) for s in window_sample_counts(n_samples, max_windows)]


def audio_tokens_for_samples(n_samples: int, max_windows: int = MAX_WINDOWS) -> int:
    """<sound> tokens AF3 gives a clip of n_samples at 16 kHz (after truncation to max_windows)."""
    return audio_token_count(sum(frames_per_window(n_samples, max_windows)))


def min_samples_with_tokens() -> int:
    """Shortest clip (in 16-kHz samples) that yields at least one audio token (321: three frames)."""
    frames = 1
    while audio_token_count(frames) < 1:
        frames += 1
    return (frames - 1) * HOP + 1
