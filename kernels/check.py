"""The OpenAI Triton kernels compiled, warmed and checked on their device before a model serves, and the
features-vs-CPU check of `af3trt gpu-check`.

`triton.jit` kernels compile on their first launch (triton/runtime/jit.py: JITFunction.run compiles on a cache
miss). The serving image has another Triton than the one this project is tested with: tensorrtllm_backend r26.04
dockerfile/Dockerfile.triton.trt_llm_backend copies pytorch_triton 3.5.1+nv25.12 into the container; here 3.9. A
kernel that fails to compile there would leave preprocess and fusion READY while every audio request fails. So
their initialize() calls warm(): each kernel runs once on small inputs and is compared with the torch composition;
an exception or a mismatch switches the kernels off for the process (logmel.disable_triton: the torch path, same
results) and the reason is returned for the model's log.
"""

from __future__ import annotations

import numpy as np
import torch

from af3trt.kernels import logmel, table
from af3trt.runtime.stages import audio, lengths

FEATURE_TOL = 1e-5  # log-mel, kernel vs torch composition on one device (tests/test_kernels.py measures 1.2e-7)
# GPU (cuFFT) vs the CPU reference (pocketfft): transformers documents its GPU Whisper features as matching its CPU
# result "with 1e-5 tolerance" (feature_extraction_whisper.py, _torch_extract_fbank_features); with our fused
# epilogue on top we allow ten times that before gpu-check fails.
GPU_VS_CPU_TOL = 1e-4


def _warm_inputs(device: torch.device):
    rng = np.random.default_rng(0)
    waves = torch.from_numpy(rng.standard_normal((2, lengths.WINDOW_SAMPLES)).astype(np.float32)).to(device)
    waves[1, 16000:] = 0  # a second window holding 1 s
    embeds = torch.from_numpy(rng.standard_normal((2, 8, 64)).astype(np.float32)).to(device)  # [W, R, H]
    return waves, embeds


def compare(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Run both kernels with Triton and with torch on `device`: {"logmel_max_abs": float, "table_equal": bool}.
    Raises what the Triton path raises (a compile error, a launch failure)."""
    waves, embeds = _warm_inputs(device)
    frames = lengths.FRAME_BUCKETS[0]
    fused = logmel.log_mel_windows(waves, frames, use_triton=True)
    plain = logmel.log_mel_windows(waves, frames, use_triton=False)
    rows = [8, 3]
    t_fused = table.prompt_table(embeds, rows, dtype, use_triton=True)
    t_plain = table.prompt_table(embeds, rows, dtype, use_triton=False)
    return {"logmel_max_abs": float((fused - plain).abs().max()), "table_equal": bool(torch.equal(t_fused, t_plain))}


def warm(device: torch.device | None) -> str | None:
    """Compile and check the kernels on `device` before serving. None when they run and agree (or are not used
    there); else why they are now off in this process."""
    if device is None or not logmel.triton_runs_on(torch.empty(0, device=device)):
        return None
    try:
        got = compare(device)
    except Exception as e:  # noqa: BLE001 - any failure of the Triton path means: serve with torch
        reason = f"the Triton kernels failed on {device}: {type(e).__name__}: {e}"
    else:
        if got["logmel_max_abs"] <= FEATURE_TOL and got["table_equal"]:
            return None
        reason = (f"the Triton kernels disagree with torch on {device} (log-mel max |diff| "
                  f"{got['logmel_max_abs']:.2e} > {FEATURE_TOL:.0e}, or the table differs)")
    logmel.disable_triton(reason)
    return reason


def features_vs_cpu(clip: bytes, device: torch.device | str = "cuda") -> dict:
    """gpu-check: the preprocess model's device path (kernels.logmel.log_mel) against the CPU reference
    (runtime/audio.log_mel) on one encoded clip. {"max_abs": float, "passed": bool, "triton": bool}."""
    device = torch.device(device)
    warm_reason = warm(device)
    dev = audio.prepare_clips([clip], log_mel_fn=lambda c, f: logmel.log_mel(c, f, device=device))
    ref = audio.prepare_clips([clip])
    got = dev.features.cpu().numpy() if isinstance(dev.features, torch.Tensor) else dev.features
    max_abs = float(np.abs(got - ref.features).max())
    return {"max_abs": max_abs, "passed": max_abs <= GPU_VS_CPU_TOL and got.shape == ref.features.shape,
            "triton": warm_reason is None and logmel.triton_runs_on(torch.empty(0, device=device)),
            "note": warm_reason}
