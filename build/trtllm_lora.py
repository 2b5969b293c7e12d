"""think/'s LoRA for TensorRT-LLM 1.2 (GPU target): the engine's LoRA plugin flags, the adapter in the layout the
`tensorrtllm` backend takes, and the backend's LoRA cache parameters. The CPU decoder applies the same adapter per
batch row (runtime/engines/lora.py); the GPU engine does the same in its LoRA plugin.

Facts, and where they were read:
- LoRA and the prompt-embedding table in ONE engine: TensorRT-LLM's QWenModel.forward (tensorrt_llm/models/qwen/
  model.py, read at NVIDIA/TensorRT-LLM commit 04a2cacb, the TensorRT-engine flow that 1.2.x keeps) embeds with
  vocab_embedding(input_ids, prompt_embedding_table, prompt_tasks, prompt_vocab_size) and then runs
  layers.forward(..., lora_params=lora_params): the table enters at the embedding, the LoRA in the layers, both in
  the same forward; a request may carry both (a thinking request with audio). So thinking needs no second engine.
- Mixed batches: tensorrtllm_backend r26.04 docs/lora.md, "The inflight batcher will execute mixed batches with
  multiple LoRAs in the same batch", requests without lora_task_id among them (its multi-LoRA example).
- Backend inputs (triton_backend/all_models/inflight_batcher_llm/tensorrt_llm/config.pbtxt, NVIDIA/TensorRT-LLM
  commit 0c8de69a): lora_task_id UINT64 [1] reshape [] optional; lora_weights TYPE_FP16 [-1, -1] optional ragged,
  "[num_lora_modules_layers, D x Hi + Ho x D]", each row the flattened in (A [D, Hi]) then out (B [Ho, D]) weights;
  lora_config INT32 [-1, 3] optional ragged, rows [module_id, layer_idx, adapter_size]; module ids attn_q 1,
  attn_k 2, attn_v 3, attn_dense 4, mlp_h_to_4h 5, mlp_4h_to_h 6, mlp_gate 7. "To perform inference with a
  specific LoRA for the first time lora_task_id lora_weights and lora_config must all be given ... An error is
  returned if lora_task_id is not cached."
- Preloading (tensorrtllm_backend r26.04 docs/lora.md, "prefetch lora cache"): parameter lora_prefetch_dir, a
  folder per task id named by its digits holding model.lora_config.npy and model.lora_weights.npy; the instance
  loads them at start, so a request sends only lora_task_id (float16 engines only: below). Cache parameters: lora_cache_optimal_adapter_size
  (default 8), lora_cache_max_adapter_size (default 64), lora_cache_gpu_memory_fraction (default 0.05),
  lora_cache_host_memory_bytes (default 1G).
- The converted layout (NVIDIA/TensorRT-LLM examples/hf_lora_convert.py, commit 05316d33): HF q_proj→attn_q,
  k_proj→attn_k, v_proj→attn_v, o_proj→attn_dense, gate_proj→mlp_h_to_4h, up_proj→mlp_gate, down_proj→mlp_4h_to_h;
  scale alpha/r (alpha/sqrt(r) with use_rslora) folded into the out (B) weights; rows zero-padded to the longest;
  weights saved as [1, rows, width], config as int32 [1, rows, 3]; storage float16 by default.
- Build flags (the same docs/lora.md trtllm-build example): --lora_plugin <dtype> --lora_target_modules <names>
  --max_lora_rank <r>. The plugin's dtype is the engine's (its pages are: below).
- The dtype (third reading, 2026-12-07): the PEFT cache's host and device pages are allocated in the engine's dtype
  (NVIDIA/TensorRT-LLM cpp/tensorrt_llm/batch_manager/peftCacheManager.cpp at 9df6d722, getPageManagerConfig:
  modelConfig.getDataType() for getMaxNumSlots and both page configs); a prefetched adapter is copied into them
  row by row (runtime/loraCache.cpp copyToPages → runtime/bufferManager.cpp at 1a43c7d6 BufferManager::copy:
  "Incompatible data types"), and request weights must have that dtype (runtime/loraUtils.cpp at 2a9abd95:
  "Expected lora weights to be the same data type as base model"; TensorRT-LLM issues #2434, #2628). .npy files
  are read by runtime/utils/numpyUtils.cpp (at 05316d33) typeFromNumpyDesc, which knows f2 and f4, not bf16
  (tensorrtllm_backend issue #791: a bf16 engine with an fp16 prefetch answered as the base model). So a float16
  engine preloads the adapter (lora_prefetch_dir), and any other engine (AF3: bf16) is sent it with a request by the
  decoder front (runtime/triton/decoder_front.py), from the same files with the weights in the engine's dtype.
- Cache sizes (the same getPageManagerConfig, tp 1, one pipeline rank): per module of the engine's LoRA modules a
  row of in + out values per rank; pageWidth = the smallest module's in + out; one max-sized adapter needs
  minTotalSlots = ceil(maxAdapterSize x sum(in + out) x layers / pageWidth) slots of pageWidth values; the host
  cache has lora_cache_host_memory_bytes / (pageWidth x dtype bytes) slots and the device cache
  lora_cache_gpu_memory_fraction x (free GPU memory + the memory pool's free bytes) / the same, each refused below
  minTotalSlots ("Not enough space allocated to host|device LoRA cache to hold 1 max sized LoRA"); pages hold
  numSlotsPerPage = max(optimalAdapterSize x sum(ceil((in + out) / pageWidth)) x layers, ceil(maxAdapterSize x
  max(in + out) / pageWidth)) slots, and the cache allocates whole pages. The device cache is made when the executor
  starts, before the KV cache (batch_manager/trtGptModelInflightBatching.cpp at 00825c4e: PeftCacheManager before
  calculateFreeMemBytes), so the memory plan counts it and the build renders a fraction from the adapter's size.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

# HF projection → TensorRT-LLM LoRA module name → the backend's module id (sources above)
TRTLLM_MODULES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_dense",
                  "gate_proj": "mlp_h_to_4h", "up_proj": "mlp_gate", "down_proj": "mlp_4h_to_h"}
MODULE_IDS = {"attn_qkv": 0, "attn_q": 1, "attn_k": 2, "attn_v": 3, "attn_dense": 4, "mlp_h_to_4h": 5,
              "mlp_4h_to_h": 6, "mlp_gate": 7}
WEIGHTS_FILE, CONFIG_FILE = "model.lora_weights.npy", "model.lora_config.npy"
DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}
PREFETCH_DTYPES = ("float16",)  # numpyUtils.cpp reads f2 and f4; every upstream prefetch example is float16
DEVICE_CACHE_MARGIN = 2  # the device cache is rendered to hold the adapter twice over at the least free memory


def convert(think) -> tuple[np.ndarray, np.ndarray]:
    """think (export/think.Think) → (lora_weights [1, rows, width] float32, lora_config [1, rows, 3] int32), one row
    per (layer, module), ordered by layer then projection; the engine's dtype is applied by write_adapter."""
    from af3trt.export.think import LM_PROJECTIONS

    rows, config = [], []
    def order(name):
        _, _, layer, _, proj = name.split(".")
        return int(layer), LM_PROJECTIONS.index(proj)

    for name in sorted(think.lora, key=order):
        a, b = think.lora[name]  # A [r, in], B [out, r]
        layer, proj = order(name)
        rows.append(np.concatenate([a.float().numpy().reshape(-1),
                                    (b.float() * think.scaling).numpy().reshape(-1)]))
        config.append([MODULE_IDS[TRTLLM_MODULES[LM_PROJECTIONS[proj]]], layer, think.rank])
    width = max(len(r) for r in rows)
    weights = np.stack([np.pad(r, (0, width - len(r))) for r in rows]).astype(np.float32)[None]
    return weights, np.asarray(config, np.int32)[None]


