"""Build AF3's thinking mode beside the base model (docs/thinking.md): the think/ folder of the checkpoint
(export/think.py reads and sorts it) becomes

    artifacts/think/encoder.onnx        the encoder + projector with think/'s audio-side overrides (when it has any):
                                        the encoder stage runs thinking requests' windows on it
    artifacts/think/lora/lora.json      the LoRA in Qwen2 module names for the decoder (runtime/lora.py), applied
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
    """lora.json + lora.safetensors for runtime/lora.py (A [r, in], B [out, r] as stored)."""
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


def build_cpu(think, hf_model: Path, art: Path, report) -> dict[str, dict[str, str]]:
    """Write the CPU artifacts of think/; return the extra parameters per model (encoder, decoder, fusion)."""
    from af3trt.export.onnx_export import export_encoder

    params: dict[str, dict[str, str]] = {"encoder": {}, "decoder": {}, "fusion": {"think": "true"}}
    if think.encoder_overrides:
        report.validation["think_encoder_onnx"] = export_encoder(hf_model, art / "think" / "encoder.onnx",
                                                                 overrides=think.encoder_overrides)
        params["encoder"]["think_onnx_path"] = "artifacts/think/encoder.onnx"
    if think.lora:
        write_lora(think, art / "think" / "lora")
        params["decoder"]["lora_dir"] = "artifacts/think/lora"
        params["fusion"]["think_lora_task_id"] = str(THINK_TASK_ID)
    report.sections["think"] = {**think.summary(), "task_id": THINK_TASK_ID if think.lora else None,
                                "encoder_variant": bool(think.encoder_overrides)}
    return params
