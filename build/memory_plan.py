"""The GPU memory plan of one GPU build, from the sizing code (build/sizing.py), checked before any long step.

Why a plan and not `kv_cache_free_gpu_mem_fraction` alone: the tensorrtllm backend sizes its KV cache as that
fraction of the memory that is free *when its executor starts* (TensorRT-LLM cpp/tensorrt_llm/batch_manager/
kvCacheManager.cpp, BaseKVCacheManager::calculateFreeMemBytes: cudaMemGetInfo free x fraction), and Triton loads
the models of a repository in parallel. If the decoder starts first, 0.9 of the GPU goes to KV blocks and the
encoder, loading second, runs out of memory; if the encoder starts first, the decoder gets less KV than planned.
So the plan fixes the KV cache in tokens: `max_tokens_in_paged_kv_cache` (when both are set the executor uses the
smaller: calculateMaxNumBlocks takes min(maxTokens, fraction x free); docs/source/reference/memory.md "the minimum
between this computed number of tokens and maxTokens is used"; triton-inference-server/tensorrtllm_backend r26.04
docs/model_config.md: "KV cache allocation is the min of max_tokens_in_paged_kv_cache and value derived from
kv_cache_free_gpu_mem_fraction"), sized for what the decoder can hold at once.

What one GPU holds (rank 0 also runs the encoder model):

    encoder    weights (engine dtype; think/'s encoder variant a second engine) + activation peak of its largest
               profile: encoder_activation_bytes(windows, frames), an upper bound that materializes the attention
               scores (TensorRT may fuse them; the real figure is ICudaEngine.device_memory_size_v2 of the built plan).
               Both engines' contexts run on ONE activation buffer the stub allocates with torch (USER_MANAGED:
               runtime/engines/trt_runner.py), so the activations sit under the encoder stub's cap
    decoder    weights / tp + activations for max_num_tokens (TensorRT sizes activations for the largest profile at
               build time: docs/source/reference/memory.md "Activation size") + the prompt-table buffer
    KV cache   max_batch_size x max_seq_len tokens in whole blocks (guaranteed_no_evict reserves a request's whole
               sequence), / tp per rank
    LoRA cache think/'s adapter on the device (with_think): TensorRT-LLM allocates lora_cache_gpu_memory_fraction of
               the memory free when its executor starts, before the KV cache (trtGptModelInflightBatching.cpp); the
               build renders the fraction from the adapter's size at the least free memory and counts the most it
               can take (build/trtllm_lora.py)
    pool       Triton's CUDA memory pool on the ensemble's GPU (cuda_pool_bytes): taken at server start, before the
               decoder sizes its KV cache
    contexts   one CUDA context per process on GPU 0: tritonserver (the tensorrtllm backend runs in it) and the
               python stubs of preprocess, encoder, fusion and the decoder front (which takes the prompt table where
               it is, on the GPU) (CUDA_PROCESSES; an estimate per context)
    stubs      what each stub's torch caching allocator may hold (stub_caps), capped in the stub with
               torch.cuda.set_per_process_memory_fraction so a request cannot take the decoder's KV memory; the
               encoder's cap holds its outputs, its audio cache (encoder_cache_bytes, rendered as cache_bytes) and
               the TensorRT activation buffer
    reserve    cuBLAS/NCCL workspaces: an estimate

The encoder's window profile is sized from what the decoder can take per iteration: without chunked context a
context phase holds at most max_num_tokens tokens (trtGptModelInflightBatching.cpp: "the max context length ...
needs to be less than or equal to the max number of tokens"), so more than ceil(max_num_tokens / 750) windows of
audio cannot enter the decoder in one iteration; but one request's windows arrive as one Triton request and are
never split, so the profile takes at least max_audio_windows.

Every figure is computed, not measured: the plan is checked against the declared GPU's memory and written into the
manifest and docs/sizing.md; measure on the GPU. `processes(plan)` is the same total per process: what each process
on GPU 0 can allocate.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from af3trt.build import sizing
from af3trt.build.sizing import (DTYPE_BYTES, TOKENS_PER_BLOCK, DecoderDims, EncoderDims, decoder_weight_bytes,
                                 dims_from_config, encoder_weight_bytes, kv_bytes_per_token)
from af3trt.build.plan import ServingConfig
from af3trt.build.tables import Column, markdown_table
from af3trt.build.trtllm_engine import plan_trtllm_build
from af3trt.registry import GPU_ENCODER_PRECISIONS, KNOWN_GPUS
from af3trt.runtime.stages import lengths

GIB = 1024**3
RUNTIME_RESERVE_BYTES = 1 * GIB  # library workspaces (cuBLAS, NCCL): an estimate
# Processes with a CUDA context on GPU 0: tritonserver (tensorrtllm backend) + the preprocess, encoder, fusion stubs
# (every python-backend model instance is its own stub process: python_backend README, "each model instance ... in a
# separate process"), and the decoder front, which opens the GPU tensors it is handed (CUDA IPC). 512 MiB per context is an estimate (CUDA 12's lazy module loading keeps it well below the
# eager figure); measure with nvidia-smi on the GPU.
CUDA_PROCESSES = ("tritonserver", "preprocess", "encoder", "fusion", "decoder_front")
CUDA_CONTEXT_BYTES = 512 * 1024**2
STUB_FLOOR_BYTES = 256 * 1024**2  # no stub is capped below this (kernels, cuFFT plans, small tensors)
KV_FREE_FRACTION = 0.9  # the tensorrtllm backend's kv_cache_free_gpu_mem_fraction we still send (min() with tokens)
# Triton's CUDA memory pool per GPU when --cuda-memory-pool-byte-size does not set it: 64 MiB (triton-inference-server/
# core r26.04 src/server.cc: `cuda_memory_pool_size_[gpu] = 1 << 26` for every supported GPU not set explicitly;
# server r26.04 src/command_line_parser.cc: "Default is 64 MB").
TRITON_DEFAULT_POOL_BYTES = 1 << 26


class MemoryPlanError(ValueError):
    """The configuration does not fit the GPU it is built for."""


@dataclass(frozen=True)
class MemoryPlan:
    gpu: str | None
    gpu_bytes: int | None
    tp_size: int
    encoder_windows: int  # the encoder profile's max windows
    encoder_frames: int  # mel frames per window in that profile
    encoder_weights: int
    encoder_activations: int  # one buffer for both encoder engines, inside the encoder stub's cap
    decoder_weights: int  # per rank
    decoder_activations: int  # per rank
    prompt_table: int
    kv_cache_tokens: int  # max_tokens_in_paged_kv_cache
    kv_cache: int  # bytes per rank
    cuda_memory_pool: int  # Triton's CUDA memory pool on GPU 0 (--cuda-memory-pool-byte-size=0:<this>)
    cuda_contexts: int  # one per process in CUDA_PROCESSES
    stub_memory: int  # sum of stub_caps
    stub_caps: dict  # {python model: bytes its torch allocator may hold on GPU 0}
    reserve: int
    total: int  # on rank 0: the sum of processes(plan)
    fits: bool | None  # None: no GPU known
    kv_within_free_fraction: bool | None  # KV <= fraction x (GPU - everything else): safe whatever the load order
    encoder_cache: int = 0  # the encoder's audio cache (its cache_bytes), inside the encoder stub's cap
    think_encoder_weights: int = 0  # think/'s encoder variant (with_think)
    lora_device_cache: int = 0  # the most TensorRT-LLM's LoRA device cache can take (with_think)
    lora_cache_gpu_memory_fraction: float | None = None  # rendered for it (None: no GPU known, the backend's 0.05)

    def as_dict(self) -> dict:
        return {**asdict(self), "processes": processes(self)}


# the parts of the total, by the process that allocates them (stub_memory is each stub's cap)
SUMMED = ("encoder_weights", "think_encoder_weights", "decoder_weights", "decoder_activations", "prompt_table",
          "kv_cache", "lora_device_cache", "cuda_memory_pool", "cuda_contexts", "stub_memory", "reserve")


def processes(plan: MemoryPlan) -> dict[str, dict[str, int]]:
    """{process on GPU 0: {what it allocates: bytes}}, adding up to plan.total: tritonserver (the tensorrtllm backend
    and Triton's pool), each python stub (its CUDA context and its capped torch allocator; the encoder also
    TensorRT's engine weights)."""
    ctx, caps = plan.cuda_contexts // len(CUDA_PROCESSES), plan.stub_caps
    out = {"tritonserver": {"CUDA context": ctx, "decoder weights": plan.decoder_weights,
                            "decoder activations": plan.decoder_activations, "prompt-table buffer": plan.prompt_table,
                            "KV cache": plan.kv_cache, "LoRA device cache": plan.lora_device_cache,
                            "Triton CUDA memory pool": plan.cuda_memory_pool, "library workspaces": plan.reserve},
           "encoder": {"CUDA context": ctx, "TensorRT engine weights": plan.encoder_weights + plan.think_encoder_weights,
                       "torch, capped": caps.get("encoder", 0)}}
    for stub in CUDA_PROCESSES:
        if stub not in out:
            out[stub] = {"CUDA context": ctx, **({"torch, capped": caps[stub]} if stub in caps else {})}
    return out


def encoder_activation_bytes(e: EncoderDims, windows: int, frames: int = lengths.WINDOW_FRAMES,
                             dtype_bytes: int = DTYPE_BYTES) -> int:
    """Upper bound of the encoder engine's activation memory for `windows` windows of `frames` mel frames.

    T = frames / 2 positions after the stride-2 conv. Live at the widest point of a layer: the input features
    (float32 [W, mel, frames] + int32 mask), the residual stream and attention output (2 x [W, T, H]), q/k/v
    (3 x [W, T, H]), the FFN intermediate ([W, T, ffn]) and, unless TensorRT fuses attention, the scores and their
    softmax (2 x [W, heads, T, T]).
    """
    if windows < 1 or frames < 2:
        raise ValueError(f"windows must be >= 1 and frames >= 2, got {windows}, {frames}")
    t = frames // 2
    inputs = windows * frames * (e.mel_bins * 4 + 4)
    stream = windows * t * (5 * e.hidden + e.ffn) * dtype_bytes
    scores = 2 * windows * e.heads * t * t * dtype_bytes
    return inputs + stream + scores


def decoder_activation_bytes(d: DecoderDims, max_num_tokens: int, max_batch_size: int, tp_size: int = 1,
                             dtype_bytes: int = DTYPE_BYTES) -> int:
    """Estimate of the decoder engine's activations: per token in flight the residual, q/k/v, attention output and
    the gated MLP's two intermediates (split over tp), plus float32 logits for every sequence (--logits_dtype
    float32 in our trtllm-build plan)."""
    qkv = (d.heads + 2 * d.kv_heads) * d.head_dim
    per_token = (2 * d.hidden + (qkv + d.heads * d.head_dim + 2 * d.intermediate) // tp_size) * dtype_bytes
    return max_num_tokens * per_token + max_batch_size * d.vocab * 4


def encoder_profile_windows(max_batch_size: int, max_audio_windows: int, max_num_tokens: int) -> int:
    """Windows the encoder profile must take: what the decoder can consume per iteration, never fewer than one
    request's windows (see module docstring), never more than every sequence's longest audio."""
    if min(max_batch_size, max_audio_windows, max_num_tokens) < 1:
        raise ValueError("max_batch_size, max_audio_windows and max_num_tokens must be >= 1")
    per_iteration = math.ceil(max_num_tokens / lengths.EMBEDS_PER_WINDOW)
    return max(max_audio_windows, min(max_batch_size * max_audio_windows, per_iteration))


def cuda_pool_bytes(d: DecoderDims, prompt_table_rows: int) -> int:
    """Triton's CUDA memory pool on the GPU that runs the ensemble, for every request in flight at once.

    Ensemble intermediates and python-backend GPU outputs are allocated from that pool; past it Triton falls back to
    pinned host memory (core r26.04 src/memory.cc, AllocatedMemory: "CUDA memory -> pinned system memory -> non-pinned
    system memory") and the python backend copies GPU outputs through shared memory or CUDA IPC instead of the pool
    (python_backend r26.04 src/infer_response.cc, "Failed to allocate memory from CUDA memory pool"), so features
    leave the GPU. Per audio row of the batch-wide prompt table (max_batch_size x windows x 750 rows): the
    encoder's float32 audio_embeds row and the fusion's prompt-table row (engine dtype); per 750 rows one window of
    float32 log-mel [128, 3000] from preprocess; plus Triton's default 64 MiB for the rest. TensorRT-LLM's own
    launcher sizes it the same way for multimodal models (NVIDIA/TensorRT-LLM triton_backend/scripts/
    launch_triton_server.py --multimodal_gpu0_cuda_mem_pool_bytes; its docs/multimodal.md: "since the
    prompt_embedding_table is in GPU memory, we need to set the CUDA pool memory for inter-step communication",
    2 bytes x 576 x 4096 x max_batch_size).
    """
    windows = math.ceil(prompt_table_rows / lengths.EMBEDS_PER_WINDOW)
    mel = windows * lengths.N_MELS * lengths.WINDOW_FRAMES * 4
    return prompt_table_rows * d.hidden * (4 + DTYPE_BYTES) + mel + TRITON_DEFAULT_POOL_BYTES


def encoder_cache_bytes(d: DecoderDims, max_audio_windows: int) -> int:
    """The encoder's audio cache (runtime/stages/audio_cache.py, on the device on the GPU target): one request's
    windows of projector rows [750, H] f32, so that a clip sent again skips the encoder (a 10-min AF3 clip: 215 MB)."""
    return max_audio_windows * lengths.EMBEDS_PER_WINDOW * d.hidden * 4


def stub_caps(d: DecoderDims, max_audio_windows: int, encoder_windows: int, *, encoder_activations: int = 0,
              encoder_cache: int = 0) -> dict[str, int]:
    """What each python stub's torch caching allocator may hold on GPU 0, for one execution at a time (one instance
    each), doubled for the allocator's rounding and fragmentation, at least STUB_FLOOR_BYTES:
      preprocess  per window of a request: the padded wave [480000] f32, the STFT [201, 3001] complex64, |X|^2
                  [201, 3000] f32, mel and features [128, 3000] f32 each (kernels/logmel.py)
      encoder     its output [windows, 750, H] f32 for the engine profile's windows; then, not doubled, its audio
                  cache (encoder_cache) and the one TensorRT activation buffer both engines run on (the engine's
                  device_memory_size_v2, at most encoder_activations)
      fusion      one request's table [rows, H] in the engine dtype and the torch path's f32 temporary
    """
    window = (lengths.WINDOW_SAMPLES + 201 * (lengths.WINDOW_FRAMES + 1) * 2 + 201 * lengths.WINDOW_FRAMES
              + 2 * lengths.N_MELS * lengths.WINDOW_FRAMES) * 4
    rows = max_audio_windows * lengths.EMBEDS_PER_WINDOW
    need = {"preprocess": max_audio_windows * window,
            "encoder": encoder_windows * lengths.EMBEDS_PER_WINDOW * d.hidden * 4,
            "fusion": rows * d.hidden * (DTYPE_BYTES + 4)}
    caps = {k: max(STUB_FLOOR_BYTES, 2 * v) for k, v in need.items()}
    caps["encoder"] += encoder_cache + encoder_activations
    return caps


def kv_cache_tokens(max_batch_size: int, max_seq_len: int, tokens_per_block: int = TOKENS_PER_BLOCK) -> int:
    """max_tokens_in_paged_kv_cache: every sequence at its longest, in whole KV blocks."""
    return max_batch_size * math.ceil(max_seq_len / tokens_per_block) * tokens_per_block


def plan_memory(d: DecoderDims, e: EncoderDims, *, precision: str, kv_cache: str, encoder_precision: str,
                tp_size: int, max_batch_size: int, max_seq_len: int, max_num_tokens: int,
                prompt_table_rows: int, encoder_windows: int, encoder_frames: int = lengths.WINDOW_FRAMES,
                max_audio_windows: int | None = None,
                gpu_name: str | None = None, gpu_bytes: int | None = None,
                reserve_bytes: int = RUNTIME_RESERVE_BYTES) -> MemoryPlan:
    kv_tokens = kv_cache_tokens(max_batch_size, max_seq_len)
    if max_audio_windows is None:  # one request's windows: the batch-wide table's share
        max_audio_windows = math.ceil(prompt_table_rows / max_batch_size / lengths.EMBEDS_PER_WINDOW)
    kv_rank = kv_tokens * kv_bytes_per_token(d, kv_cache) // tp_size
    enc_bytes = GPU_ENCODER_PRECISIONS[encoder_precision].activation_bytes
    activations = encoder_activation_bytes(e, encoder_windows, encoder_frames, enc_bytes)
    cache = encoder_cache_bytes(d, max_audio_windows)
    caps = stub_caps(d, max_audio_windows, encoder_windows, encoder_activations=activations, encoder_cache=cache)
    parts = {
        "encoder_weights": encoder_weight_bytes(e, enc_bytes if encoder_precision != "int8" else 1),
        "encoder_activations": activations, "encoder_cache": cache,
        "decoder_weights": decoder_weight_bytes(d, precision) // tp_size,
        "decoder_activations": decoder_activation_bytes(d, max_num_tokens, max_batch_size, tp_size),
        "prompt_table": prompt_table_rows * d.hidden * DTYPE_BYTES,
        "kv_cache": kv_rank, "cuda_memory_pool": cuda_pool_bytes(d, prompt_table_rows),
        "cuda_contexts": len(CUDA_PROCESSES) * CUDA_CONTEXT_BYTES, "stub_memory": sum(caps.values()),
        "reserve": reserve_bytes,
    }
    return _totalled(MemoryPlan(gpu=gpu_name, gpu_bytes=gpu_bytes, tp_size=tp_size, encoder_windows=encoder_windows,
                                encoder_frames=encoder_frames, kv_cache_tokens=kv_tokens, total=0, fits=None,
                                kv_within_free_fraction=None, stub_caps=caps, **parts))


def _totalled(plan: MemoryPlan) -> MemoryPlan:
    """The plan with its total (SUMMED) and the fit checks made against its GPU."""
    total = sum(getattr(plan, k) for k in SUMMED)
    fits = kv_ok = None
    if plan.gpu_bytes is not None:
        fits = total <= plan.gpu_bytes
        kv_ok = plan.kv_cache <= KV_FREE_FRACTION * (plan.gpu_bytes - (total - plan.kv_cache))
    return replace(plan, total=total, fits=fits, kv_within_free_fraction=kv_ok)


def with_think(plan: MemoryPlan, *, encoder_variant: bool, lora=None) -> MemoryPlan:
    """The plan with what think/ adds (build/think.py): a second encoder engine's weights (its activations share the
    first engine's buffer), and TensorRT-LLM's LoRA device cache. lora: build/trtllm_lora.LoraPages of the adapter in
    the engine's dtype. The device cache takes lora_cache_gpu_memory_fraction of the memory free when the executor
    starts (peftCacheManager.cpp getDeviceCacheByteBudget / getMaxNumSlots: fraction x (free + the pool's free)), before
    the KV cache: at least everything but the KV cache is taken then, at most nothing; the fraction is rendered for
    the least free memory and the most it can take (the whole GPU free, whole pages) is counted."""
    from af3trt.build import trtllm_lora

    plan = _totalled(replace(plan, think_encoder_weights=plan.encoder_weights if encoder_variant else 0,
                             lora_device_cache=0, lora_cache_gpu_memory_fraction=None))
    if lora is None or plan.gpu_bytes is None:
        return plan
    least_free = max(1, plan.gpu_bytes - (plan.total - plan.kv_cache))
    fraction = trtllm_lora.device_fraction(lora, least_free)
    fraction = float(trtllm_lora.fraction_text(fraction))  # exactly what the backend will read
    return _totalled(replace(plan, lora_cache_gpu_memory_fraction=fraction,
                             lora_device_cache=lora.device_cache_bytes(fraction, plan.gpu_bytes)))


def check_fits(plan: MemoryPlan) -> None:
    """MemoryPlanError with the plan's figures and what to change when it does not fit its GPU."""
    if plan.fits is None or (plan.fits and plan.kv_within_free_fraction):
        return
    why = (f"needs {plan.total / GIB:.1f} GiB on GPU 0 but {plan.gpu} has {plan.gpu_bytes / GIB:.1f} GiB"
           if not plan.fits else
           f"the KV cache ({plan.kv_cache / GIB:.1f} GiB) exceeds {KV_FREE_FRACTION} of what the other models leave "
           f"free, so the decoder could not allocate it whichever model Triton loads first")
    raise MemoryPlanError(f"the GPU memory plan does not fit: {why} ({render_line(plan)}). Lower --max-batch-size "
                          f"or --max-audio-seconds / --max-text-len / --max-output-len, quantize (--precision fp8 / "
                          f"int8_wo / int4_awq, --kv-cache fp8 or int8), or build for a larger GPU (--gpu h200) or "
                          f"--tp-size 2")


def render_line(plan: MemoryPlan) -> str:
    return ", ".join(f"{k.replace('_', ' ')} {getattr(plan, k) / GIB:.2f} GiB" for k in SUMMED if getattr(plan, k))


def _yes(v: bool | None) -> str:
    return "yes" if v else "no"


# the plan's tables (build/tables.py writes them): its parts, each process's share, and the GPUs it fits
PLAN = [Column("", "part"), Column("GiB", "bytes", lambda b: f"{b / GIB:.2f}", right=True), Column("", "note")]
PROCESSES = [Column("process", "process"),
             Column("GiB", lambda r: sum(r["parts"].values()) / GIB, "{:.2f}", right=True),
             Column("of which", lambda r: ", ".join(f"{k} {v / GIB:.2f}" for k, v in r["parts"].items() if v))]
FITS = [Column("GPU", lambda r: f"{r['plan'].gpu} (`--gpu {r['key']}`)"),
        Column("memory", lambda r: r["plan"].gpu_bytes / GIB, "{:.1f} GiB", right=True),
        Column("fits", lambda r: _yes(r["plan"].fits)),
        Column("KV within 0.9 of what the others leave", lambda r: _yes(r["plan"].kv_within_free_fraction))]


def plan_rows(plan: MemoryPlan) -> list[dict]:
    """The plan's parts that it has as records: part, bytes, note; the total last."""
    encoder_cap = plan.stub_caps.get("encoder", 0)
    rows = [("encoder weights", plan.encoder_weights, "TensorRT engine"),
            ("think/ encoder weights", plan.think_encoder_weights, "its encoder variant, a second engine"),
            ("decoder weights", plan.decoder_weights, f"per rank (tp {plan.tp_size})"),
            ("decoder activations", plan.decoder_activations, "estimate for max_num_tokens + float32 logits"),
            ("prompt-table buffer", plan.prompt_table, "max_prompt_embedding_table_size x hidden"),
            ("KV cache", plan.kv_cache, f"max_tokens_in_paged_kv_cache = {plan.kv_cache_tokens:,}"),
            ("LoRA device cache", plan.lora_device_cache,
             f"think/'s adapter; lora_cache_gpu_memory_fraction {plan.lora_cache_gpu_memory_fraction}"),
            ("Triton CUDA memory pool", plan.cuda_memory_pool,
             "ensemble intermediates of every request in flight (--cuda-memory-pool-byte-size)"),
            ("CUDA contexts", plan.cuda_contexts,
             f"{len(CUDA_PROCESSES)} processes on GPU 0 ({', '.join(CUDA_PROCESSES)}), estimate"),
            ("python stubs' torch memory", plan.stub_memory,
             "capped per stub: " + ", ".join(f"{k} {v / GIB:.2f}" for k, v in plan.stub_caps.items())
             + f"; the encoder's holds its audio cache ({plan.encoder_cache / GIB:.2f}) and the TensorRT activation "
               f"buffer ({plan.encoder_activations / GIB:.2f}, largest profile: {plan.encoder_windows} windows x "
               f"{plan.encoder_frames} frames, unfused upper bound) of {encoder_cap / GIB:.2f}"),
            ("reserve", plan.reserve, "library workspaces (estimate)"),
            ("**total on GPU 0**", plan.total, "" if plan.gpu_bytes is None else
             f"of {plan.gpu_bytes / GIB:.1f} GiB: {'fits' if plan.fits else 'DOES NOT FIT'}")]
    return [{"part": part, "bytes": b, "note": note} for part, b, note in rows if b or part.startswith("**")]


def render_markdown(plan: MemoryPlan, title: str, rows: list[dict] | None = None) -> str:
    """The plan's table and its per-process table (the same total)."""
    procs = [{"process": proc, "parts": parts} for proc, parts in processes(plan).items()]
    return "\n".join([f"### {title}", "", *markdown_table(PLAN, rows or plan_rows(plan)), "",
                      "Per process (what each can allocate on GPU 0; the same total):", "",
                      *markdown_table(PROCESSES, procs)]) + "\n"


def plan_for_config(config: dict, *, precision: str, kv_cache: str, encoder_precision: str, tp_size: int,
                    max_batch_size: int, max_audio_windows: int, derived: dict, gpu=None) -> MemoryPlan:
    """The plan of one GPU build: `config` the HF config.json, `derived` what plan_trtllm_build derived from the
    serving limits (max_seq_len, max_num_tokens, max_prompt_embedding_table_size), `gpu` a registry.GpuInfo."""
    d, e = dims_from_config(config)
    return plan_memory(d, e, precision=precision, kv_cache=kv_cache, encoder_precision=encoder_precision,
                       tp_size=tp_size, max_batch_size=max_batch_size, max_seq_len=derived["max_seq_len"],
                       max_num_tokens=derived["max_num_tokens"],
                       prompt_table_rows=derived["max_prompt_embedding_table_size"],
                       max_audio_windows=max_audio_windows,
                       encoder_windows=encoder_profile_windows(max_batch_size, max_audio_windows,
                                                               derived["max_num_tokens"]),
                       gpu_name=None if gpu is None else gpu.name,
                       gpu_bytes=None if gpu is None else gpu.memory_bytes)


def default_plan(config: dict, gpu=None, *, precision: str = "bf16", kv_cache: str = "auto") -> MemoryPlan:
    """The plan of `af3trt build --target gpu` with its default serving limits (fp16 encoder, tp 1) for `config`."""
    limits = ServingConfig()
    derived = plan_trtllm_build("checkpoint", "engine", limits, precision, kv_cache,
                                limits.window_tokens_per_request).derived
    return plan_for_config(config, precision=precision, kv_cache=kv_cache, encoder_precision="fp16", tp_size=1,
                           max_batch_size=limits.max_batch_size, max_audio_windows=limits.max_audio_windows,
                           derived=derived, gpu=gpu)


def default_build_plans(config: dict, gpus: dict, *, precision: str = "bf16", kv_cache: str = "auto") -> str:
    """docs/sizing.md's memory plan: `af3trt build --target gpu` with its default serving limits, per GPU."""
    limits = ServingConfig()
    derived = plan_trtllm_build("checkpoint", "engine", limits, precision, kv_cache,
                                limits.window_tokens_per_request).derived
    plans = {key: default_plan(config, gpu, precision=precision, kv_cache=kv_cache) for key, gpu in gpus.items()}
    first = next(iter(plans.values()))
    title = (f"Memory plan of the default GPU build ({precision}, KV cache {kv_cache}, fp16 encoder, tp 1, "
             f"{limits.max_batch_size} requests of {limits.max_audio_seconds:g} s audio + {limits.max_text_len} text "
             f"+ {limits.max_output_len} output tokens; max_num_tokens {derived['max_num_tokens']:,})")
    rows = plan_rows(first)
    rows[-1]["note"] = ""  # whether it fits: per GPU, below
    fits = [{"key": k, "plan": p} for k, p in plans.items()]
    lines = [render_markdown(first, title, rows), *markdown_table(FITS, fits),
             "", "`af3trt build --target gpu` computes this plan for its own options, refuses one that does not fit "
              "the target GPU before any long step, writes it into manifest.json (`gpu.memory_plan`) and sets "
              "`max_tokens_in_paged_kv_cache` to its KV tokens. Computed, not measured."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="af3trt sizing", description=sizing.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf-model", required=True, type=Path, help="AF3 (or Qwen2) Hugging Face directory")
    ap.add_argument("--gpu", default="h100", choices=sorted(KNOWN_GPUS))
    ap.add_argument("--text-tokens", type=int, default=1024)
    ap.add_argument("--output-tokens", type=int, default=1024)
    ap.add_argument("--reserve-gib", type=float, default=sizing.DEFAULT_RESERVE_BYTES / 1024**3)
    ap.add_argument("--json", action="store_true", help="print the numbers as JSON instead of markdown")
    args = ap.parse_args(argv)
    gpu = KNOWN_GPUS[args.gpu]
    table = sizing.sizing_table(args.hf_model, gpu_bytes=gpu.memory_bytes, gpu_name=gpu.name,
                                text_tokens=args.text_tokens, output_tokens=args.output_tokens,
                                reserve_bytes=int(args.reserve_gib * 1024**3))
    if args.json:
        print(json.dumps(table, indent=2))
        return 0
    print(sizing.render_markdown(table))
    if gpu.name.startswith("NVIDIA H100"):  # printed once (docs/sizing.md): the plan of a default GPU build per GPU
        config = json.loads((args.hf_model / "config.json").read_text(encoding="utf-8"))
        print(default_build_plans(config, {k: KNOWN_GPUS[k] for k in ("a100-40gb", "a100", "h100", "h200")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
