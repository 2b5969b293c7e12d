"""The sizing table, computed from the real AF3 config values (written here) and checked against tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from af3trt.build.memory_plan import main
from af3trt.build.sizing import (decoder_params, decoder_weight_bytes, dims_from_config, encoder_params,
                                 encoder_weight_bytes, kv_bytes_per_token, max_concurrent, prompt_table_bytes,
                                 render_markdown, sizing_table)
from af3trt.registry import AF3_REFERENCE_DIR

# AF3 (nvidia/audio-flamingo-3-hf): Qwen2.5-7B decoder, Whisper-large-v3 encoder.
REFERENCE = AF3_REFERENCE_DIR  # package data: the published AF3 sizes
DOCS = Path(__file__).resolve().parent.parent / "docs"
AF3_CONFIG = json.loads((REFERENCE / "config.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def af3():
    return dims_from_config(AF3_CONFIG)


def test_decoder_weights(af3):
    dec, _ = af3
    assert (dec.head_dim, dec.kv_heads) == (128, 4)
    params = decoder_params(dec)
    assert params["embedding"] == params["lm_head"] == 151672 * 3584
    assert params["total"] == 7_612_806_656  # Qwen2.5-7B with AF3's 151,672-row vocabulary
    bf16 = decoder_weight_bytes(dec, "bf16")
    assert bf16 == 2 * params["total"] and 15.2e9 < bf16 < 15.25e9  # ~15.2 GB incl. embeddings and lm_head
    assert decoder_weight_bytes(dec, "fp16") == bf16
    fp8, wo, sq, awq = (decoder_weight_bytes(dec, p) for p in ("fp8", "int8_wo", "int8_sq", "int4_awq"))
    # embeddings and lm_head (2.17 GB) stay bf16; the layers' 6.53 B linear weights shrink to 1 or 0.5 byte
    assert 8.7e9 < fp8 < 8.72e9 and fp8 < wo < sq < bf16
    assert 5.4e9 < awq < 5.6e9
    with pytest.raises(ValueError):
        decoder_weight_bytes(dec, "int2")


def test_encoder_weights(af3):
    _, enc = af3
    p = encoder_params(enc)
    assert p["encoder"] == 636_968_960  # Whisper-large-v3's encoder
    assert p["projector"] == 1280 * 3584 + 3584 + 3584 * 3584 + 3584
    assert 1.30e9 < encoder_weight_bytes(enc) < 1.31e9


def test_kv_and_prompt_table(af3):
    dec, _ = af3
    assert kv_bytes_per_token(dec, "auto") == 2 * 28 * 4 * 128 * 2 == 57344
    assert kv_bytes_per_token(dec, "fp8") == kv_bytes_per_token(dec, "int8") == 28672
    assert prompt_table_bytes(dec, 750) == 750 * 3584 * 2 == 5_376_000  # 30 s
    assert prompt_table_bytes(dec, 15000) == 107_520_000  # 10 min


def test_fit_on_80gb(af3):
    dec, enc = af3
    bf16 = max_concurrent(dec, enc, "bf16", "auto", 600)
    fp8 = max_concurrent(dec, enc, "fp8", "fp8", 600)
    assert 40 <= bf16 <= 60  # ~1.1 GB of KV + prompt table per 10-min request next to 16.5 GB of weights
    assert fp8 > 1.8 * bf16
    assert max_concurrent(dec, enc, "bf16", "auto", 30) > 6 * bf16  # 2,816 vs 17,056 KV tokens
    assert max_concurrent(dec, enc, "bf16", "auto", 600, gpu_bytes=16 * 1024**3) == 0  # weights do not fit


def test_table_and_markdown(af3, tmp_path, capsys):
    table = sizing_table(AF3_CONFIG)
    assert table["audio_tokens"] == {"30s": 750, "600s": 15000}
    assert table["request_tokens"]["600s"] == 17056  # 15000 + 1024 + 1024, whole 32-token blocks
    assert len(table["fit"]) == 18
    md = render_markdown(table)
    assert "| bf16 | 15.23 GB | 16.53 GB |" in md and "| bf16/fp16 (auto) | 57,344 |" in md
    json.dumps(table)
    (tmp_path / "config.json").write_text(json.dumps(AF3_CONFIG))
    assert main(["--hf-model", str(tmp_path), "--gpu", "a100"]) == 0
    out = capsys.readouterr().out
    assert "A100" in out and "### Weights" in out


def test_formulas_match_real_models(tiny_ckpt):
    """Parameter counts equal those of the transformers models built from the same config (on the meta device)."""
    import torch
    from transformers import AudioFlamingo3Config, AudioFlamingo3ForConditionalGeneration

    config = json.loads((tiny_ckpt / "config.json").read_text())
    dec, enc = dims_from_config(config)
    with torch.device("meta"):
        model = AudioFlamingo3ForConditionalGeneration(AudioFlamingo3Config.from_pretrained(tiny_ckpt))
    count = {part: sum(p.numel() for n, p in model.named_parameters() if part in n)
             for part in ("audio_tower", "multi_modal_projector")}
    lm = sum(p.numel() for n, p in model.named_parameters() if "language_model" in n or n.startswith("lm_head"))
    assert decoder_params(dec)["total"] == lm
    assert encoder_params(enc)["encoder"] == count["audio_tower"]
    assert encoder_params(enc)["projector"] == count["multi_modal_projector"]
    # a bare Qwen2 config: no encoder
    assert dims_from_config(config["text_config"])[1] is None


def test_committed_sizing_doc_is_what_the_code_computes(capsys):
    """docs/sizing.md is generated (scripts/gen_docs.sh), never typed: it must equal the code's output."""
    for gpu in ("h100", "a100"):
        main(["--hf-model", str(REFERENCE), "--gpu", gpu])
    generated = capsys.readouterr().out
    committed = (DOCS / "sizing.md").read_text(encoding="utf-8")
    assert generated in committed


