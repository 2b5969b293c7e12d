"""GPU acceptance: build both engines, serve the GPU ensemble on Triton, compare greedy tokens with the CPU
reference. Runs only on a machine with an NVIDIA GPU, TensorRT 10.14 and trtllm-build (docker/Dockerfile):

    pytest tests/test_gpu_acceptance.py -m gpu -s
    AF3TRT_REAL_CHECKPOINT=/data/audio-flamingo-3-hf pytest tests/test_gpu_acceptance.py -m gpu -s

Exact equality is asserted only where the numerics allow it (tiny model, bf16 engine vs bf16 reference, first
tokens); the agreement over the whole answer is printed.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from af3trt.build.gpu import detect_gpu

GPU = detect_gpu()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(GPU is None, reason="needs an NVIDIA GPU (nvidia-smi found none)"),
    pytest.mark.skipif(shutil.which("trtllm-build") is None, reason="needs a GPU host with trtllm-build "
                       "(TensorRT-LLM 1.2; see docker/Dockerfile)"),
]

PROMPT, MAX_TOKENS = "What is said in the audio?", 16


def checkpoints(tiny_ckpt):
    yield "tiny", tiny_ckpt
    real = os.environ.get("AF3TRT_REAL_CHECKPOINT")
    if real:
        yield "real", Path(real)


def cpu_reference(ckpt: Path, clip: bytes) -> list[int]:
    import io

    import soundfile as sf
    import torch
    from transformers import AudioFlamingo3ForConditionalGeneration, AutoProcessor

    wave, sr = sf.read(io.BytesIO(clip), dtype="float32")
    processor = AutoProcessor.from_pretrained(ckpt)
    model = AudioFlamingo3ForConditionalGeneration.from_pretrained(ckpt, dtype=torch.bfloat16).eval()
    conv = [{"role": "user", "content": [{"type": "audio", "audio": wave}, {"type": "text", "text": PROMPT}]}]
    inputs = processor.apply_chat_template(conv, tokenize=True, return_dict=True, add_generation_prompt=True)
    inputs["input_features"] = inputs["input_features"].to(torch.bfloat16)
    end = model.generation_config.eos_token_id
    end = end[0] if isinstance(end, list) else end
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False, eos_token_id=end)
    ids = out[0, inputs["input_ids"].shape[1]:].tolist()
    return ids[:-1] if ids and ids[-1] == end else ids


@pytest.mark.parametrize("precision", ["bf16", "fp8" if GPU and GPU.sm >= 89 else "int8_wo"])
def test_gpu_ensemble_matches_cpu_reference(tiny_ckpt, tmp_path_factory, speech_bytes, precision):
    from af3trt.build.build_engines import BuildOptions, build
    from af3trt.build.gpu_build import GpuOptions
    from af3trt.runtime.client import AF3Client
    from af3trt.runtime.server import TritonServer

    for name, ckpt in checkpoints(tiny_ckpt):
        out = tmp_path_factory.mktemp(f"gpu-{name}") / precision
        build(BuildOptions(hf_model=ckpt, out=out, target="gpu", max_batch_size=4, max_audio_seconds=60,
                           gpu=GpuOptions(precision=precision, encoder_precision="fp16")))
        want = cpu_reference(ckpt, speech_bytes)
        with TritonServer(out / "model_repository", log_path=out / "tritonserver.log") as srv:
            got = AF3Client(srv.grpc_url).ask(PROMPT, [speech_bytes], max_tokens=MAX_TOKENS).token_ids
        agree = sum(a == b for a, b in zip(got, want)) / max(len(want), 1)
        print(f"{name} {precision} on {GPU.name}: {agree:.0%} of {len(want)} greedy tokens agree with the CPU "
              f"reference\n  gpu {got}\n  cpu {want}")
        assert got, "the GPU ensemble produced no tokens"
        if precision == "bf16":
            assert got[:4] == want[:4]