def stored(weights: np.ndarray, dtype: str) -> np.ndarray:
    """The weights as the backend takes them, in the engine's dtype; bfloat16 as its bits in uint16 (numpy has no
    bfloat16; the decoder front views them as torch.bfloat16)."""
    if dtype == "bfloat16":
        import torch

        return torch.from_numpy(weights).to(torch.bfloat16).view(torch.uint16).numpy()
    return weights.astype({"float16": np.float16, "float32": np.float32}[dtype])


def write_adapter(think, root: Path, task_id: int, dtype: str) -> Path:
    """<root>/<task_id>/model.lora_{weights,config}.npy, the weights in the engine's dtype: the backend's
    lora_prefetch_dir layout (float16 engines preload it) and what the decoder front sends with a request."""
    weights, config = convert(think)
    out = Path(root) / str(task_id)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / WEIGHTS_FILE, stored(weights, dtype))
    np.save(out / CONFIG_FILE, config)
    return Path(root)


def build_flags(think, dtype: str) -> list[str]:
    """trtllm-build's LoRA plugin flags for this adapter; dtype: the engine's (the TensorRT-LLM checkpoint's)."""
    return ["--lora_plugin", dtype, "--lora_target_modules", *[TRTLLM_MODULES[m] for m in think.modules],
            "--max_lora_rank", str(think.rank)]