# ------------------------------------------------------------------ the GPU memory plan (build/memory_plan.py)

def _af3_plan(windows=None, **kw):
    from af3trt.build.memory_plan import encoder_profile_windows, plan_memory

    dec, enc = dims_from_config(AF3_CONFIG)
    # the default GPU build: 8 requests x (15,000 audio + 1,024 text) tokens + 512 output tokens
    args = dict(precision="bf16", kv_cache="auto", encoder_precision="fp16", tp_size=1, max_batch_size=8,
                max_seq_len=16536, max_num_tokens=16031, prompt_table_rows=8 * 15000)
    args.update(kw)
    if windows is None:
        windows = encoder_profile_windows(args["max_batch_size"], 20, args["max_num_tokens"])
    return plan_memory(dec, enc, encoder_windows=windows, **args)


def test_encoder_profile_follows_what_the_decoder_takes_per_iteration():
    from af3trt.build.memory_plan import encoder_profile_windows

    assert encoder_profile_windows(8, 20, 16031) == 22  # ceil(16,031 / 750), not 8 x 20 = 160
    assert encoder_profile_windows(8, 1, 1781) == 3
    assert encoder_profile_windows(1, 20, 1000) == 20  # one request's windows are never split
    assert encoder_profile_windows(2, 1, 100000) == 2  # never more than every sequence's audio


def test_encoder_activations_are_a_function_of_windows_and_frames():
    from af3trt.build.memory_plan import encoder_activation_bytes

    _, enc = dims_from_config(AF3_CONFIG)
    one = encoder_activation_bytes(enc, 1, 3000)
    assert encoder_activation_bytes(enc, 22, 3000) == 22 * one  # linear in windows
    assert encoder_activation_bytes(enc, 1, 1000) < one / 3  # shorter windows (a windows x frames profile) cost less
    assert 0.15 * GIB < one < 0.3 * GIB  # 20 heads x 1500^2 scores (fp16, with softmax) dominate a window


GIB = 1024**3


