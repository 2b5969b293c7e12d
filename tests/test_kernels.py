"""GPU preprocessing kernels (af3trt.kernels) on CPU: the OpenAI Triton kernels run through Triton's interpreter.

What is checked: the batched log-mel against our CPU reference (runtime/audio.log_mel, ≤ 1e-5) and against
transformers' AF3 processor (WhisperFeatureExtractor) for several clip lengths and multi-window batches; the
prompt table against the CPU fusion path's table, bit for bit in f32/f16/bf16; the preprocess and fusion adapters
taking the device path when their config says so; the configs that switch it on for the GPU target only.
"""

from __future__ import annotations

import os

import torch

# Triton picks compiled vs interpreted kernels when af3trt.kernels._triton is first imported (triton/runtime/jit.py
# `jit()` reads TRITON_INTERPRET then; our module imports it lazily, on first use). Without a GPU the kernels can
# only run interpreted: set it before any test here touches them. test_interpreter_is_on guards this.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import dataclasses  # noqa: E402
import io  # noqa: E402
import logging  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import soundfile as sf  # noqa: E402

from fakes import pb_utils as fake_pb  # noqa: E402
from helpers import fading_noise as signal  # noqa: E402  (falling loudness, a silent second)
from af3trt import kernels  # noqa: E402
from af3trt.kernels import logmel, table  # noqa: E402
from af3trt.runtime.stages import audio, audio_cache, contract, lengths  # noqa: E402
from af3trt.runtime.stages.prompt import FusionLimits, PromptBuilder, window_rows  # noqa: E402
from af3trt.runtime.stages.params import FusionParams, PreprocessParams  # noqa: E402
from af3trt.runtime.stages.conversation import shorthand  # noqa: E402
from af3trt.triton_repo import configs  # noqa: E402

SR = lengths.SAMPLE_RATE
FEATURE_TOL = 1e-5  # measured: 1.2e-7 (the interpreter's log2·log10(2) vs torch's log10)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_interpreter_is_on():
    k = logmel.triton_kernels()
    assert k is not None, "triton is not installed (pip install -e '.[gpu-kernels]')"
    if not torch.cuda.is_available():
        assert k.interpreted(), "the kernels were defined before TRITON_INTERPRET=1 was set"
        assert logmel.triton_runs_on(torch.zeros(1))


# ---------------------------------------------------------------------------------------------- log-mel


CHUNKS = {  # samples per window of one batch: full, partial, tiny, silent, the shortest with a token
    "mixed": [480000, 160001, 321, 1, 79999],
    "one full": [480000],
    "one short": [16000],
}


@pytest.mark.parametrize("sizes", CHUNKS.values(), ids=CHUNKS.keys())
@pytest.mark.parametrize("crop", [False, True], ids=["3000 frames", "request bucket"])
def test_log_mel_matches_cpu_reference(sizes, crop):
    """Full windows, and cropped to the request's frame bucket (what serving sends: runtime/audio.request_frames)."""
    chunks = [signal(n, seed=i) for i, n in enumerate(sizes)]
    if len(sizes) > 3:
        chunks[3][:] = 0.0  # an all-silent window: peak = 1e-10, every feature (−10 + 4) / 4
    frames = audio.request_frames(chunks) if crop else lengths.WINDOW_FRAMES
    ref, ref_mask = audio.log_mel(chunks, frames)
    got, mask = logmel.log_mel(chunks, frames, device=DEVICE)
    assert got.device.type == DEVICE and got.dtype == torch.float32 and tuple(got.shape) == ref.shape
    if crop and sizes == [16000]:
        assert got.shape[-1] == 200  # 100 valid frames + 2 → the 200-frame bucket
    assert np.array_equal(mask, ref_mask)
    diff = float(np.abs(got.cpu().numpy() - ref).max())
    assert diff <= FEATURE_TOL, f"max abs diff {diff:.3g}"
    composed = logmel.log_mel_windows(logmel.pad_windows(chunks, DEVICE), frames, use_triton=False)  # torch fallback
    assert float(np.abs(composed.cpu().numpy() - ref).max()) <= FEATURE_TOL


