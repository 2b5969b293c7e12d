"""The GPU target built and served through fakes that make upstream's checks, not only its interfaces
(tests/fakes: trtllm_backend, tensorrt, cuda_memory, ensemble): a tiny-gpu checkpoint in bf16 with AF3's think/ adapter,
built by `af3trt build --target gpu` on the fake TensorRT and trtllm-build, its rendered repository run in this process
as Triton would run its ensemble, with a 10-minute clip.

What would fail on a GPU, and fails here first:
- thinking on a bf16 engine: the adapter must reach TensorRT-LLM in the engine's dtype (a float16 .npy prefetch into
  bf16 pages is refused at load: loraCache.cpp copyToPages → BufferManager::copy "Incompatible data types"; request
  weights of another dtype: loraUtils.cpp "Expected lora weights to be the same data type as base model");
- the encoder's audio cache must fit the stub's memory cap (the cap the build renders; torch's allocator refuses past
  it: fakes/cuda_memory.py), and a failed cache insert must not fail the request;
- the think encoder's second TensorRT context must not take a second activation allocation beside the plan;
- `stop` and `streaming` reach the backend in host memory; a duplicate in-flight request id is refused and a request
  without one gets one of ours; streams reach postprocess coalesced.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sys

import numpy as np
import pytest
import soundfile as sf

from af3trt.runtime.engines import trt_runner
from af3trt.runtime.stages import lengths
from af3trt.triton_repo import configs

from fakes import cuda_memory, pb_utils as fake_pb
from fakes import tensorrt as fake_tensorrt
from fakes import trtllm_build
from fakes.ensemble import Ensemble, EnsembleError
from fakes.trtllm_backend import FakeTrtllmDecoder

pytestmark = pytest.mark.slow
TEN_MINUTES = 600.0


class HostPlace:
    """trt_runner.CudaPlace on host memory (torch CPU tensors stand in for CUDA ones)."""

    def __init__(self, device_id: int):
        import torch

        self.device = torch.device("cpu")

    def handle(self) -> int:
        return 0

    def after_inputs(self):
        pass

    def finish(self):
        pass


def clip(seconds: float, seed: int) -> bytes:
    """A WAV of noise: every seed a different clip (different cache keys)."""
    wave = np.random.default_rng(seed).standard_normal(int(seconds * lengths.SAMPLE_RATE)).astype(np.float32) * 0.1
    buf = io.BytesIO()
    sf.write(buf, wave, lengths.SAMPLE_RATE, format="WAV", subtype="PCM_16")
    return buf.getvalue()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """tiny-gpu in bf16 with think/, built for an H100 on the fake TensorRT and trtllm-build (10-min audio)."""
    from af3trt.build.build_engines import main as build_main
    from af3trt.export.synth import write_checkpoint
    from af3trt.export.think import write_think

    root = tmp_path_factory.mktemp("gpu-strict")
    ckpt = write_checkpoint(root / "ckpt", "tiny-gpu", seed=0, dtype="bfloat16")
    write_think(ckpt, seed=0)
    bindir = root / "bin"
    bindir.mkdir()
    trtllm_build.install(bindir, sys.executable)
    saved = os.environ["PATH"], sys.modules.get("tensorrt")
    os.environ["PATH"] = f"{bindir}{os.pathsep}{saved[0]}"
    sys.modules["tensorrt"] = fake_tensorrt.fresh()
    try:
        out = root / "out"
        build_main(["--hf-model", str(ckpt), "--out", str(out), "--target", "gpu", "--precision", "bf16",
                    "--gpu", "h100", "--no-accuracy-report", "--max-audio-seconds", str(int(TEN_MINUTES)),
                    "--max-batch-size", "2", "--max-text-len", "128", "--max-output-len", "16", "--no-goldens"])
    finally:
        os.environ["PATH"] = saved[0]
        if saved[1] is None:
            sys.modules.pop("tensorrt", None)
        else:
            sys.modules["tensorrt"] = saved[1]
    return out


@pytest.fixture
def served(built, monkeypatch, tmp_path):
    """The rendered repository run in this process: the encoder stub under its rendered memory cap, TensorRT's share
    of it the plan's (engine weights and activations), the tensorrtllm model strict."""
    from af3trt.runtime.triton import context as context_mod

    monkeypatch.setattr(context_mod, "default_root", lambda: tmp_path / "ctx")
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt.fresh())
    monkeypatch.setattr(trt_runner, "CudaPlace", HostPlace)
    monkeypatch.setattr(fake_pb, "BLS_MODELS", {})
    repo = built / "model_repository"
    enc = configs.parse((repo / "encoder" / "config.pbtxt").read_text())
    plan = json.loads((built / "manifest.json").read_text())["gpu"]["memory_plan"]
    memory = cuda_memory.FakeCudaMemory(int(enc.parameters["cuda_memory_cap_bytes"].string_value),
                                        trt_budget=trt_share(plan))
    ens = Ensemble(repo, decoder=lambda cfg: FakeTrtllmDecoder(cfg, generate=True), memory={"encoder": memory})
    return ens, memory


def trt_share(plan: dict) -> int:
    """What the plan gives TensorRT itself in the encoder stub (its per-process row less the CUDA context and the torch
    cap): the engines' weights, the think variant's too. (A plan without a per-process table, before round 3, counted
    one activation allocation beside the weights and its think/ weights apart: that is its share.)"""
    if "processes" in plan:
        return plan["processes"]["encoder"]["TensorRT engine weights"]
    return plan["encoder_weights"] + plan["encoder_activations"] + plan.get("think", {}).get("think_encoder_weights", 0)