def test_memory_plan_of_the_default_build():
    from af3trt.registry import KNOWN_GPUS
    from af3trt.build.memory_plan import MemoryPlanError, check_fits, plan_memory

    plan = _af3_plan()
    assert plan.encoder_windows == 22
    assert plan.kv_cache_tokens == 8 * 16544  # max_seq_len 16,536 in whole 32-token blocks
    assert plan.kv_cache == 8 * 16544 * 57344
    # the encoder's activations and audio cache are under its stub's cap (stub_memory), counted once
    assert plan.total == sum(getattr(plan, k) for k in ("encoder_weights", "decoder_weights", "decoder_activations",
                                                         "prompt_table", "kv_cache", "cuda_memory_pool",
                                                         "cuda_contexts", "stub_memory", "reserve"))
    for key in ("a100-40gb", "a100", "h100", "h200"):
        gpu = KNOWN_GPUS[key]
        check_fits(_af3_plan(gpu_name=gpu.name, gpu_bytes=gpu.memory_bytes))  # the default fits every declared GPU
    # the old profile (every sequence's longest audio: 8 x 20 = 160 windows) would not fit an A100 40GB
    a100_40 = KNOWN_GPUS["a100-40gb"]
    old = _af3_plan(windows=160, gpu_name=a100_40.name, gpu_bytes=a100_40.memory_bytes)
    assert old.encoder_activations > 25 * GIB and not old.fits
    with pytest.raises(MemoryPlanError, match="does not fit.*--max-batch-size"):
        check_fits(old)
    # tp 2 halves the decoder's weights and KV per rank
    tp2 = _af3_plan(tp_size=2)
    assert tp2.decoder_weights == plan.decoder_weights // 2 and tp2.kv_cache == plan.kv_cache // 2


def test_memory_plan_kv_must_fit_whatever_loads_first():
    """The KV cache must be at most 0.9 of what the other models leave (the backend takes its fraction of the memory
    free when it starts, and Triton loads models in parallel)."""
    from af3trt.registry import KNOWN_GPUS

    h100 = KNOWN_GPUS["h100"]
    plan = _af3_plan(max_batch_size=40, max_seq_len=16536, gpu_name=h100.name, gpu_bytes=h100.memory_bytes)
    assert plan.kv_cache > 30 * GIB
    assert plan.fits == (plan.total <= h100.memory_bytes)
    assert not plan.kv_within_free_fraction or plan.fits


def test_build_refuses_a_plan_that_does_not_fit_before_any_work(tiny_ckpt, tmp_path):
    """A configuration whose KV cache cannot fit the declared GPU is refused before the first step."""
    from af3trt.build.build_engines import BuildError, BuildOptions, ServingConfig, build
    from af3trt.build.plan import GpuOptions

    with pytest.raises(BuildError, match="memory plan does not fit"):
        build(BuildOptions(hf_model=tiny_ckpt, out=tmp_path / "x", target="gpu",
                           gpu=GpuOptions(precision="bf16", gpu="a100-40gb", accuracy_report=False),
                           serving=ServingConfig(max_batch_size=16384, max_audio_seconds=600, max_text_len=1024)))
    assert list(tmp_path.iterdir()) == []


def test_memory_plan_sizes_and_counts_tritons_cuda_memory_pool():
    """Triton's CUDA memory pool is 64 MiB per GPU unless set (core r26.04 src/server.cc `1 << 26`); past it ensemble
    intermediates fall back to pinned host memory (core r26.04 src/memory.cc). The plan sizes it for a full batch of
    10-minute requests (float32 audio_embeds + the engine-dtype prompt table + float32 log-mel) and counts it."""
    plan = _af3_plan()
    rows, hidden = 8 * 15000, AF3_CONFIG["text_config"]["hidden_size"]
    embeds, table = rows * hidden * 4, rows * hidden * 2  # 215 MB and 107 MB per 10-minute request
    assert embeds // 8 == 215_040_000 and table // 8 == 107_520_000
    mel = 160 * 128 * 3000 * 4
    assert plan.cuda_memory_pool == embeds + table + mel + 64 * 1024**2
    assert plan.cuda_memory_pool > 64 * 1024**2 * 40  # far past Triton's default
    no_pool = _af3_plan()
    assert plan.total - plan.cuda_memory_pool == sum(getattr(no_pool, k) for k in (
        "encoder_weights", "decoder_weights", "decoder_activations", "prompt_table", "kv_cache", "cuda_contexts",
        "stub_memory", "reserve"))