@pytest.mark.parametrize("f_out", [333, 101])
def test_epilogue_block_edges_and_per_window_peak(f_out):
    """The GPU block size (1024) over a size that is not a multiple of it; windows with peaks decades apart, so
    the clamp at peak − 8 bites differently in each; zeros clamp to 1e-10; a crop to the first f_out frames keeps
    the peak of the whole window (the largest value sits past the crop in window 0)."""
    g = torch.Generator().manual_seed(0)
    mel = torch.rand((3, 7, 333), generator=g, dtype=torch.float32) ** 8  # [W, M, F], many tiny values
    mel[0] *= 1e6
    mel[1] *= 1e-12
    mel[2, :, :100] = 0.0
    mel[0, 3, 300] = 1e9
    peak = mel.amax(dim=(1, 2))
    want = torch.maximum(mel.clamp(min=1e-10).log10(), peak.clamp(min=1e-10).log10()[:, None, None] - 8.0)
    want = ((want + 4.0) / 4.0)[..., :f_out]
    out = torch.full((3, 7, f_out), float("nan"), device=DEVICE)
    logmel.triton_kernels().logmel_epilogue(mel.to(DEVICE), peak.to(DEVICE), out, block=1024)
    assert not out.isnan().any()  # every element written, none past the end
    assert float((out.cpu() - want).abs().max()) <= FEATURE_TOL


@pytest.fixture(scope="module")
def processor(tiny_ckpt):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_ckpt)


CLIPS = {"1 s": [1.0], "5 s": [5.0], "30 s + 1 sample": [30 + 1 / SR], "70 s": [70.0], "two clips": [31.0, 4.5]}


@pytest.mark.parametrize("seconds", CLIPS.values(), ids=CLIPS.keys())
def test_log_mel_matches_af3_processor(processor, seconds):
    """transformers' AudioFlamingo3Processor (its WhisperFeatureExtractor) is the reference of the features."""
    waves = [signal(int(round(s * SR)), seed=i) for i, s in enumerate(seconds)]
    out = processor(text=[f"clip {i} <sound>" for i in range(len(waves))], audio=waves)
    ref, ref_mask = out["input_features"].numpy(), out["input_features_mask"].numpy()
    chunks = [c for w in waves for c in audio.split_windows(w)[0]]
    assert len(chunks) == ref.shape[0]
    got, mask = logmel.log_mel(chunks, device=DEVICE)
    assert np.array_equal(mask, ref_mask)
    diff = float(np.abs(got.cpu().numpy() - ref).max())
    assert diff <= FEATURE_TOL, f"max abs diff to the AF3 processor {diff:.3g}"


def test_bad_windows_are_refused():
    with pytest.raises(ValueError, match="480000"):
        logmel.log_mel([np.zeros(480001, np.float32)], device=DEVICE)
    with pytest.raises(ValueError, match="f32"):
        logmel.log_mel_windows(torch.zeros((1, 1000)))
    with pytest.raises(ValueError, match="frames must be in"):
        logmel.log_mel([np.zeros(10, np.float32)], 3001, device=DEVICE)
    got, mask = logmel.log_mel([], 100, device=DEVICE)
    assert tuple(got.shape) == (0, 128, 100) and mask.shape == (0, 100)


# ---------------------------------------------------------------------------------------------- prompt table


@pytest.fixture(scope="module")
def limits(tiny_ckpt):
    import json

    t = json.loads((tiny_ckpt / "config.json").read_text())["text_config"]
    return FusionLimits(vocab_size=t["vocab_size"], hidden_size=t["hidden_size"], dtype="float32",
                        end_id=t["eos_token_id"], pad_id=t["bos_token_id"], max_input_len=4000, max_output_len=64,
                        default_max_tokens=16)


