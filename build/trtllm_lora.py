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
- Preloading instead (tensorrtllm_backend r26.04 docs/lora.md, "prefetch lora cache"): parameter lora_prefetch_dir,
  a folder per task id named by its digits holding model.lora_config.npy and model.lora_weights.npy; the instance
  loads them at start, so fusion sends only lora_task_id. Cache parameters: lora_cache_optimal_adapter_size
  (default 8), lora_cache_max_adapter_size (default 64), lora_cache_gpu_memory_fraction (default 0.05),
  lora_cache_host_memory_bytes (default 1G).
- The converted layout (NVIDIA/TensorRT-LLM examples/hf_lora_convert.py, commit 05316d33): HF q_proj→attn_q,
  k_proj→attn_k, v_proj→attn_v, o_proj→attn_dense, gate_proj→mlp_h_to_4h, up_proj→mlp_gate, down_proj→mlp_4h_to_h;
  scale alpha/r (alpha/sqrt(r) with use_rslora) folded into the out (B) weights; rows zero-padded to the longest;
  weights saved as [1, rows, width], config as int32 [1, rows, 3]; storage float16 by default.
- Build flags (the same docs/lora.md trtllm-build example): --lora_plugin <dtype> --lora_target_modules <names>
  --max_lora_rank <r>.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# HF projection → TensorRT-LLM LoRA module name → the backend's module id (sources above)
TRTLLM_MODULES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_dense",
                  "gate_proj": "mlp_h_to_4h", "up_proj": "mlp_gate", "down_proj": "mlp_4h_to_h"}
MODULE_IDS = {"attn_qkv": 0, "attn_q": 1, "attn_k": 2, "attn_v": 3, "attn_dense": 4, "mlp_h_to_4h": 5,
              "mlp_4h_to_h": 6, "mlp_gate": 7}
STORAGE_DTYPE = np.float16  # config.pbtxt declares lora_weights TYPE_FP16
WEIGHTS_FILE, CONFIG_FILE = "model.lora_weights.npy", "model.lora_config.npy"
CACHE_GPU_FRACTION = "0.05"  # the backend's default


def convert(think) -> tuple[np.ndarray, np.ndarray]:
    """think (export/think.Think) → (lora_weights [1, rows, width] f16, lora_config [1, rows, 3] i32), one row per
    (layer, module), ordered by layer then projection."""
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
    weights = np.stack([np.pad(r, (0, width - len(r))) for r in rows]).astype(STORAGE_DTYPE)[None]
    return weights, np.asarray(config, np.int32)[None]


def write_prefetch(think, root: Path, task_id: int) -> Path:
    """<root>/<task_id>/model.lora_{weights,config}.npy: the backend's lora_prefetch_dir layout."""
    weights, config = convert(think)
    out = Path(root) / str(task_id)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / WEIGHTS_FILE, weights)
    np.save(out / CONFIG_FILE, config)
    return Path(root)


def build_flags(think, dtype: str) -> list[str]:
    """trtllm-build's LoRA plugin flags for this adapter (dtype: the engine's, e.g. bfloat16)."""
    return ["--lora_plugin", dtype, "--lora_target_modules", *[TRTLLM_MODULES[m] for m in think.modules],
            "--max_lora_rank", str(think.rank)]


def adapter_bytes(think) -> int:
    """Bytes of the converted adapter (what the LoRA cache holds for it)."""
    return sum(a.numel() + b.numel() for a, b in think.lora.values()) * np.dtype(STORAGE_DTYPE).itemsize


def decoder_parameters(prefetch_dir: str, think) -> dict[str, str]:
    """The tensorrtllm model's LoRA parameters: the adapter preloaded from prefetch_dir, a cache page per module of
    its rank, a host cache that holds it twice over."""
    return {"lora_prefetch_dir": prefetch_dir, "lora_cache_optimal_adapter_size": str(think.rank),
            "lora_cache_max_adapter_size": str(think.rank), "lora_cache_gpu_memory_fraction": CACHE_GPU_FRACTION,
            "lora_cache_host_memory_bytes": str(2 * adapter_bytes(think))}