def test_memory_plan_counts_every_cuda_process_and_caps_the_stubs():
    """GPU 0 holds five CUDA processes (tritonserver with the tensorrtllm backend, and the preprocess, encoder, fusion
    and decoder front stubs: every python-backend instance is its own process, and the front opens the GPU tensors
    it is handed) with torch caching allocators; the plan counts a context for each and a cap for each allocating
    stub (applied in the stub, runtime/engines/gpus.py cap_cuda_memory). The encoder's cap holds its outputs, its
    audio cache and the TensorRT activation buffer its engines share (round 3, items 3 and 4)."""
    from af3trt.build.memory_plan import CUDA_CONTEXT_BYTES, CUDA_PROCESSES

    plan = _af3_plan()
    assert CUDA_PROCESSES == ("tritonserver", "preprocess", "encoder", "fusion", "decoder_front")
    assert plan.cuda_contexts == 5 * CUDA_CONTEXT_BYTES
    caps, hidden = plan.stub_caps, AF3_CONFIG["text_config"]["hidden_size"]
    assert set(caps) == {"preprocess", "encoder", "fusion"} and plan.stub_memory == sum(caps.values())
    assert plan.encoder_cache == 20 * 750 * hidden * 4  # one 10-min request's rows: a clip sent again hits
    # its output for the profile's 22 windows (f32, doubled), its cache, its activations
    assert caps["encoder"] == 2 * 22 * 750 * hidden * 4 + plan.encoder_cache + plan.encoder_activations
    assert caps["fusion"] == 2 * 15000 * hidden * (2 + 4)  # one 10-min request's bf16 table + f32 temporary
    assert caps["preprocess"] > 2 * 20 * 201 * 3001 * 8  # at least the STFT of 20 windows (complex64)
    longer = _af3_plan(max_batch_size=8, prompt_table_rows=8 * 30000)  # 20-min requests: larger caps
    assert longer.stub_caps["fusion"] == 2 * caps["fusion"] and longer.stub_caps["preprocess"] > caps["preprocess"]


def test_memory_plan_per_process_adds_up_to_what_each_process_allocates():
    """The plan's per-process table (build/memory_plan.py processes) is the same total: tritonserver's engine, KV, pool,
    LoRA cache and workspaces; each stub's context and capped allocator; the encoder's TensorRT weights beside it."""
    from af3trt.build.memory_plan import processes

    plan = _af3_plan()
    table = processes(plan)
    assert set(table) == {"tritonserver", "preprocess", "encoder", "fusion", "decoder_front"}
    assert sum(sum(parts.values()) for parts in table.values()) == plan.total
    assert table["encoder"]["torch, capped"] == plan.stub_caps["encoder"]
    assert table["tritonserver"]["KV cache"] == plan.kv_cache


def test_think_adds_its_encoder_weights_and_a_counted_lora_device_cache():
    """Item 5: TensorRT-LLM's LoRA device cache takes lora_cache_gpu_memory_fraction of the memory free when the
    executor starts, before the KV cache (trtGptModelInflightBatching.cpp); the plan renders a fraction that holds the
    adapter at the least free memory (everything else loaded first) and counts the most it can take (the whole GPU
    free, whole pages), instead of the backend's 0.05 x free (~3 GB on an H100) uncounted. Item 4: think/'s encoder
    adds its weights only; its context shares the first engine's activation buffer."""
    from af3trt.build.memory_plan import processes, with_think
    from af3trt.build.trtllm_lora import LoraPages
    from af3trt.registry import KNOWN_GPUS

    h100 = KNOWN_GPUS["h100"]
    plan = _af3_plan(gpu_name=h100.name, gpu_bytes=h100.memory_bytes)
    pages = LoraPages(dtype="bfloat16", slot_bytes=512 * 2 * 2, slots_per_page=4000, min_slots=30000)  # ~60 MB
    think = with_think(plan, encoder_variant=True, lora=pages)
    least_free = h100.memory_bytes - (plan.total + plan.encoder_weights - plan.kv_cache)
    assert think.lora_cache_gpu_memory_fraction * least_free >= 2 * pages.adapter_bytes  # room for it twice
    assert think.lora_cache_gpu_memory_fraction < 0.005  # not the backend's 0.05
    assert think.lora_device_cache >= think.lora_cache_gpu_memory_fraction * h100.memory_bytes
    assert think.lora_device_cache < 0.05 * h100.memory_bytes
    assert think.think_encoder_weights == plan.encoder_weights and think.stub_caps == plan.stub_caps
    assert think.total == plan.total + plan.encoder_weights + think.lora_device_cache
    assert sum(sum(p.values()) for p in processes(think).values()) == think.total
    assert with_think(think, encoder_variant=True, lora=pages) == think  # idempotent
    unknown = with_think(_af3_plan(), encoder_variant=False, lora=pages)  # no GPU known: the backend's default
    assert unknown.lora_cache_gpu_memory_fraction is None and unknown.lora_device_cache == 0