def masks(sizes: list[int]) -> np.ndarray:
    return audio.log_mel([np.zeros(n, np.float32) for n in sizes])[1]  # [W, 3000]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_prompt_table_equals_cpu_fusion_table(tiny_ckpt, limits, dtype):
    """Two clips (1.5 windows, one short window) and a trailing placeholder window the table must skip."""
    builder = PromptBuilder(tiny_ckpt, dataclasses.replace(limits, dtype=str(dtype).removeprefix("torch.")))
    mask = masks([480000, 240000, 6400, 0])
    windows = [2, 1]
    embeds = np.random.default_rng(0).standard_normal((4, 750, limits.hidden_size)).astype(np.float32) * 3
    ids, cpu_table = builder.build("Compare them.", None, embeds, mask, windows)  # [N, H] f32
    want = torch.from_numpy(cpu_table).to(dtype)  # the CPU fusion path's cast (fusion/model.py _table_tensor)

    conv = shorthand("Compare them.", None, len(windows))
    dev_ids, got = table.build(builder, conv, torch.device(DEVICE), torch.from_numpy(embeds),
                               torch.from_numpy(mask), torch.tensor(windows, dtype=torch.int32))
    assert np.array_equal(dev_ids, ids)
    assert got.dtype == dtype and got.device.type == DEVICE and got.shape == want.shape
    assert torch.equal(got.cpu(), want)
    rows = window_rows(mask, windows)
    assert rows[:2] == [750, 375] and len(rows) == 3  # the placeholder window is not a row source
    fallback = table.prompt_table(torch.from_numpy(embeds), rows, dtype, use_triton=False)[0]
    assert torch.equal(fallback, want)


def test_bf16_cast_rounds_like_torch():
    """Round-to-nearest-even ties, carries into the exponent, overflow to inf, subnormals, signed zero: bit for bit
    what torch's f32 → bf16 gives (the interpreter alone would truncate; the kernel rounds in integers)."""
    vals = [1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -8), 1 + 2 ** -8 + 2 ** -20, 0.0, -0.0, 2 ** -133, 3.3895e38,
            -3.4e38, float("inf"), -float("inf"), 1.9999999, 2 ** -126 * 1.5, 65504.0, 1e-40, 0.1]
    src = torch.tensor(vals, dtype=torch.float32).reshape(1, 2, 8)  # [W=1, R=2, H=8]
    got = table.prompt_table(src.to(DEVICE), [2], torch.bfloat16)[0].cpu()
    want = src[0].to(torch.bfloat16)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))


def test_prompt_table_edges():
    src = torch.randn(3, 5, 300)  # H not a multiple of the kernel's 256-wide block
    got = table.prompt_table(src.to(DEVICE), [0, 5, 2], torch.float32)[0].cpu()
    assert torch.equal(got, torch.cat([src[1], src[2, :2]]))
    assert table.prompt_table(src.to(DEVICE), [], torch.bfloat16).shape == (1, 0, 300)
    assert table.prompt_table(src.to(DEVICE), [0, 0], torch.bfloat16).shape == (1, 0, 300)
    with pytest.raises(ValueError, match=r"in \[0, 5\]"):
        table.prompt_table(src, [6], torch.float32)
    with pytest.raises(ValueError, match="fewer than"):
        table.prompt_table(src, [1, 1, 1, 1], torch.float32)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        table.torch_dtype("int8")


# ---------------------------------------------------------------------------------------------- adapters + configs


def spec_for(target: str, tiny_ckpt, limits, **kw) -> configs.RepoSpec:
    kw.setdefault("fusion_params", {"tokenizer_dir": str(tiny_ckpt)})
    return configs.RepoSpec(target=target, hidden_size=limits.hidden_size, decoder_dtype="bfloat16",
                            vocab_size=limits.vocab_size, end_id=limits.end_id, pad_id=limits.pad_id,
                            max_input_len=4000, max_output_len=64, default_max_tokens=16, **kw)


def params(cfg) -> dict[str, str]:
    return {k: v.string_value for k, v in cfg.parameters.items()}


