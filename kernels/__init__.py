"""GPU preprocessing kernels: the log-mel of a batch of windows and the prompt-table build, on the device.

    logmel.py   windows → Whisper log-mel [W, 128, 3000] (torch.stft + mel matmul + one fused Triton epilogue)
    table.py    encoder output [W, R, H] → prompt table [1, N, H] in the decoder dtype (one Triton gather+cast)
    _triton.py  the two OpenAI Triton kernels (optional dependency group `gpu-kernels`)

The preprocess and fusion models take this path when their parameters say gpu_kernels (runtime/stages/params.py;
rendered on for the GPU target, off for CPU: triton_repo/configs.py RepoSpec.gpu_kernels) and CUDA is there; otherwise
they keep the CPU path (runtime/stages/audio.py, runtime/stages/prompt.py), which is also the reference the kernels
are tested against (tests/test_kernels.py, on CPU through Triton's interpreter). `kernels_device` ("cuda" by default)
names the device; "cpu" runs the same code path on CPU tensors (tests, with TRITON_INTERPRET=1).
"""

from __future__ import annotations

import logging

log = logging.getLogger("af3trt")


def device_of(gpu_kernels: bool, kernels_device: str, model: str):
    """The device the model's GPU path runs on (torch.device), or None for the CPU path: asked for (gpu_kernels
    off), or the fallback without CUDA. gpu_kernels, kernels_device: the model's parameters (its record in
    runtime/stages/params.py); model: its name, for the log line. Imports torch only when the GPU path is asked for:
    the CPU target's fusion model never needs torch (its table is numpy, f32 on the CPU reference)."""
    if not gpu_kernels:
        return None
    import torch

    device = torch.device(kernels_device)
    if device.type == "cuda" and not torch.cuda.is_available():
        log.warning("%s: gpu_kernels is on but CUDA is not available in this process; using the CPU path", model)
        return None
    return device
