"""A batch of 30-s windows → Whisper log-mel features in one pass on the device (the GPU preprocessing hot path).

Same numbers as af3trt.runtime.stages.audio.log_mel (the CPU reference, itself checked against transformers'
WhisperFeatureExtractor / AudioFlamingo3Processor in tests/test_audio.py), for all windows of a request at once:

    waves [W, 480000] f32 (each window zero-padded to 30 s)
      → torch.stft(n_fft 400, hop 160, periodic Hann, center, reflect)   [W, 201, 3001] complex   (library op)
      → re² + im², last frame dropped                                   [W, 201, 3000]
      → Slaney mel filterbank @ power                                   [W, 128, 3000]           (library matmul)
      → peak = max over the window                                      [W]                      (library reduction)
      → max(log10(max(mel,1e-10)), log10(peak)−8), then (x+4)/4        [W, 128, T]              (fused Triton kernel)
        on the first T frames only: the request's frame bucket (runtime/audio.request_frames), cropped in the same pass

Whisper feature-extractor semantics relied on (transformers, src/transformers/models/whisper/
feature_extraction_whisper.py, `_torch_extract_fbank_features`): STFT with a periodic Hann window of n_fft 400 and
hop 160, magnitudes squared with the last frame dropped, mel filters (slaney scale and norm, 0–8000 Hz, 128 bins)
applied, `clamp(min=1e-10).log10()`, then for a batch the clamp floor is each window's own max − 8.0
(`log_spec.max(dim=2, keepdim=True)[0].max(dim=1, keepdim=True)[0] - 8.0`), then `(log_spec + 4.0) / 4.0`.
AF3's processor pads every window to 30 s before this (so the peak is over the padded window: compute the log-mel on
the full window and crop afterwards — platform.md, "What the kept tokens of a window depend on").

transformers computes the same chain on a GPU when asked (`device="cuda"`) and documents it as matching its CPU
result "with 1e-5 tolerance" (same function's docstring) — cuFFT vs pocketfft rounding.

Precision on the GPU: the mel matmul must run in full fp32. torch's default for fp32 matmuls on CUDA is full precision
(torch.backends.cuda.matmul.allow_tf32 is False by default since torch 1.12; torch.set_float32_matmul_precision
"highest" is the default); nothing in the preprocess process changes it, and the server launcher drops
TORCH_ALLOW_TF32_CUBLAS_OVERRIDE, which would force TF32 (runtime/serve/triton_install.py STUB_ENV_DROP). TF32 (10-bit
mantissa) would move the features by ~1e-4.

Without Triton (not installed, or CPU tensors without TRITON_INTERPRET=1) the epilogue is the torch composition.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from af3trt.runtime.stages import audio, lengths
from af3trt.runtime.stages.lengths import HOP, N_FFT, N_MELS, WINDOW_FRAMES, WINDOW_SAMPLES


NO_TRITON = "use_triton=True needs the optional dependency triton (pip install 'af3trt[gpu-kernels]')"


@lru_cache(maxsize=1)
def triton_kernels():
    """af3trt.kernels._triton, or None without the optional `gpu-kernels` dependency (triton).

    Imported on first use, not with this module: the CPU target's preprocess model imports this module and should not
    pay for importing triton (0.3 s here); and TRITON_INTERPRET is read when the kernels are defined.
    """
    try:
        from af3trt.kernels import _triton
    except ImportError:
        return None
    return _triton


_TRITON_OFF: list[str] = []  # why the kernels were switched off in this process (kernels/check.py warm), if they were


def disable_triton(reason: str) -> None:
    """Use the torch composition from now on in this process (the same results, without the fused kernels)."""
    _TRITON_OFF.append(reason)


def triton_runs_on(t: torch.Tensor) -> bool:
    """Whether the Triton kernels can run on this tensor's device in this process."""
    k = triton_kernels()
    return not _TRITON_OFF and k is not None and (t.is_cuda or k.interpreted())


@lru_cache(maxsize=8)
def _filters(device: torch.device) -> torch.Tensor:
    return audio.mel_filters().to(device)  # [128, 201]


@lru_cache(maxsize=8)
def _hann(device: torch.device) -> torch.Tensor:
    return torch.hann_window(N_FFT, device=device)  # periodic, f32