def test_configs_switch_the_device_path_on_for_gpu_only(tiny_ckpt, limits):
    gpu, cpu = spec_for("gpu", tiny_ckpt, limits), spec_for("cpu", tiny_ckpt, limits)
    assert PreprocessParams.parse(params(configs.preprocess_config(gpu))).gpu_kernels
    assert FusionParams.parse(params(configs.fusion_config(gpu))).gpu_kernels
    assert params(configs.fusion_config(gpu))["FORCE_CPU_ONLY_INPUT_TENSORS"] == "no"
    assert "FORCE_CPU_ONLY_INPUT_TENSORS" not in params(configs.preprocess_config(gpu))
    for spec in (cpu, dataclasses.replace(gpu, gpu_kernels=False)):
        for cfg, record in ((configs.preprocess_config(spec), PreprocessParams), (configs.fusion_config(spec),
                                                                                   FusionParams)):
            assert not record.parse(params(cfg)).gpu_kernels and "FORCE_CPU_ONLY_INPUT_TENSORS" not in params(cfg)
    assert FusionParams.parse(params(configs.fusion_config(dataclasses.replace(cpu, gpu_kernels=True)))).gpu_kernels


def test_device_choice_and_cpu_fallback(monkeypatch, caplog):
    assert kernels.device_of(False, "cuda", "x") is None
    assert kernels.device_of(True, "cpu", "x") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="af3trt"):
        assert kernels.device_of(True, "cuda", "preprocess") is None
    assert "CUDA is not available" in caplog.text and "preprocess" in caplog.text


def flac(wave: np.ndarray) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wave, SR, format="FLAC")
    return buf.getvalue()


def test_preprocess_adapter_device_path(tiny_ckpt, limits, speech_bytes):
    on = spec_for("gpu", tiny_ckpt, limits, preprocess_params={"kernels_device": DEVICE})
    off = spec_for("cpu", tiny_ckpt, limits)
    dev_model = fake_pb.load_model("preprocess", configs.preprocess_config(on))
    assert fake_pb.Logger.messages[-1] == f"preprocess: log-mel on {DEVICE} (af3trt.kernels)"
    cpu_model = fake_pb.load_model("preprocess", configs.preprocess_config(off))
    requests = {(3, 128, 3000): [flac(signal(40 * SR)), speech_bytes],  # 30 s + 10 s + 5 s: the full window
                (1, 128, 600): [speech_bytes]}  # 5 s alone: cropped to its frame bucket
    for shape, clips in requests.items():
        clips = np.array(clips, dtype=object)
        (d,), (c,) = (m.execute([fake_pb.Request({"audio": clips})]) for m in (dev_model, cpu_model))
        assert not d.has_error() and not c.has_error(), (d.error, c.error)
        feats = d.outputs["input_features"]._array
        assert isinstance(feats, torch.Tensor) and feats.device.type == DEVICE  # left on the device, via DLPack
        ref = c.outputs["input_features"].as_numpy()
        assert tuple(feats.shape) == ref.shape == shape
        assert float(np.abs(feats.cpu().numpy() - ref).max()) <= FEATURE_TOL
        for name in ("input_features_mask", "audio_windows"):
            assert np.array_equal(d.outputs[name].as_numpy(), c.outputs[name].as_numpy())
    (t,) = dev_model.execute([fake_pb.Request({})])  # text only: one placeholder window, as on the CPU path
    (tc,) = cpu_model.execute([fake_pb.Request({})])
    assert not t.has_error() and t.outputs["input_features"].as_numpy().shape == tc.outputs["input_features"].as_numpy().shape