def ask(ens, audio: bytes, *, thinking=False, stream=False, request_id="r1", max_tokens=8):
    inputs = {"text_input": np.array([b"What is in the audio?"], np.object_),
              "audio": np.array([audio], np.object_),
              "max_tokens": np.array([max_tokens], np.int32), "stream": np.array([stream]),
              "thinking": np.array([thinking])}
    return ens.infer(inputs, request_id=request_id)


def text(responses) -> str:
    return "".join(bytes(r["text_output"].reshape(-1)[0]).decode() for r in responses)


def test_thinking_on_a_bf16_engine_reaches_the_adapter(served):
    """Item 1: the tensorrtllm model loads with think/'s adapter and a thinking request decodes with it."""
    ens, _ = served
    decoder = ens.model("decoder")
    audio = clip(TEN_MINUTES, seed=1)
    base = ask(ens, audio, request_id="base")
    thought = ask(ens, audio, thinking=True, stream=True, request_id="think")
    runs = {r["triton_id"]: r for r in decoder.executor.values()}
    assert runs["base"]["lora_task"] is None and runs["think"]["lora_task"] == 1
    assert decoder.lora.tasks == {1: decoder.engine.trt_dtype}  # pages hold the adapter in the engine's dtype
    assert text(base) and text(thought)
    # item 7: the backend's one response per token reach postprocess coalesced (the first token alone)
    assert 1 < len(thought) < len(runs["think"]["tokens"]) == 8
    assert list(thought[0]["output_ids"].reshape(-1)) == runs["think"]["tokens"][:1]
    # item 6: a request without an id reaches the decoder with one of ours (a stop needs it)
    ask(ens, audio, request_id="")
    assert any(r["triton_id"].startswith("af3trt-") for r in decoder.executor.values())


def test_the_think_encoder_shares_the_activation_buffer(served):
    """Item 4: both encoder engines run on one USER_MANAGED activation buffer allocated under the stub's torch cap;
    TensorRT itself holds only the engines' weights, the plan's TensorRT share (the fixture's budget refused a second
    STATIC context before)."""
    ens, memory = served
    encoder = ens.model("encoder")
    assert encoder.think is not encoder.runner and encoder.think.activations is encoder.runner.activations
    need = max(encoder.runner.engine.device_memory_size_v2, encoder.think.engine.device_memory_size_v2)
    assert encoder.runner.activations.nbytes == need and memory.live >= need
    assert memory.trt <= memory.trt_budget


def ten_minutes_of_features(ens):
    """A 10-minute clip through preprocess: [20, 128, 3000] features and masks."""
    inputs = {"audio": np.array([clip(TEN_MINUTES, seed=2)], np.object_)}
    (out,) = ens.call("preprocess", inputs, request_id="pre")
    return {k: out[k]._array for k in ("input_features", "input_features_mask", "window_thinking")}


def test_the_encoder_cache_fills_within_the_stub_cap(served):
    """Item 3: distinct 10-minute clips, more than the stub's cap could cache, each encoded in its own request: every
    request succeeds, the stub never holds more than its cap (fakes/cuda_memory.py refuses past it, as torch's
    allocator under set_per_process_memory_fraction does), the cache stays within the budget the build rendered."""
    from af3trt.runtime.stages import audio_cache

    ens, memory = served
    feats = ten_minutes_of_features(ens)
    windows = feats["input_features"].shape[0]
    assert windows == 20
    hidden = int(ens.configs["fusion"].parameters["hidden_size"].string_value)
    per_clip = windows * lengths.EMBEDS_PER_WINDOW * hidden * 4  # f32 rows kept per clip
    # more clips than the 256-MiB floor of a stub's cap holds (with the old 1-GiB default cache the 14th failed) and
    # more than the rendered cache holds
    budget = int(ens.configs["encoder"].parameters["cache_bytes"].string_value or audio_cache.DEFAULT_ENCODER_BYTES)
    clips = max((256 << 20) // per_clip + 2, budget // per_clip + 3)
    for i in range(clips):
        keys = audio_cache.window_keys(i.to_bytes(16, "little"), windows)
        (out,) = ens.call("encoder", {**feats, "audio_digest": keys}, request_id=f"fill-{i}")
        assert out["audio_embeds"]._array.shape[:2] == (windows, lengths.EMBEDS_PER_WINDOW)
    encoder = ens.model("encoder")
    assert memory.peak <= memory.cap and not memory.refused
    assert 0 < encoder.cache.bytes <= budget and encoder.cache.stats["evictions"] > 0


def test_a_cache_copy_that_cannot_be_made_fails_no_request(served):
    """Item 3: when the stub cannot allocate the cache's copy of a window, the request still gets its rows."""
    from af3trt.runtime.stages import audio_cache

    ens, memory = served
    feats = ten_minutes_of_features(ens)
    encoder = ens.model("encoder")
    keys = audio_cache.window_keys(b"a" * 16, 20)
    before = memory.live
    ens.call("encoder", {**feats, "audio_digest": keys}, request_id="measure")
    with_copies = memory.peak - before
    encoder.cache.clear()
    memory.peak = memory.live
    copies = 20 * lengths.EMBEDS_PER_WINDOW * int(ens.configs["fusion"].parameters["hidden_size"].string_value) * 4
    memory.cap = memory.live + with_copies - copies // 2  # the execution fits, half the copies do not
    (out,) = ens.call("encoder", {**feats, "audio_digest": audio_cache.window_keys(b"b" * 16, 20)}, request_id="tight")
    assert out["audio_embeds"]._array.shape[0] == 20
    assert memory.refused and encoder.cache.stats["failed_puts"] >= 1 and 0 < len(encoder.cache) < 20
