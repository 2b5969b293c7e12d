"""Build AF3's thinking mode beside the base model (docs/thinking.md): the think/ folder of the checkpoint
(export/think.py reads and sorts it) becomes

    artifacts/think/encoder.onnx        the encoder + projector with think/'s audio-side overrides (when it has any):
                                        the encoder stage runs thinking requests' windows on it
    artifacts/think/lora/lora.json      the LoRA in Qwen2 module names for the decoder (runtime/engines/lora.py), applied
    artifacts/think/lora/lora.safetensors   per batch row to requests that carry lora_task_id

and the repository parameters that wire them: encoder think_onnx_path, decoder lora_dir, fusion think (+ its task
id). A checkpoint without think/, or --no-think, builds the base model only; its fusion refuses thinking requests.
"""

from __future__ import annotations

import json
from pathlib import Path

from af3trt.build.common import BuildError

THINK_TASK_ID = 1  # the decoder's LoRA task id of think/ (TensorRT-LLM lora_task_id: any uint64, one adapter here)


def load(hf_model: Path, enabled: bool):
    """think/ of the checkpoint, read and sorted; None without one or when disabled (BuildError naming the keys
    af3trt cannot place)."""
    from af3trt.export.think import ThinkError, find_think, read_think

    found = find_think(hf_model) if enabled else None
    if found is None:
        return None
    try:
        return read_think(found)
    except ThinkError as e:
        raise BuildError(f"{e} (build with --no-think to serve the base model only)") from None


def write_lora(think, out: Path) -> Path:
    """lora.json + lora.safetensors for runtime/engines/lora.py (A [r, in], B [out, r] as stored)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, (a, b) in think.lora.items():
        tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"] = a.contiguous(), b.contiguous()
    save_file(tensors, out / "lora.safetensors")
    (out / "lora.json").write_text(json.dumps({
        "task_id": THINK_TASK_ID, "rank": think.rank, "alpha": think.alpha, "scaling": think.scaling,
        "modules": sorted(think.lora)}, indent=2))
    return out


def build_cpu(think, hf_model: Path, art: Path, report) -> dict[str, dict[str, object]]:
    """Write the CPU artifacts of think/; return the extra parameters per model (encoder, decoder, fusion: fields of
    their records, runtime/stages/params.py)."""
    from af3trt.export.onnx_export import export_encoder

    params: dict[str, dict[str, object]] = {"encoder": {}, "decoder": {}, "fusion": {"think": True}}
    if think.encoder_overrides:
        report.validation["think_encoder_onnx"] = export_encoder(hf_model, art / "think" / "encoder.onnx",
                                                                 overrides=think.encoder_overrides)
        params["encoder"]["think_onnx_path"] = "artifacts/think/encoder.onnx"
    if think.lora:
        write_lora(think, art / "think" / "lora")
        params["decoder"]["lora_dir"] = "artifacts/think/lora"
        params["fusion"]["think_lora_task_id"] = THINK_TASK_ID
    report.sections["think"] = {**think.summary(), "task_id": THINK_TASK_ID if think.lora else None,
                                "encoder_variant": bool(think.encoder_overrides)}
    return params


# ---------------------------------------------------------------------------------------------- GPU target
# artifacts/think/gpu.json records what the prepare step made, so the engine half (`--from-prepared`, in the serving
# container without export/'s dependencies) builds and wires it without reading think/ again.
GPU_RECORD = "think/gpu.json"
THINK_PLAN = "think.plan"  # the think encoder's TensorRT engine, beside model.plan in encoder/1/
LORA_DIR = "think/lora"  # under artifacts/: <task id>/model.lora_{weights,config}.npy in the engine's dtype


def prepare_gpu(think, plan, art: Path, engine_dtype: str, calib=None) -> dict:
    """The GPU half's artifacts of think/: the LoRA in the engine's dtype (engine_dtype: the TensorRT-LLM checkpoint's),
    the trtllm-build LoRA flags, the LoRA cache's page arithmetic, and the think encoder ONNX (prepared for the plan's
    encoder precision) when think/ overrides the audio side. One engine serves both modes (build/trtllm_lora.py says
    why); a float16 engine preloads the adapter, any other is sent it by the decoder front."""
    from af3trt.build import trtllm_lora
    from af3trt.export.onnx_export import export_encoder
    from af3trt.export.onnx_quant import prepare_encoder

    record = {"task_id": THINK_TASK_ID, "encoder_onnx": None, "trtllm_build_flags": [], "lora": None,
              "summary": think.summary()}
    if think.encoder_overrides:
        export_encoder(plan.hf_model, art / "think" / "encoder.onnx", overrides=think.encoder_overrides)
        onnx, _ = prepare_encoder(art / "think" / "encoder.onnx", art / "think", plan.gpu.encoder_precision,
                                  calib=calib, hf_dir=plan.hf_model)
        record["encoder_onnx"] = f"artifacts/{onnx.relative_to(art)}"
    if think.lora:
        trtllm_lora.write_adapter(think, art / LORA_DIR, THINK_TASK_ID, engine_dtype)
        record["trtllm_build_flags"] = trtllm_lora.build_flags(think, engine_dtype)
        pages = trtllm_lora.pages(think, engine_dtype, plan.checkpoint.text["num_hidden_layers"])
        record["lora"] = {"dir": LORA_DIR, "dtype": engine_dtype, "rank": think.rank,
                          "preloaded": engine_dtype in trtllm_lora.PREFETCH_DTYPES, "pages": pages.as_dict()}
    (art / GPU_RECORD).write_text(json.dumps(record, indent=2))
    return record


def read_gpu(art: Path) -> dict | None:
    path = Path(art) / GPU_RECORD
    return json.loads(path.read_text()) if path.exists() else None


def lora_pages(record: dict):
    """The adapter's build/trtllm_lora.LoraPages from the record, or None without an adapter."""
    from af3trt.build.trtllm_lora import LoraPages

    return None if not record.get("lora") else LoraPages(**record["lora"]["pages"])


