"""The GPU target of build_engines.py: TensorRT encoder plan + TensorRT-LLM 1.2 decoder engine, same ensemble.

    af3trt build --hf-model DIR --target gpu --precision fp8 --kv-cache fp8 --gpu h100 --out OUT

Steps: check the precision against the GPU (FP8 needs SM 8.9+: refused on A100) → export + validate the encoder
ONNX → cast or quantize it for the engine (fp16/bf16 cast, INT8/FP8 Q/DQ calibrated on real audio features) →
extract the Qwen2 LM → TensorRT-LLM checkpoint for the precision (modelopt PTQ + export, patched and validated) →
accuracy report on CPU (fake quantization vs the unquantized LM) → TensorRT encoder engine → trtllm-build →
repository with the encoder as tensorrt_plan and the decoder as the tensorrtllm backend.

Everything before the two engine builds runs on any machine. `--prepare-only` stops there and writes the exact
engine build plan (artifacts/gpu_build_plan.json) so the engines can be built later on the GPU host; without it,
a machine lacking TensorRT / trtllm-build fails at that step with a clear message.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path

PRECISIONS = ("bf16", "fp16", "fp8", "int8_sq", "int8_wo", "int4_awq")
KV_CACHES = ("auto", "fp8", "int8")
ENCODER_PRECISIONS = ("fp16", "bf16", "fp32", "int8", "fp8")


class GpuBuildError(RuntimeError):
    pass


@dataclass
class GpuOptions:
    precision: str = "bf16"  # decoder weights / activations
    kv_cache: str = "auto"
    encoder_precision: str = "fp16"
    tp_size: int = 1
    gpu: str | None = None  # declared target (h100, a100, l40s, …) when building without that GPU present
    calib_audio: list[Path] = field(default_factory=list)  # audio files for the encoder's INT8/FP8 calibration
    prepare_only: bool = False
    engine_dir_at_serve: str | None = None  # where the decoder engine will be inside the serving container
    accuracy_report: bool = True

    def check(self) -> None:
        for name, value, allowed in (("precision", self.precision, PRECISIONS), ("kv-cache", self.kv_cache, KV_CACHES),
                                     ("encoder-precision", self.encoder_precision, ENCODER_PRECISIONS)):
            if value not in allowed:
                raise GpuBuildError(f"--{name} must be one of {', '.join(allowed)}, got {value!r}")
        if self.tp_size < 1:
            raise GpuBuildError(f"--tp-size must be >= 1, got {self.tp_size}")


def check_target(g: GpuOptions):
    """The target GPU, after refusing precisions it cannot run (before any work is done)."""
    from af3trt.build.gpu import PrecisionError, check_precision, target_gpu
    from af3trt.build.trt_encoder import check_encoder_precision

    try:
        gpu = target_gpu(g.gpu)
        notes = check_precision(g.precision, g.kv_cache, gpu)
        if gpu is not None:
            check_encoder_precision(g.encoder_precision, gpu.sm)
    except (PrecisionError, ValueError) as e:
        raise GpuBuildError(str(e)) from None
    return gpu, notes


def build_gpu(opts, work: Path, prog, manifest: dict) -> None:
    """Called by build_engines.build() inside its scratch directory `work` (moved to opts.out at the end)."""
    from af3trt.build.gpu_repo import gpu_repo_spec, render_gpu_repository
    from af3trt.build.trt_encoder import build_encoder_engine, encoder_engine_plan, encoder_max_windows
    from af3trt.build.trtllm_engine import ServingLimits, decoder_accuracy_report, plan_trtllm_build, run_trtllm_build
    from af3trt.export.extract_lm import extract_language_model
    from af3trt.export.onnx_export import export_encoder
    from af3trt.export.onnx_quant import calibration_set, prepare_encoder
    from af3trt.export.quantize import write_trtllm_checkpoint

    g: GpuOptions = opts.gpu
    g.check()
    info, limits = manifest["checkpoint"]["config"], manifest["limits"]
    art = work / "artifacts"
    final_art = Path(opts.out) / "artifacts"  # where the artifacts will be once the build is moved into place

    gpu, notes = check_target(g)
    manifest["gpu"] = {"target": None if gpu is None else asdict(gpu), "notes": notes, "options": {
        k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(g).items()}}
    for n in notes:
        print(f"    note: {n}", flush=True)

    with prog.step("exporting + validating the encoder ONNX (fp32)"):
        manifest["validation"]["encoder_onnx"] = export_encoder(opts.hf_model, art / "encoder.onnx")
    with prog.step(f"preparing the encoder ONNX for a {g.encoder_precision} engine"):
        calib = calibration_set([Path(p).read_bytes() for p in g.calib_audio] or None) \
            if g.encoder_precision in ("int8", "fp8") else None
        enc_onnx, figures = prepare_encoder(art / "encoder.onnx", art, g.encoder_precision, calib=calib,
                                            hf_dir=opts.hf_model)
        manifest["validation"]["encoder_engine_onnx"] = figures
    with prog.step("extracting the Qwen2 language model"):
        lm = extract_language_model(opts.hf_model, art / "lm")
        manifest["language_model"] = {k: v for k, v in lm.items() if k != "shapes"}
    with prog.step(f"writing the TensorRT-LLM checkpoint ({g.precision}, kv {g.kv_cache}, tp {g.tp_size})"):
        ckpt = write_trtllm_checkpoint(art / "lm", art / "trtllm_checkpoint", precision=g.precision,
                                       kv_cache=g.kv_cache, tp_size=g.tp_size)
        manifest["trtllm_checkpoint"] = ckpt
    if g.accuracy_report:
        with prog.step("decoder accuracy on CPU (fake quantization vs the unquantized LM)"):
            acc = decoder_accuracy_report(art / "lm", g.precision, g.kv_cache)
            manifest["validation"]["decoder_accuracy"] = acc

    max_windows = encoder_max_windows(limits["max_batch_size"], limits["max_audio_windows"])
    serving = ServingLimits(max_batch_size=limits["max_batch_size"], max_audio_seconds=limits["max_audio_seconds"],
                            max_text_input_len=opts.max_text_len, max_output_len=limits["max_output_len"],
                            tp_size=g.tp_size)
    engine_dir = art / "engine"
    trtllm = plan_trtllm_build(art / "trtllm_checkpoint", engine_dir, serving, g.precision, g.kv_cache,
                               limits["audio_tokens_per_request"], timing_cache=art / "trtllm.timing.cache", gpu=gpu)
    encoder_plan = encoder_engine_plan(max_windows=max_windows)
    plan = {
        "encoder": {"onnx": str(final_art / enc_onnx.name), "plan": str(final_art / "encoder.plan"),
                    "profile": asdict(encoder_plan)},
        "trtllm_build": trtllm.as_dict(),
        "trtllm_build_command": "trtllm-build " + " ".join(shlex.quote(a) for a in trtllm.args).replace(
            str(work), str(opts.out)),
    }
    (art / "gpu_build_plan.json").write_text(json.dumps(plan, indent=2, default=str).replace(str(work), str(opts.out)))
    manifest["gpu"]["build_plan"] = "artifacts/gpu_build_plan.json"
    if g.prepare_only:
        print(f"    --prepare-only: engines not built; the plan is in {final_art / 'gpu_build_plan.json'}", flush=True)
        return

    with prog.step(f"building the TensorRT encoder engine (1…{max_windows} windows)"):
        manifest["encoder_engine"] = build_encoder_engine(enc_onnx, art / "encoder.plan", max_windows=max_windows,
                                                          timing_cache=art / "encoder.timing.cache")
    with prog.step("building the TensorRT-LLM decoder engine (trtllm-build)"):
        manifest["decoder_engine"] = run_trtllm_build(trtllm.args, work / "logs" / "trtllm-build.log")
    with prog.step("rendering the Triton model repository (tensorrt_plan + tensorrtllm)"):
        spec = gpu_repo_spec(info, limits, engine_dir=engine_dir, tokenizer_dir="artifacts/lm",
                             encoder_max_windows=max_windows,
                             engine_dir_at_serve=g.engine_dir_at_serve or str(final_art / "engine"))
        render_gpu_repository(work / "model_repository", spec, encoder_plan=art / "encoder.plan")
    manifest["repository"] = {"spec": asdict(spec)}
    manifest["precisions"] = {"encoder": g.encoder_precision, "encoder_io": "float32", "decoder": g.precision,
                              "kv_cache": g.kv_cache, "prompt_table": spec.decoder_dtype}