@dataclass(frozen=True)
class LoraPages:
    """The PEFT cache's page arithmetic for this adapter in the engine's dtype (module docstring, "Cache sizes")."""

    dtype: str
    slot_bytes: int  # pageWidth x dtype bytes
    slots_per_page: int
    min_slots: int  # one max-sized adapter (max adapter size = the adapter's rank)

    @property
    def adapter_bytes(self) -> int:
        return self.min_slots * self.slot_bytes

    @property
    def page_bytes(self) -> int:
        return self.slots_per_page * self.slot_bytes

    def device_cache_bytes(self, fraction: float, free_bytes: int) -> int:
        """What the device cache allocates with `fraction` of `free_bytes` free: whole pages."""
        slots = int(fraction * free_bytes / self.slot_bytes)
        return math.ceil(slots / self.slots_per_page) * self.page_bytes

    def as_dict(self) -> dict:
        return asdict(self)


def pages(think, dtype: str, layers: int) -> LoraPages:
    """The page arithmetic of the backend's LoRA caches for this adapter (tp 1): each module's in + out from the
    adapter's own A [r, in] and B [out, r] (the engine's LoRA module dims, runtime/loraModule.cpp)."""
    dims = {}
    for name, (a, b) in think.lora.items():
        dims.setdefault(name.rsplit(".", 1)[-1], a.shape[1] + b.shape[0])
    one_d = [dims[m] for m in think.modules]
    width = min(one_d)
    per_page = max(think.rank * sum(math.ceil(d / width) for d in one_d) * layers,
                   math.ceil(think.rank * max(one_d) / width))
    return LoraPages(dtype=dtype, slot_bytes=width * DTYPE_BYTES[dtype], slots_per_page=per_page,
                     min_slots=math.ceil(think.rank * sum(one_d) * layers / width))


def device_fraction(lora: LoraPages, free_bytes: int) -> float:
    """lora_cache_gpu_memory_fraction: DEVICE_CACHE_MARGIN adapters at `free_bytes` (the least GPU memory free when the
    executor starts: build/memory_plan.py), instead of the backend's 5 % of it (about 3 GB on an H100)."""
    return min(1.0, DEVICE_CACHE_MARGIN * lora.adapter_bytes / free_bytes)


def fraction_text(fraction: float) -> str:
    """A fraction as the backend parses it (a plain decimal, rounded up: never below what was planned)."""
    digits = 12
    return f"{math.ceil(fraction * 10**digits) / 10**digits:.{digits}f}".rstrip("0")


def decoder_parameters(rank: int, lora: LoraPages, *, prefetch_dir: str | None, gpu_fraction: float | None) -> dict:
    """The tensorrtllm model's LoRA parameters: a cache page per module of the adapter's rank, a host cache that holds
    the adapter twice over (in the engine's dtype), the device fraction rendered from the adapter (None: the
    backend's default, when no GPU is known to size it) and, for a float16 engine, the preloaded adapter."""
    params = {"lora_cache_optimal_adapter_size": str(rank), "lora_cache_max_adapter_size": str(rank),
              "lora_cache_host_memory_bytes": str(2 * lora.adapter_bytes)}
    if gpu_fraction is not None:
        params["lora_cache_gpu_memory_fraction"] = fraction_text(gpu_fraction)
    if prefetch_dir is not None:
        params["lora_prefetch_dir"] = prefetch_dir
    return params