def memory(memory_plan, record: dict):
    """The GPU memory plan with think/ (build/memory_plan.py with_think): the encoder variant's weights and the LoRA
    device cache."""
    from af3trt.build.memory_plan import with_think

    return with_think(memory_plan, encoder_variant=bool(record["encoder_onnx"]), lora=lora_pages(record))


def gpu_spec(spec, record: dict, art_at_serve: Path, memory_plan=None):
    """The GPU RepoSpec with think/ wired: the decoder's LoRA cache (and, float16, its preloaded adapter), the decoder
    front's adapter, the encoder's think plan, the fusion's thinking switch and task id. memory_plan: the plan with
    think (memory()), whose LoRA device fraction is rendered."""
    from dataclasses import replace

    from af3trt.build import trtllm_lora

    decoder, front = {}, {}
    lora = record.get("lora")
    if lora:
        folder = str(Path(art_at_serve) / lora["dir"])
        fraction = None if memory_plan is None else memory_plan.lora_cache_gpu_memory_fraction
        decoder = trtllm_lora.decoder_parameters(lora["rank"], lora_pages(record),
                                                 prefetch_dir=folder if lora["preloaded"] else None,
                                                 gpu_fraction=fraction)
        front = {"lora_dir": folder, "lora_task": int(record["task_id"]), "lora_dtype": lora["dtype"],
                 "lora_preloaded": bool(lora["preloaded"])}
    fusion = {"think": True, **({"think_lora_task_id": int(record["task_id"])} if lora else {})}
    encoder = {"think_plan_file": THINK_PLAN} if record["encoder_onnx"] else {}
    return replace(spec, decoder_params={**spec.decoder_params, **decoder},
                   decoder_front_params={**spec.decoder_front_params, **front},
                   encoder_params={**spec.encoder_params, **encoder},
                   fusion_params={**spec.fusion_params, **fusion})