@pytest.mark.slow
def test_fusion_adapter_device_path_gives_the_cpu_table(tiny_ckpt, limits, speech_bytes):
    on = spec_for("gpu", tiny_ckpt, limits, prompt_table_extra_ids=True,
                  fusion_params={"tokenizer_dir": str(tiny_ckpt), "kernels_device": DEVICE})
    off = dataclasses.replace(on, gpu_kernels=False, fusion_params={"tokenizer_dir": str(tiny_ckpt)})
    dev_model = fake_pb.load_model("fusion", configs.fusion_config(on))
    cpu_model = fake_pb.load_model("fusion", configs.fusion_config(off))
    batch = audio.prepare_clips([flac(signal(40 * SR)), speech_bytes])
    embeds = np.random.default_rng(2).standard_normal((3, 750, limits.hidden_size)).astype(np.float32)
    inputs = {"text_input": np.array([b"What is said?"], object), "audio_embeds": embeds,
              "input_features_mask": batch.mask, "audio_windows": np.asarray(batch.windows_per_clip, np.int32),
              "max_tokens": np.array([8], np.int32),
              "audio_digest": audio_cache.window_keys(audio_cache.audio_digest([b"a", b"b"]), 3)}
    (d,), (c,) = (m.execute([fake_pb.Request(dict(inputs))]) for m in (dev_model, cpu_model))
    assert not d.has_error() and not c.has_error(), (d.error, c.error)
    declared = {o.name for o in configs.fusion_config(on).output} - set(contract.FUSION_PER_REQUEST)  # no guide here
    assert set(d.outputs) == set(c.outputs) == declared
    got, want = d.outputs["prompt_embedding_table"]._array, c.outputs["prompt_embedding_table"]._array
    assert got.dtype == want.dtype == torch.bfloat16 and got.device.type == DEVICE
    assert got.shape == (1, sum(batch.tokens_per_clip), limits.hidden_size)
    assert torch.equal(got.cpu(), want)
    for name in ("input_ids", "input_lengths", "prompt_vocab_size"):
        assert np.array_equal(d.outputs[name].as_numpy(), c.outputs[name].as_numpy()), name
    x = d.outputs["prompt_table_extra_ids"].as_numpy()
    fake = d.outputs["input_ids"].as_numpy() >= limits.vocab_size
    assert (x[~fake] == 0).all() and len(set(x[fake].tolist())) == 3 and (x[fake] >= 1).all()  # one per window
    assert np.array_equal(x, c.outputs["prompt_table_extra_ids"].as_numpy())
    (again,) = dev_model.execute([fake_pb.Request(dict(inputs))])
    assert np.array_equal(again.outputs["prompt_table_extra_ids"].as_numpy(), x)  # same audio → same id


def test_kernels_bench_says_what_it_timed():
    from af3trt.perf import kernels_bench

    r = kernels_bench.run([1], hidden=8, repeats=1)
    (row,) = r["rows"]
    assert row["windows"] == 1 and row["log_mel_cpu_ms"] > 0 and row["table_cpu_ms"] > 0
    text = kernels_bench.render(r)
    if torch.cuda.is_available():
        assert row["log_mel_gpu_triton_ms"] > 0 and r["device"] in text
    else:
        assert "No CUDA device" in text and "log_mel_gpu_triton_ms" not in row


