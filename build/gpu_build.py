"""The GPU target of build_engines.py: TensorRT encoder plan + TensorRT-LLM 1.2 decoder engine, same ensemble.

    af3trt build --hf-model DIR --target gpu --precision fp8 --kv-cache fp8 --gpu h100 --out OUT

Steps: check the precision against the GPU (FP8 needs SM 8.9+: refused on A100) → export + validate the encoder
ONNX → cast or quantize it for the engine (fp16/bf16 cast, INT8/FP8 Q/DQ calibrated on real audio features) →
extract the Qwen2 LM → TensorRT-LLM checkpoint for the precision (modelopt PTQ + export, patched and validated) →
accuracy report on CPU (fake quantization vs the unquantized LM) → TensorRT encoder engine → trtllm-build →
repository with the encoder as a python model running the TensorRT plan and the decoder as the tensorrtllm backend.

Everything before the two engine builds runs on any machine. `--prepare-only` stops there and writes the exact
engine build plan (artifacts/gpu_build_plan.json) so the engines can be built later on the GPU host; without it,
a machine lacking TensorRT / trtllm-build fails at that step with a clear message.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from af3trt.build.common import BuildError

PRECISIONS = ("bf16", "fp16", "fp8", "int8_sq", "int8_wo", "int4_awq")
KV_CACHES = ("auto", "fp8", "int8")
ENCODER_PRECISIONS = ("fp16", "bf16", "fp32", "int8", "fp8")


class GpuBuildError(BuildError):
    """A GPU build that cannot work (a BuildError: `af3trt build` prints it as a clean error)."""


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
    goldens: bool = True  # reference answers for `af3trt gpu-check` (export/goldens.py), written where transformers is

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
    from af3trt.build.trtllm_engine import decoder_accuracy_report
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
    plan = preflight(opts.hf_model, g, limits, gpu)  # refuses what cannot work, before any long step
    manifest["gpu"]["memory_plan"] = plan.as_dict()
    doctor_build_tools(g.prepare_only)  # TensorRT and trtllm-build present when the engines are built here

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
    if g.goldens:
        from af3trt.export.goldens import write_goldens

        with prog.step("golden answers for `af3trt gpu-check` (transformers, greedy)"):
            manifest["goldens"] = write_goldens(opts.hf_model, art)
    if g.accuracy_report:
        with prog.step("decoder accuracy on CPU (fake quantization vs the unquantized LM)"):
            acc = decoder_accuracy_report(art / "lm", g.precision, g.kv_cache)
            manifest["validation"]["decoder_accuracy"] = acc

    manifest["gpu"]["encoder_onnx"] = f"artifacts/{enc_onnx.name}"
    plans = engine_plans(work, Path(opts.out), manifest, gpu)
    (art / "gpu_build_plan.json").write_text(json.dumps(plans["public"], indent=2, default=str))
    manifest["gpu"]["build_plan"] = "artifacts/gpu_build_plan.json"
    if g.prepare_only:
        print(f"    --prepare-only: engines not built; the plan is in {final_art / 'gpu_build_plan.json'}; build them "
              f"with `af3trt build --from-prepared {opts.out}` where TensorRT and trtllm-build are", flush=True)
        return
    build_engines_and_repository(work, Path(opts.out), manifest, plans, prog, work / "model_repository")


def engine_plans(root: Path, final_root: Path, manifest: dict, gpu) -> dict:
    """The two engine builds for a prepared output at `root` (which will live at `final_root`): the TensorRT
    encoder profile and the trtllm-build command line, both derived from the manifest's limits and options."""
    from af3trt.build.memory_plan import encoder_profile_windows
    from af3trt.build.trt_encoder import encoder_engine_plan
    from af3trt.build.trtllm_engine import plan_trtllm_build

    limits, g = manifest["limits"], manifest["gpu"]["options"]
    art = root / "artifacts"
    trtllm = plan_trtllm_build(art / "trtllm_checkpoint", art / "engine", serving_limits_of(limits, g["tp_size"]),
                               g["precision"], g["kv_cache"], limits["audio_tokens_per_request"],
                               timing_cache=art / "trtllm.timing.cache", gpu=gpu)
    # the encoder takes per execution what the decoder can take per iteration (build/memory_plan.py)
    max_windows = encoder_profile_windows(limits["max_batch_size"], limits["max_audio_windows"],
                                          trtllm.derived["max_num_tokens"])
    encoder = encoder_engine_plan(max_windows=max_windows)
    public = {
        "encoder": {"onnx": manifest["gpu"]["encoder_onnx"], "plan": "artifacts/encoder.plan",
                    "profile": asdict(encoder)},
        "trtllm_build": trtllm.as_dict(),
        "trtllm_build_command": "trtllm-build " + " ".join(shlex.quote(a) for a in trtllm.args),
    }
    text = json.dumps(public, default=str).replace(str(root), str(final_root))
    return {"encoder": encoder, "trtllm": trtllm, "public": json.loads(text)}


