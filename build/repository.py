"""Render the Triton model repository: configs from the typed RepoSpec (model_config protobuf), model.py files
copied from triton_repo/ (never edited by hand in the output).

    out/
      model_repository/<af3|preprocess|encoder|fusion|decoder|postprocess|cancel>/config.pbtxt, 1/model.py
      artifacts/…           (encoder.onnx, lm/, tokenizer files: referenced by relative path parameters)
"""

from __future__ import annotations

import shutil
from pathlib import Path

from af3trt.build.plan import CheckpointFacts, ServingLimits
from af3trt.triton_repo import configs

SOURCES = Path(configs.__file__).parent
# model.py sources that differ by target: the GPU encoder runs the TensorRT plan (triton_repo/encoder_trt)
MODEL_SOURCES = {("gpu", "encoder"): "encoder_trt"}


def spec_fields(checkpoint: CheckpointFacts, limits: ServingLimits) -> dict:
    """The RepoSpec fields both targets take from the checkpoint and the serving limits."""
    return {"hidden_size": checkpoint.text_hidden_size, "end_id": checkpoint.end_id, "pad_id": checkpoint.pad_id,
            "stop_ids": checkpoint.stop_ids, "max_batch_size": limits.max_batch_size,
            "max_audio_windows": limits.max_audio_windows, "max_input_len": limits.max_input_len,
            "max_output_len": limits.max_output_len, "default_max_tokens": limits.served_default_max_tokens}


def render_repository(root: Path, spec: configs.RepoSpec) -> dict[str, str]:
    """Write `root` (a model repository directory that must not exist yet); return {model: config text}."""
    root = Path(root)
    root.mkdir(parents=True)
    rendered = {}
    for name, cfg in configs.all_configs(spec).items():
        model_dir = root / name
        (model_dir / "1").mkdir(parents=True)
        text = configs.render(cfg)
        (model_dir / "config.pbtxt").write_text(text)
        rendered[name] = text
        if cfg.backend == "python":
            source = MODEL_SOURCES.get((spec.target, name), name)
            shutil.copy2(SOURCES / source / "model.py", model_dir / "1" / "model.py")
    return rendered