@pytest.mark.integration
def test_device_path_in_a_real_tritonserver_is_token_exact(bf16_ckpt, bf16_repo, bf16_ref, tmp_path_factory,
                                                          speech_bytes, monkeypatch):
    """The CPU repository of a bf16 checkpoint with preprocess and fusion switched to the device path on CPU tensors
    (kernels_device "cpu", TRITON_INTERPRET=1 in the server's environment): the real tritonserver 2.51 python backend
    takes the log-mel features and the bf16 prompt table as DLPack outputs and fusion's inputs through to_dlpack with
    FORCE_CPU_ONLY_INPUT_TENSORS "no"; a 5-s clip and a 70-s clip (3 windows) answer as transformers' generate."""
    import shutil

    from af3trt.runtime.client.library import AF3Client
    from af3trt.runtime.serve.server import TritonServer
    from reference import mono16k

    out = tmp_path_factory.mktemp("kernels-e2e") / "out"
    shutil.copytree(bf16_repo, out, symlinks=True)  # the session's bf16 build, copied: its configs change below
    for model in ("preprocess", "fusion"):
        path = out / "model_repository" / model / "config.pbtxt"
        cfg = configs.parse(path.read_text())
        assert cfg.parameters["gpu_kernels"].string_value == "false"  # the CPU target renders the CPU path
        for k, v in {"gpu_kernels": "true", "kernels_device": "cpu",
                     **(configs.INPUTS_WHERE_THEY_ARE if model == "fusion" else {})}.items():
            cfg.parameters[k].string_value = v
        path.write_text(configs.render(cfg))
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # inherited by the python backend stubs

    ref = bf16_ref
    long_wave = signal(70 * SR, seed=3)
    clips = {"speech": speech_bytes, "70 s": flac(long_wave)}
    want = {k: ref.generate("What is said?", mono16k(v), max_new_tokens=16) for k, v in clips.items()}
    with TritonServer(out / "model_repository", log_path=out / "tritonserver.log") as srv:
        client = AF3Client(srv.grpc_url, timeout=300)
        got = {k: client.ask("What is said?", [v], max_tokens=16).token_ids for k, v in clips.items()}
        log = srv.log_path.read_text(errors="replace")
    assert "preprocess: log-mel on cpu (af3trt.kernels)" in log and "fusion: prompt table on cpu" in log
    assert got == want


# ---------------------------------------------------------------------------------------------- warm-up and fallback


def test_kernels_are_warmed_and_checked_at_initialize(monkeypatch):
    """A healthy Triton: warm() compiles and compares both kernels on the device and leaves them on."""
    from af3trt.kernels import check

    monkeypatch.setattr(logmel, "_TRITON_OFF", [])
    got = check.compare(torch.device(DEVICE))
    assert got["logmel_max_abs"] <= check.FEATURE_TOL and got["table_equal"]
    assert check.warm(torch.device(DEVICE)) is None and logmel.triton_runs_on(torch.zeros(1, device=DEVICE))


class _BrokenTriton:
    """What a Triton whose compiler fails for our kernels looks like to the launchers (e.g. another triton in the
    image): every launch raises."""

    @staticmethod
    def interpreted():
        return True

    @staticmethod
    def logmel_epilogue(*a, **k):
        raise RuntimeError("CompilationError: at 12:4: unsupported")

    compact_rows = logmel_epilogue


def test_a_kernel_that_fails_to_compile_falls_back_at_initialize(monkeypatch, tiny_ckpt, limits, speech_bytes):
    """The models stay correct: the failure is found in initialize() (not by the first request), logged, and the
    process serves with the torch path; old behaviour: every audio request failed."""
    monkeypatch.setattr(logmel, "_TRITON_OFF", [])
    monkeypatch.setattr(logmel, "triton_kernels", lambda: _BrokenTriton)
    monkeypatch.setattr(table, "triton_kernels", lambda: _BrokenTriton)
    on = spec_for("gpu", tiny_ckpt, limits, preprocess_params={"kernels_device": DEVICE})
    model = fake_pb.load_model("preprocess", configs.preprocess_config(on))
    assert any("CompilationError" in m and "using the torch log-mel" in m for m in fake_pb.Logger.messages)
    assert not logmel.triton_runs_on(torch.zeros(1, device=DEVICE))
    (d,) = model.execute([fake_pb.Request({"audio": np.array([speech_bytes], dtype=object)})])
    assert not d.has_error(), d.error
    ref = audio.prepare_clips([speech_bytes]).features
    assert float(np.abs(d.outputs["input_features"]._array.cpu().numpy() - ref).max()) <= FEATURE_TOL


def test_gpu_check_features_vs_cpu(monkeypatch, speech_bytes):
    """gpu-check's features check (on CUDA on the GPU host; here the same code on CPU through the interpreter)."""
    from af3trt.kernels import check

    monkeypatch.setattr(logmel, "_TRITON_OFF", [])
    got = check.features_vs_cpu(speech_bytes, DEVICE)
    assert got["passed"] and got["triton"] and got["max_abs"] <= check.GPU_VS_CPU_TOL
