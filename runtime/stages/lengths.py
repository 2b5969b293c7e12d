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
The encoder applies the same formula per window to pick the valid rows of its [rows, H] output;
since every window but the last is full (3000 frames → 750 rows), the per-window counts sum to the
clip's count (see embeds_valid_per_window).

Frame buckets (what the encoder computes, not what AF3 reads): the kept tokens of a window with L valid
frames depend only on its mel frames [0, L+2) (conv1 k=3 pad 1; conv2 k=3 stride 2 pad 1; avg-pool 2 over
conv positions that are all valid; attention masked to the valid positions). So a window is sent to the
encoder cropped to T = frame_bucket(L) frames, the smallest bucket >= L+2 (3000 when L+2 > 3000), and the
encoder runs on T frames with the positional embedding sliced to T/2: its first
embeds_valid_per_window(L) rows equal the full window's. Buckets are multiples of FRAME_BUCKET_STEP
frames (1 s), so T/2 positions and T/4 rows stay whole and the set of shapes Triton and TensorRT see
stays small (30). The log-mel is still computed on the full 30-s window (its clamp uses the window's
maximum) and cropped afterwards.
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


# The encoder's frame axis: every window is cropped to one of these (1 s steps, up to the full 30 s).
FRAME_BUCKET_STEP = 100
FRAME_BUCKETS = tuple(range(FRAME_BUCKET_STEP, WINDOW_FRAMES + 1, FRAME_BUCKET_STEP))  # 100, 200, …, 3000
# Frames a kept token can depend on beyond the valid ones (conv1's right tap, then conv2's).
CROP_MARGIN = 2


def frame_bucket(valid: int) -> int:
    """Frames the encoder runs a window with `valid` mel frames on: the smallest bucket >= valid + 2
    (the full window when that passes 3000). A window without a valid frame (a text-only placeholder)
    takes the smallest bucket."""
    if not 0 <= valid <= WINDOW_FRAMES:
        raise ValueError(f"a window has 0..{WINDOW_FRAMES} valid frames, got {valid}")
    need = min(valid + CROP_MARGIN, WINDOW_FRAMES)
    return -(-need // FRAME_BUCKET_STEP) * FRAME_BUCKET_STEP if need > 0 else FRAME_BUCKETS[0]


def encoder_rows(frames: int) -> int:
    """Rows of the encoder's output for a window of `frames` mel frames (conv stride 2, avg-pool 2):
    750 for the full 3000, frames // 4 for every bucket."""
    if frames < 2 or frames % 2:
        raise ValueError(f"the encoder takes an even number of frames >= 2, got {frames}")
    return frames // 4


def encoded_frames_for_samples(n_samples: int, max_windows: int = MAX_WINDOWS) -> list[int]:
    """Frames the encoder computes for each window of a clip (its bucket): what encoder cost follows."""
    return [frame_bucket(f) for f in frames_per_window(n_samples, max_windows)]


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