@torch.no_grad()
def log_mel_windows(waves: torch.Tensor, frames: int = WINDOW_FRAMES, *, use_triton: bool | None = None,
                    block: int | None = None) -> torch.Tensor:
    """waves: [W, 480000] f32, each window zero-padded to 30 s → log-mel [W, 128, frames] f32 on the same device:
    the first `frames` frames of each window's features (the request's frame bucket, runtime/audio.request_frames;
    the clamp still uses the whole window's peak).

    use_triton: None = whenever Triton can run on the device; False forces the torch composition (the perf/ script
    times both). block: the epilogue kernel's elements per program (default 1024; larger in the CPU interpreter,
    where each program costs a Python loop iteration).
    """
    if waves.ndim != 2 or waves.shape[1] != WINDOW_SAMPLES or waves.dtype != torch.float32:
        raise ValueError(f"waves must be f32 [W, {WINDOW_SAMPLES}], got {waves.dtype} {list(waves.shape)}")
    if not 1 <= frames <= WINDOW_FRAMES:
        raise ValueError(f"frames must be in 1..{WINDOW_FRAMES}, got {frames}")
    dev = waves.device
    spec = torch.stft(waves, N_FFT, HOP, window=_hann(dev), center=True, pad_mode="reflect",
                      return_complex=True)  # [W, 201, 3001]
    spec = spec[..., :WINDOW_FRAMES]  # [W, 201, 3000]
    power = spec.real.square() + spec.imag.square()  # |X|^2 as runtime/stages/audio.py computes it (no sqrt); contiguous
    mel = torch.matmul(_filters(dev), power)  # [W, 128, 3000]
    peak = mel.amax(dim=(1, 2)) if len(mel) else mel.new_zeros(0)  # [W]
    if use_triton is None:
        use_triton = triton_runs_on(mel)
    if not use_triton:
        log = mel.clamp_(min=1e-10).log10_()
        floor = peak.clamp(min=1e-10).log10() - 8.0
        return torch.maximum(log[..., :frames], floor[:, None, None]).add_(4.0).div_(4.0)
    if triton_kernels() is None:
        raise RuntimeError(NO_TRITON)
    out = mel.new_empty((mel.shape[0], N_MELS, frames))  # [W, 128, frames]
    if block is None:
        block = 1024 if mel.is_cuda else 65536
    triton_kernels().logmel_epilogue(mel, peak, out, block=block)
    return out


def pad_windows(chunks: list[np.ndarray], device: torch.device) -> torch.Tensor:
    """Chunks (mono f32, at most 480000 samples each) → [W, 480000] on `device`, zero-padded.

    The samples cross to the device once, concatenated; the padding is made there.
    """
    for c in chunks:
        if c.ndim != 1 or len(c) > WINDOW_SAMPLES:
            raise ValueError(f"a chunk is mono with at most {WINDOW_SAMPLES} samples, got {c.shape}")
    waves = torch.zeros((len(chunks), WINDOW_SAMPLES), dtype=torch.float32, device=device)  # [W, 480000]
    if chunks:
        flat = torch.from_numpy(np.ascontiguousarray(np.concatenate(chunks), np.float32)).to(device)  # [Σn]
        start = 0
        for i, c in enumerate(chunks):
            waves[i, : len(c)] = flat[start : start + len(c)]
            start += len(c)
    return waves


def log_mel(chunks: list[np.ndarray], frames: int = WINDOW_FRAMES, device: torch.device | str = "cuda"
            ) -> tuple[torch.Tensor, np.ndarray]:
    """Drop-in for af3trt.runtime.stages.audio.log_mel with the features left on `device`.

    Returns features [W, 128, frames] f32 (torch, on device) and mask [W, frames] int32 (numpy; 1 on frames holding
    samples — host arithmetic from runtime/stages/lengths.py, nothing to compute on the device).
    """
    device = torch.device(device)
    if not 1 <= frames <= WINDOW_FRAMES:
        raise ValueError(f"frames must be in 1..{WINDOW_FRAMES}, got {frames}")
    mask = np.zeros((len(chunks), frames), np.int32)
    for i, c in enumerate(chunks):
        mask[i, : lengths.valid_frames(len(c))] = 1
    if not chunks:
        return torch.zeros((0, N_MELS, frames), dtype=torch.float32, device=device), mask
    return log_mel_windows(pad_windows(chunks, device), frames), mask
