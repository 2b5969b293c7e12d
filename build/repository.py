"""Render the Triton model repository: configs from the typed RepoSpec (model_config protobuf), model.py files
copied from triton_repo/ (never edited by hand in the output).

    out/
      model_repository/<af3|preprocess|encoder|fusion|decoder|postprocess|cancel>/config.pbtxt, 1/model.py
      artifacts/…           (encoder.onnx, lm/, tokenizer files: referenced by relative path parameters)
"""

from __future__ import annotations

import shutil
from pathlib import Path

from af3trt.triton_repo import configs

SOURCES = Path(configs.__file__).parent
PYTHON_MODELS = ("preprocess", "encoder", "fusion", "decoder", "postprocess", "cancel")
# model.py sources that differ by target: the GPU encoder runs the TensorRT plan (triton_repo/encoder_trt)
MODEL_SOURCES = {("gpu", "encoder"): "encoder_trt"}


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
