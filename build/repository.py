"""Render the Triton model repository: configs from the typed RepoSpec (model_config protobuf), model.py files
copied from triton_repo/ (never edited by hand in the output). repo_spec() makes the RepoSpec of both targets from
the checkpoint and the plan's ServingConfig (each stage's own settings through its record's `serving` metadata,
runtime/stages/params.py); each target adds its encoder and decoder backends.

    out/
      model_repository/<af3|preprocess|encoder|fusion|decoder|postprocess|cancel>/config.pbtxt, 1/model.py
      artifacts/…           (encoder.onnx, lm/, tokenizer files: referenced by relative path parameters)
"""

from __future__ import annotations

import shutil
from pathlib import Path

from af3trt.build.plan import CheckpointFacts, ServingConfig
from af3trt.runtime.stages.contract import STAGES
from af3trt.runtime.stages.params import DecoderFrontParams, StageParams, record_of
from af3trt.triton_repo import configs
from af3trt.triton_repo.configs import RepoSpec

SOURCES = Path(configs.__file__).parent
# model.py sources that differ by target: the GPU encoder runs the TensorRT plan (triton_repo/encoder_trt)
MODEL_SOURCES = {("gpu", "encoder"): "encoder_trt"}


def serving_params(serving: ServingConfig, record: type[StageParams] | None, target: str) -> dict[str, object]:
    """The fields of a stage's record that ServingConfig settings set on `target` (their `serving` metadata)."""
    if record is None:
        return {}
    return {f.name: serving.setting(*f.metadata["serving"]) for f in record.serving_fields()
            if target in serving.targets(f.metadata["serving"][0])}


def repo_spec(checkpoint: CheckpointFacts, serving: ServingConfig, *, target: str, decoder_dtype: str,
              vocab_size: int, tokenizer_dir: str, encoder_max_batch: int, encoder_params: dict[str, object],
              decoder_params: dict[str, object], **backend) -> RepoSpec:
    """The RepoSpec of either target: everything from the checkpoint and the serving configuration is set here, once;
    the target adds its encoder and decoder backends (their parameters, the decoder's dtype and vocabulary, the
    encoder's batch) and, in `backend`, any other RepoSpec field of its own (e.g. the GPU's prompt_table_extra_ids)."""
    s = serving
    own = {"preprocess": backend.pop("preprocess_params", {}), "encoder": encoder_params, "decoder": decoder_params,
           "fusion": {"tokenizer_dir": tokenizer_dir}, "postprocess": {"tokenizer_dir": tokenizer_dir}}
    params = {f"{m}_params": {**serving_params(s, record_of(m, target), target), **own[m]} for m in STAGES}
    # the GPU target's decoder step (and the CPU's in the serving-path benchmark's GPU shape): triton_repo/decoder_front
    params["decoder_front_params"] = {**serving_params(s, DecoderFrontParams, target),
                                      **backend.pop("decoder_front_params", {})}
    return RepoSpec(
        target=target, decoder_dtype=decoder_dtype, vocab_size=vocab_size, hidden_size=checkpoint.text_hidden_size,
        end_id=checkpoint.end_id, pad_id=checkpoint.pad_id, stop_ids=checkpoint.stop_ids,
        max_batch_size=s.max_batch_size, max_audio_windows=s.max_audio_windows, max_input_len=s.max_input_len,
        max_output_len=s.max_output_len, default_max_tokens=s.served_default_max_tokens,
        max_queue_size=s.max_queue_size, queue_timeout_ms=s.queue_timeout_ms,
        preprocess_instances=s.preprocess_instances, encoder_instances=s.encoder_instances,
        fusion_instances=s.fusion_instances, decoder_instances=s.decoder_instances,
        encoder_queue_delay_us=s.encoder_queue_delay_us, encoder_batching=s.encoder_batching,
        encoder_max_batch=encoder_max_batch, **params, **backend)


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