def build_engines_and_repository(root: Path, final_root: Path, manifest: dict, plans: dict, prog,
                                 repo_dir: Path) -> None:
    """TensorRT encoder engine, trtllm-build, then the python-encoder + tensorrtllm repository at repo_dir."""
    from af3trt.build.gpu_repo import (TrtllmOptions, backend_options, gpu_repo_spec, read_decoder_engine,
                                       render_gpu_repository)
    from af3trt.build.trt_encoder import build_encoder_engine
    from af3trt.build.trtllm_engine import run_trtllm_build

    art, enc = root / "artifacts", plans["encoder"]
    with prog.step(f"building the TensorRT encoder engine (1…{enc.max_windows} windows)"):
        manifest["encoder_engine"] = build_encoder_engine(
            root / manifest["gpu"]["encoder_onnx"], art / "encoder.plan", max_windows=enc.max_windows,
            opt_windows=enc.opt_windows, timing_cache=art / "encoder.timing.cache")
    with prog.step("building the TensorRT-LLM decoder engine (trtllm-build)"):
        manifest["decoder_engine"] = run_trtllm_build(plans["trtllm"].args, root / "logs" / "trtllm-build.log")
    with prog.step("rendering the Triton model repository (TensorRT encoder in python + tensorrtllm)"):
        g = manifest["gpu"]["options"]
        engine = read_decoder_engine(art / "engine")  # what trtllm-build actually built (its plugin_config)
        kv_tokens = (manifest["gpu"].get("memory_plan") or {}).get("kv_cache_tokens")
        options = backend_options(engine, TrtllmOptions(max_tokens_in_paged_kv_cache=kv_tokens))
        spec = gpu_repo_spec(manifest["checkpoint"]["config"], manifest["limits"], engine_dir=art / "engine",
                             tokenizer_dir="artifacts/lm", encoder_max_windows=enc.max_windows, engine=engine,
                             options=options,
                             engine_dir_at_serve=g.get("engine_dir_at_serve") or str(final_root / "artifacts" / "engine"))
        render_gpu_repository(repo_dir, spec, encoder_plan=art / "encoder.plan")
    manifest["gpu"]["backend_options"] = asdict(options)
    manifest["repository"] = {"spec": asdict(spec)}
    manifest["precisions"] = {"encoder": g["encoder_precision"], "encoder_io": "float32", "decoder": g["precision"],
                              "kv_cache": g["kv_cache"], "prompt_table": spec.decoder_dtype}


def doctor_build_tools(prepare_only: bool) -> None:
    """af3trt doctor's build checks (runtime/doctor.py), as a GpuBuildError."""
    from af3trt.runtime.doctor import DoctorError, build_checks

    try:
        build_checks(prepare_only)
    except DoctorError as e:
        raise GpuBuildError(str(e)) from None


def weight_only_shape_problems(text: dict, precision: str, tp_size: int) -> list[str]:
    """Why int8_wo / int4_awq cannot be built at this tp size for these layer shapes ([] when they can).

    The rules are the checkpoint validator's (build/trtllm_checkpoint.py, from TensorRT-LLM 1.2's weight-only and
    AWQ linear layers): trtllm-build pads weight-only layers to multiples of 64 x tp, AWQ layers to multiples of
    max(64, group size) x tp, and the AWQ group size (128 or 64: the groupwise kernels' sizes) must divide every
    rank's input width (export/quantize.awq_block_size_for). A checkpoint whose full shapes are not such multiples
    cannot load, so it is refused here rather than after calibration.
    """
    from af3trt.export.quantize import QuantizeError, awq_block_size_for

    heads, kv_heads, hidden = text["num_attention_heads"], text.get("num_key_value_heads"), text["hidden_size"]
    hd = text.get("head_dim") or hidden // heads
    inter = text["intermediate_size"]
    if precision == "int4_awq":
        try:
            multiple = max(64, awq_block_size_for(text, tp_size)) * tp_size
        except QuantizeError as e:
            return [f"int4_awq with --tp-size {tp_size}: {e}"]
    else:
        multiple = 64 * tp_size
    shapes = {"qkv": ((heads + 2 * (kv_heads or heads)) * hd, hidden), "dense": (hidden, heads * hd),
              "mlp.fc/gate": (inter, hidden), "mlp.proj": (hidden, inter)}
    bad = [f"{n} {list(s)}" for n, s in shapes.items() if s[0] % multiple or s[1] % multiple]
    return [f"{precision} layers are padded to multiples of {multiple} by trtllm-build at tp {tp_size}; "
            f"{', '.join(bad)} are not, so the checkpoint could not load"] if bad else []


