"""The GPU encoder as the serving container can load it: a python-backend model running the TensorRT plan.

Facts the tests rely on:
- nvcr.io/nvidia/tritonserver:26.04-trtllm-python-py3 has the TensorRT-LLM and Python backends only
  (triton-inference-server/tensorrtllm_backend branch r26.04, docs/build.md: "The Triton container includes
  TensorRT-LLM, along with the TensorRT-LLM backend and the Python backend"; triton-inference-server/server issue
  #7346, a Triton maintainer: "-trtllm-python-py3 only has TRTLLM and Python backends"). CONTAINER_BACKENDS is
  that backend directory; a model whose backend is not in it fails to load (and --exit-on-error stops the server).
- Triton maps a config's `platform` to a backend: tensorrt_plan → tensorrt, onnxruntime_onnx → onnxruntime,
  pytorch_libtorch → pytorch; `ensemble` is built into the server (server docs/user_guide/model_configuration.md).
- The TensorRT runtime calls are those of TensorRT 10.14 (tests/fakes/tensorrt says where each is read).

The encoder model is run with the fake `tensorrt` (tests/fakes/tensorrt: it runs the plan's ONNX with ONNX Runtime on
the bound host memory) and torch CPU tensors standing in for CUDA ones, and compared with the CPU encoder model.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from af3trt.build.gpu_repo import render_gpu_repository
from af3trt.build.trt_encoder import build_encoder_engine
from af3trt.export.onnx_export import export_encoder
from af3trt.runtime.engines import trt_runner
from af3trt.runtime.engines.trt_runner import TrtRunner, TrtRunnerError
from af3trt.triton_repo import configs

from fakes import pb_utils as fake_pb
from fakes import tensorrt as fake_tensorrt
from helpers import gpu_spec, rendered

CONTAINER_BACKENDS = ("python", "tensorrtllm")  # /opt/tritonserver/backends of the 26.04 trtllm-python-py3 image
PLATFORM_BACKENDS = {"tensorrt_plan": "tensorrt", "onnxruntime_onnx": "onnxruntime", "pytorch_libtorch": "pytorch",
                     "tensorflow_savedmodel": "tensorflow", "ensemble": None}


def missing_backends(cfgs: dict, backend_dir) -> dict[str, str]:
    """{model: backend} for every model whose backend is not a directory of `backend_dir`."""
    out = {}
    for name, cfg in cfgs.items():
        backend = cfg.backend or PLATFORM_BACKENDS.get(cfg.platform, cfg.platform)
        if backend is not None and not (backend_dir / backend).is_dir():
            out[name] = backend
    return out


@pytest.fixture
def fake_trt(monkeypatch):
    """The on-disk fake TensorRT 10.14 module as `tensorrt`, its call log cleared."""
    mod = fake_tensorrt.fresh()
    monkeypatch.setitem(sys.modules, "tensorrt", mod)
    return mod


class HostPlace:
    """Stands in for trt_runner.CudaPlace: host memory, stream handle 0, nothing to synchronize."""

    def __init__(self, device_id: int):
        self.device, self.device_id, self.events = torch.device("cpu"), device_id, []

    def handle(self) -> int:
        return 0

    def after_inputs(self):
        self.events.append("after_inputs")

    def finish(self):
        self.events.append("finish")


@pytest.fixture(scope="module")
def encoder_onnx(tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-encoder") / "encoder.onnx"
    export_encoder(tiny_ckpt, out)
    return out


def test_gpu_repository_needs_only_the_containers_backends(checkpoint, limits, tmp_path):
    backends = tmp_path / "opt-tritonserver-backends"
    for b in CONTAINER_BACKENDS:
        (backends / b).mkdir(parents=True)
    spec, _ = gpu_spec(checkpoint, limits, tmp_path)
    plan = tmp_path / "encoder.plan"
    plan.write_bytes(b"PLAN")
    render_gpu_repository(tmp_path / "repo", spec, encoder_plan=plan)
    cfgs = rendered(tmp_path / "repo")
    assert missing_backends(cfgs, backends) == {}
    enc = cfgs["encoder"]
    assert [g.kind for g in enc.instance_group] == [configs.mc.ModelInstanceGroup.KIND_GPU]
    assert enc.dynamic_batching.max_queue_delay_microseconds > 0  # Triton still batches windows across requests
    # the check itself catches what the old config did
    old = configs.mc.ModelConfig(name="encoder", platform="tensorrt_plan")
    assert missing_backends({"encoder": old}, backends) == {"encoder": "tensorrt"}


def _requests(windows: list[int], frames: int = 3000, seed: int = 0):
    """Requests of w windows each (random log-mel, full masks) and their arrays; the last window of the second
    request is a placeholder (empty mask), as preprocess sends for padding."""
    rng = np.random.default_rng(seed)
    reqs, arrays = [], []
    for k, w in enumerate(windows):
        f = rng.standard_normal((w, 128, frames)).astype(np.float32)
        m = np.ones((w, frames), np.int32)
        m[0, frames // 2:] = 0  # a partly valid window
        if k == 1:
            m[-1] = 0
        reqs.append(fake_pb.Request({"input_features": f, "input_features_mask": m}))
        arrays.append((f, m))
    return reqs, arrays


def _gpu_model(encoder_onnx, tmp_path, monkeypatch, max_windows=8):
    """Build the plan with build/trt_encoder.py on the fake TensorRT, place it as the repository does, load the model."""
    monkeypatch.setattr(trt_runner, "CudaPlace", HostPlace)
    model_dir = tmp_path / "model_repository" / "encoder"
    build_encoder_engine(encoder_onnx, model_dir / "1" / "model.plan", max_windows=max_windows)
    spec = configs.RepoSpec(target="gpu", hidden_size=64, decoder_dtype="bfloat16", vocab_size=704, end_id=1,
                            pad_id=1, encoder_max_batch=max_windows)
    return fake_pb.load_model("encoder_trt", configs.encoder_config(spec), {
        "model_repository": str(model_dir), "model_version": "1", "model_instance_kind": "GPU",
        "model_instance_device_id": "0"})


@pytest.mark.slow
def test_gpu_encoder_model_matches_the_cpu_encoder(encoder_onnx, tmp_path, monkeypatch, fake_trt):
    gpu = _gpu_model(encoder_onnx, tmp_path, monkeypatch)
    spec = configs.RepoSpec(target="cpu", hidden_size=64, decoder_dtype="float32", vocab_size=704, end_id=1, pad_id=1)
    spec.encoder_params = {"onnx_path": str(encoder_onnx)}
    cpu = fake_pb.load_model("encoder", configs.encoder_config(spec), {"model_repository": str(tmp_path)})

    reqs, arrays = _requests([1, 3])
    fake_trt.calls.clear()
    got = gpu.execute(reqs)
    want = cpu.execute(_requests([1, 3])[0])
    assert [r.has_error() for r in got] == [False, False]
    for g, w, (f, m) in zip(got, want, arrays):
        t = g.outputs["audio_embeds"]._array
        assert isinstance(t, torch.Tensor) and t.dtype == torch.float32  # handed on through DLPack, not numpy
        assert t.shape == (len(f), 750, 64)
        np.testing.assert_allclose(t.numpy(), w.outputs["audio_embeds"].as_numpy(), rtol=0, atol=1e-6)
    assert not got[1].outputs["audio_embeds"]._array[-1].any()  # the placeholder window stays zero, as on CPU

    names = [c[0] for c in fake_trt.calls]
    assert names.count("execute_async_v3") == 1  # both requests' live windows in one engine execution
    shapes = dict(c[1] for c in fake_trt.calls if c[0] == "set_input_shape")
    assert shapes == {"input_features": (3, 128, 3000), "input_features_mask": (3, 3000)}  # 4 windows, 1 empty
    assert gpu.runner.place.events == ["after_inputs", "finish"]


@pytest.mark.slow
def test_gpu_encoder_cache_is_exact_skips_the_engine_and_keeps_rows_on_the_device(encoder_onnx, tmp_path,
                                                                                 monkeypatch, fake_trt):
    """Issue 20.3 on the GPU target: a window whose key (audio_digest) was seen is not run by the engine; its rows
    come from runtime/stages/audio_cache.py's LRU, kept as torch tensors on the runner's device, bounded in bytes."""
    from af3trt.runtime.stages import audio_cache

    gpu = _gpu_model(encoder_onnx, tmp_path, monkeypatch)
    plain = _gpu_model(encoder_onnx, tmp_path / "plain", monkeypatch)
    plain.cache = audio_cache.LruBytes(0)  # cache off: what every request computes
    digests = [bytes([i]) * 16 for i in range(3)]

    def keyed(windows, which, seed=0):
        reqs, _ = _requests(windows, seed=seed)
        for r, d, w in zip(reqs, which, windows):
            keys = audio_cache.window_keys(digests[d], w)
            # the second request's keys in GPU memory (FORCE_CPU_ONLY_INPUT_TENSORS "no"): fakes/pb_utils.GpuTensor
            r.inputs["audio_digest"] = (fake_pb.GpuTensor if d == 1 else fake_pb.Tensor)("audio_digest", keys)
        return reqs

    def executions():
        return [c[1] for c in fake_trt.calls if c[0] == "set_input_shape" and c[1][0] == "input_features"]

    want = [r.outputs["audio_embeds"]._array for r in plain.execute(keyed([1, 3], [0, 1]))]
    fake_trt.calls.clear()
    first = gpu.execute(keyed([1, 3], [0, 1]))
    assert executions() == [("input_features", (3, 128, 3000))]  # 3 live windows (1 placeholder), as uncached
    fake_trt.calls.clear()
    again = gpu.execute(keyed([1, 3], [0, 1]))
    assert executions() == [] and "execute_async_v3" not in [c[0] for c in fake_trt.calls]  # the engine did not run
    for w, a, b in zip(want, first, again):
        assert torch.equal(a.outputs["audio_embeds"]._array, w)  # bit for bit
        assert torch.equal(b.outputs["audio_embeds"]._array, w)
    assert len(gpu.cache) == 3  # live windows only: the placeholder is not kept
    entry = next(iter(gpu.cache._items.values()))[0]
    assert isinstance(entry, torch.Tensor) and entry.device == gpu.runner.place.device and entry.shape == (750, 64)
    assert gpu.cache.bytes == 3 * entry.nbytes  # each entry its own rows, not the execution's whole output

    # a batch with one request seen and one not: only the new request's windows run, the seen one's come back
    fake_trt.calls.clear()
    mixed = gpu.execute(keyed([1, 2], [0, 2], seed=1))
    # request 1's live window only: request 0's is cached and request 1's last one a placeholder (_requests)
    assert executions() == [("input_features", (1, 128, 3000))]
    fresh = plain.execute(keyed([1, 2], [0, 2], seed=1))
    assert torch.equal(mixed[0].outputs["audio_embeds"]._array, want[0])  # the cached rows, not seed 1's features
    assert torch.equal(mixed[1].outputs["audio_embeds"]._array, fresh[1].outputs["audio_embeds"]._array)

    # bounded in bytes, least recently used out first
    small = _gpu_model(encoder_onnx, tmp_path / "small", monkeypatch)
    small.cache = audio_cache.LruBytes(2 * entry.nbytes)
    small.execute(keyed([1], [0]))
    small.execute(keyed([1], [1]))
    small.execute(keyed([1], [0]))  # digest 0's window becomes the most recently used
    small.execute(keyed([1], [2]))  # so digest 1's is evicted
    assert small.cache.bytes <= 2 * entry.nbytes and small.cache.stats["evictions"] == 1
    key = lambda d: (False, audio_cache.key_bytes(audio_cache.window_keys(digests[d], 1)[0]))  # noqa: E731
    assert key(0) in small.cache and key(1) not in small.cache and key(2) in small.cache


@pytest.mark.slow
def test_gpu_encoder_takes_the_frame_axis_from_the_request(encoder_onnx, tmp_path, monkeypatch, fake_trt):
    """The runner sets shapes from the tensors it gets: an engine whose profile leaves T dynamic runs [W,128,T]."""
    monkeypatch.setattr(trt_runner, "CudaPlace", HostPlace)
    plan = tmp_path / "model.plan"
    build_encoder_engine(encoder_onnx, plan, max_windows=4)
    runner = TrtRunner.load(plan)
    runner.engine.plan["profile"] = {}  # as a T-dynamic build would allow any frames
    runner.engine.io["input_features"] = (*runner.engine.io["input_features"][:2], (-1, 128, -1))
    runner.engine.io["input_features_mask"] = (*runner.engine.io["input_features_mask"][:2], (-1, -1))
    f = torch.randn(2, 128, 1000)
    m = torch.ones(2, 1000, dtype=torch.int32)
    try:
        out = trt_runner.encode_windows(runner, f, m)
    except Exception:  # noqa: BLE001 - an export with a fixed T=3000 makes ONNX Runtime (inside the fake) refuse
        out = None
    assert ("set_input_shape", ("input_features", (2, 128, 1000))) in fake_trt.calls
    assert ("set_input_shape", ("input_features_mask", (2, 1000))) in fake_trt.calls
    if out is not None:
        assert tuple(out.shape[:2]) == (2, 250)

@pytest.mark.slow
def test_bad_requests_and_bad_plans_are_clear_errors(encoder_onnx, tmp_path, monkeypatch, fake_trt):
    gpu = _gpu_model(encoder_onnx, tmp_path, monkeypatch, max_windows=2)
    too_many, _ = _requests([3])  # beyond the profile's 2 windows
    (r,) = gpu.execute(too_many)
    assert r.has_error() and "optimization profile" in r.error.message()
    ok, _ = _requests([2])
    assert not gpu.execute(ok)[0].has_error()  # the model keeps serving

    bad = tmp_path / "bad.plan"
    bad.write_bytes(b"\x00not a plan")
    with pytest.raises(TrtRunnerError, match="could not deserialize"):
        TrtRunner.load(bad)
    with pytest.raises(TrtRunnerError, match="no TensorRT plan"):
        TrtRunner.load(tmp_path / "absent.plan")


def test_stub_memory_caps_reach_the_stubs(monkeypatch):
    """The plan's caps become each python model's `cuda_memory_cap_bytes` (build/gpu_repo.py with_stub_caps) and the
    stub sets torch.cuda.set_per_process_memory_fraction(cap / total) on its device (runtime/engines/gpus.py)."""
    import torch

    from af3trt.build.gpu_repo import with_stub_caps
    from af3trt.runtime.engines import gpus

    from af3trt.runtime.stages.params import FusionParams

    spec = with_stub_caps(configs.RepoSpec(target="gpu", hidden_size=8, decoder_dtype="bfloat16", vocab_size=100,
                                           end_id=1, pad_id=0, prompt_table_extra_ids=True),
                          {"preprocess": 1 << 30, "encoder": 2 << 30, "fusion": 3 << 30})
    cfgs = configs.all_configs(spec)
    assert {m: cfgs[m].parameters["cuda_memory_cap_bytes"].string_value for m in ("preprocess", "encoder", "fusion")} \
        == {"preprocess": str(1 << 30), "encoder": str(2 << 30), "fusion": str(3 << 30)}
    calls = []
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: type("P", (), {"total_memory": 80 << 30}))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, d: calls.append((f, d)))
    cap = FusionParams.parse({k: v.string_value for k, v in cfgs["fusion"].parameters.items()}).cuda_memory_cap_bytes
    assert gpus.cap_cuda_memory(cap, torch.device("cuda", 0), "fusion") == 3 / 80
    assert calls == [(3 / 80, torch.device("cuda", 0))]
    assert gpus.cap_cuda_memory(cap, torch.device("cpu"), "fusion") is None  # the CPU path: nothing to cap
    assert gpus.cap_cuda_memory(None, torch.device("cuda", 0), "fusion") is None and len(calls) == 1