def serving_limits_of(limits: dict, tp_size: int):
    """The trtllm-build ServingLimits of a manifest's limits."""
    from af3trt.build.trtllm_engine import ServingLimits

    return ServingLimits(max_batch_size=limits["max_batch_size"], max_audio_seconds=limits["max_audio_seconds"],
                         max_text_input_len=limits["max_input_len"] - limits["audio_tokens_per_request"],
                         max_output_len=limits["max_output_len"], tp_size=tp_size)


def preflight(hf_model: Path, g: GpuOptions, limits: dict, gpu):
    """Refuse, before any long step, a combination that cannot work; return the GPU memory plan.

    Refused (each with its source):
      - a GPU that cannot run the precision: check_target (build/gpu.py);
      - a prompt longer than max_num_tokens (so chunked context is needed) with a KV cache for which TensorRT-LLM 1.2
        builds no paged context FMHA (builder.py: INT8 KV cache; FP8 KV cache under non-FP8 weights), since
        "Chunked context requires ... paged context FMHA" (trtGptModelInflightBatching.cpp): plan_trtllm_build;
      - a tensor-parallel size that does not divide the attention heads or the MLP width (TensorRT-LLM splits both
        per rank); for weight-only precisions, layer shapes that trtllm-build cannot pad-load (weight_only_shape_problems);
      - a memory plan that does not fit the target GPU (build/memory_plan.py).
    """
    from af3trt.build.memory_plan import MemoryPlanError, check_fits, plan_for_config
    from af3trt.build.trtllm_engine import plan_trtllm_build

    config = json.loads((Path(hf_model) / "config.json").read_text(encoding="utf-8"))
    text = config.get("text_config") or config
    problems = []
    for what, n in (("attention heads", text["num_attention_heads"]), ("intermediate size", text["intermediate_size"])):
        if n % g.tp_size:
            problems.append(f"--tp-size {g.tp_size} does not divide the {what} ({n})")
    if g.precision in ("int8_wo", "int4_awq") and not problems:
        problems += weight_only_shape_problems(text, g.precision, g.tp_size)
    try:
        # placeholder paths: nothing is read or written, only the limits are derived and checked
        trtllm = plan_trtllm_build(Path("checkpoint-not-written-yet"), Path("engine"),
                                   serving_limits_of(limits, g.tp_size), g.precision, g.kv_cache,
                                   limits["audio_tokens_per_request"], gpu=gpu)
    except ValueError as e:
        problems.append(str(e))
        trtllm = None
    if problems:
        raise GpuBuildError(f"precision {g.precision}, KV cache {g.kv_cache}, tp {g.tp_size} cannot work: "
                            + "; ".join(problems))
    plan = plan_for_config(config, precision=g.precision, kv_cache=g.kv_cache, encoder_precision=g.encoder_precision,
                           tp_size=g.tp_size, max_batch_size=limits["max_batch_size"],
                           max_audio_windows=limits["max_audio_windows"], derived=trtllm.derived, gpu=gpu)
    try:
        check_fits(plan)
    except MemoryPlanError as e:
        raise GpuBuildError(str(e)) from None
    return plan


def build_from_prepared(out: Path) -> Path:
    """`af3trt build --from-prepared OUT`: the engine half of a `--prepare-only` build, on the GPU host. Needs only
    TensorRT, trtllm-build and af3trt (no transformers, no modelopt). The repository appears only when both
    engines are built."""
    import time

    from af3trt.build.common import BuildError, Progress, versions
    from af3trt.build.gpu import target_gpu

    out = Path(out).resolve()
    manifest_path = out / "manifest.json"
    if not manifest_path.exists():
        raise BuildError(f"{out} has no manifest.json: run `af3trt build --target gpu --prepare-only` first")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    if manifest.get("target") != "gpu" or "encoder_onnx" not in manifest.get("gpu", {}):
        raise BuildError(f"{out} is not a prepared GPU build")
    if (out / "model_repository").exists():
        raise BuildError(f"{out / 'model_repository'} exists: the engines were built already")
    opts = manifest["gpu"]["options"]
    gpu, notes = check_target(GpuOptions(precision=opts["precision"], kv_cache=opts["kv_cache"],
                                         encoder_precision=opts["encoder_precision"], tp_size=opts["tp_size"],
                                         gpu=opts.get("gpu")))
    doctor_build_tools(False)
    prog = Progress(total=3)
    scratch = out / f".model_repository.building-{os.getpid()}"
    try:
        build_engines_and_repository(out, out, manifest, engine_plans(out, out, manifest, gpu), prog, scratch)
        manifest["engines_built"] = {"unix": int(time.time()), "versions": versions(), "notes": notes}
        scratch.rename(out / "model_repository")
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    manifest_path.write_text(json.dumps(manifest, indent=2, default=str))
    print(f"model repository: {out / 'model_repository'}", flush=True)
    return out
