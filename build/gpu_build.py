"""The GPU target of build_engines.py: TensorRT encoder plan + TensorRT-LLM 1.2 decoder engine, same ensemble.

    af3trt build --hf-model DIR --target gpu --precision fp8 --kv-cache fp8 --gpu h100 --out OUT

Steps: check the precision against the GPU (FP8 needs SM 8.9+: refused on A100) → export + validate the encoder
ONNX → cast or quantize it for the engine (fp16/bf16 cast, INT8/FP8 Q/DQ calibrated on real audio features) →
extract the Qwen2 LM → TensorRT-LLM checkpoint for the precision (modelopt PTQ + export, patched and validated) →
accuracy report on CPU (fake quantization vs the unquantized LM) → TensorRT encoder engine → trtllm-build →
repository with the encoder as a python model running the TensorRT plan and the decoder as the tensorrtllm backend.

Everything before the two engine builds runs on any machine. `--prepare-only` stops there and writes the exact
engine build plan (artifacts/gpu_build_plan.json) and the typed build plan (artifacts/build_plan.json, build/plan.py)
so the engines can be built later on the GPU host; without it, a machine lacking TensorRT / trtllm-build fails at
that step with a clear message.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from af3trt.build import think, trtllm_guided
from af3trt.build.common import BuildError, Progress, versions
from af3trt.build.gpu_repo import (TrtllmOptions, backend_options, gpu_repo_spec, read_decoder_engine,
                                   render_gpu_repository, with_stub_caps)
from af3trt.build.memory_plan import MemoryPlan, MemoryPlanError, check_fits, encoder_profile_windows, plan_for_config
from af3trt.build.plan import BuildPlan, BuildReport, GpuOptions, load_plan
from af3trt.build.trt_encoder import EncoderEnginePlan, build_encoder_engine, encoder_engine_plan
from af3trt.build.trtllm_engine import TrtllmBuildPlan, plan_trtllm_build, run_trtllm_build
from af3trt.registry import (GPU_ENCODER_PRECISIONS, GpuInfo, PrecisionError, check_encoder_precision, check_precision,
                             decoder_precision)
from af3trt.runtime.engines.gpus import target_gpu


def check_target(g: GpuOptions) -> tuple[GpuInfo | None, list[str]]:
    """The target GPU and notes, after refusing precisions it cannot run (before any work is done)."""
    try:
        gpu = target_gpu(g.gpu)
        notes = check_precision(g.precision, g.kv_cache, gpu)
        if gpu is not None:
            check_encoder_precision(g.encoder_precision, gpu.sm)
    except (PrecisionError, ValueError) as e:
        raise BuildError(str(e)) from None
    return gpu, notes


def build_gpu(plan: BuildPlan, work: Path, prog: Progress, report: BuildReport) -> None:
    """Called by build_engines.build() inside its scratch directory `work` (moved to plan.out at the end)."""
    # export/ is imported here, not at the top: the engine half (build_from_prepared) runs in the serving container,
    # which has no onnx, onnxruntime, transformers or modelopt (tests/test_container_half.py)
    from af3trt.export.extract_lm import extract_language_model
    from af3trt.export.onnx_export import export_encoder
    from af3trt.export.onnx_quant import calibration_set, prepare_encoder
    from af3trt.export.quantize import write_trtllm_checkpoint

    g, art = plan.gpu, plan.artifacts(work)
    for n in plan.notes:
        print(f"    note: {n}", flush=True)
    memory = preflight(plan)  # refuses what cannot work, before any long step
    report.gpu["memory_plan"] = memory.as_dict()
    doctor_build_tools(g.prepare_only)  # TensorRT and trtllm-build present when the engines are built here

    with prog.step("exporting + validating the encoder ONNX (fp32)"):
        report.validation["encoder_onnx"] = export_encoder(plan.hf_model, art / "encoder.onnx")
    with prog.step(f"preparing the encoder ONNX for a {g.encoder_precision} engine"):
        calib = calibration_set([Path(p).read_bytes() for p in g.calib_audio] or None) \
            if GPU_ENCODER_PRECISIONS[g.encoder_precision].qdq else None
        enc_onnx, figures = prepare_encoder(art / "encoder.onnx", art, g.encoder_precision, calib=calib,
                                            hf_dir=plan.hf_model)
        report.validation["encoder_engine_onnx"] = figures
    with prog.step("extracting the Qwen2 language model"):
        lm = extract_language_model(plan.hf_model, art / "lm")
        report.sections["language_model"] = {k: v for k, v in lm.items() if k != "shapes"}
    with prog.step(f"writing the TensorRT-LLM checkpoint ({g.precision}, kv {g.kv_cache}, tp {g.tp_size})"):
        report.sections["trtllm_checkpoint"] = write_trtllm_checkpoint(
            art / "lm", art / "trtllm_checkpoint", precision=g.precision, kv_cache=g.kv_cache, tp_size=g.tp_size)
    found = think.load(plan.hf_model, plan.options.think)
    if found is not None:
        with prog.step("think/ for TensorRT-LLM (LoRA in the engine's dtype, plugin flags; think encoder ONNX)"):
            engine_dtype = report.sections["trtllm_checkpoint"]["dtype"]  # the engine's dtype is the checkpoint's
            report.gpu["think"] = think.prepare_gpu(found, plan, art, engine_dtype, calib=calib)
            memory = fitting(think.memory(memory, report.gpu["think"]))
            report.gpu["memory_plan"] = memory.as_dict()
    if g.goldens:
        from af3trt.export.goldens import write_goldens

        with prog.step("golden answers for `af3trt gpu-check` (transformers, greedy)"):
            report.sections["goldens"] = write_goldens(plan.hf_model, art, think=found is not None)
    if g.accuracy_report:
        from af3trt.build.trtllm_engine import decoder_accuracy_report

        with prog.step("decoder accuracy on CPU (fake quantization vs the unquantized LM)"):
            report.validation["decoder_accuracy"] = decoder_accuracy_report(art / "lm", g.precision, g.kv_cache)

    encoder_onnx = f"artifacts/{enc_onnx.name}"
    report.gpu["encoder_onnx"] = encoder_onnx
    engines = engine_plans(plan, encoder_onnx, work)
    (art / "gpu_build_plan.json").write_text(json.dumps(engines.public(plan.out), indent=2, default=str))
    plan.save(work, encoder_onnx=encoder_onnx)
    report.gpu["build_plan"] = "artifacts/gpu_build_plan.json"
    if g.prepare_only:
        print(f"    --prepare-only: engines not built; the plan is in {plan.artifacts() / 'gpu_build_plan.json'}; "
              f"build them with `af3trt build --from-prepared {plan.out}` where TensorRT and trtllm-build are",
              flush=True)
        return
    build_engines_and_repository(plan, engines, work, work / "model_repository", prog, report, memory=memory)


@dataclass(frozen=True)
class EnginePlans:
    """The two engine builds of a plan: the TensorRT encoder profile and the trtllm-build command line, with their
    paths relative to the build output's root (so the same plan holds in a scratch directory and in place)."""

    encoder_onnx: str  # relative to the root
    encoder: EncoderEnginePlan
    trtllm: TrtllmBuildPlan  # with the paths of the final location (plan.out)

    def public(self, root: Path) -> dict:
        """artifacts/gpu_build_plan.json: what will run, with the paths where the output will be (root)."""
        return {"encoder": {"onnx": self.encoder_onnx, "plan": "artifacts/encoder.plan",
                            "profile": asdict(self.encoder)},
                "trtllm_build": self.trtllm.as_dict(),
                "trtllm_build_command": "trtllm-build " + " ".join(shlex.quote(a) for a in self.trtllm.args)}


def _trtllm_plan(plan: BuildPlan, root: Path, now: Path | None = None) -> TrtllmBuildPlan:
    """trtllm-build's plan with the paths under `root`; `now`: where the artifacts are at this moment (default
    root; a build's scratch directory while it runs)."""
    art = plan.artifacts(root)
    built = plan_trtllm_build(art / "trtllm_checkpoint", art / "engine", plan.serving, plan.gpu.precision,
                              plan.gpu.kv_cache, plan.serving.window_tokens_per_request,
                              timing_cache=art / "trtllm.timing.cache", gpu=plan.gpu_target)
    prepared = think.read_gpu(plan.artifacts(now or root))  # think/'s LoRA plugin flags, if prepared
    return built if prepared is None else replace(built, args=[*built.args, *prepared["trtllm_build_flags"]])


def engine_plans(plan: BuildPlan, encoder_onnx: str, now: Path | None = None) -> EnginePlans:
    """The engine builds of a prepared plan, with the paths of its final location (plan.out); `now`: where the
    output is while it is built."""
    trtllm = _trtllm_plan(plan, plan.out, now)
    # the encoder takes per execution what the decoder can take per iteration (build/memory_plan.py)
    max_windows = encoder_profile_windows(plan.serving.max_batch_size, plan.serving.max_audio_windows,
                                          trtllm.derived["max_num_tokens"])
    return EnginePlans(encoder_onnx, encoder_engine_plan(max_windows=max_windows), trtllm)


def build_engines_and_repository(plan: BuildPlan, engines: EnginePlans, root: Path, repo_dir: Path,
                                 prog: Progress, report: BuildReport, *, memory: MemoryPlan) -> None:
    """TensorRT encoder engine, trtllm-build, then the python-encoder + tensorrtllm repository at repo_dir; `root`
    is where the output is now (a scratch directory during a build, plan.out for --from-prepared); `memory`: the
    plan (with think/ when it is built) whose KV tokens, stub caps, encoder cache and LoRA fraction are rendered."""
    art, enc = plan.artifacts(root), engines.encoder
    with prog.step(f"building the TensorRT encoder engine (1…{enc.max_windows} windows)"):
        report.sections["encoder_engine"] = build_encoder_engine(
            root / engines.encoder_onnx, art / "encoder.plan", max_windows=enc.max_windows,
            opt_windows=enc.opt_windows, timing_cache=art / "encoder.timing.cache")
    prepared = think.read_gpu(art)
    if prepared is not None and prepared["encoder_onnx"]:
        with prog.step("building the think/ encoder variant's TensorRT engine"):
            report.sections["think_encoder_engine"] = build_encoder_engine(
                root / prepared["encoder_onnx"], art / "think_encoder.plan", max_windows=enc.max_windows,
                opt_windows=enc.opt_windows, timing_cache=art / "encoder.timing.cache")
    with prog.step("building the TensorRT-LLM decoder engine (trtllm-build)"):
        report.sections["decoder_engine"] = run_trtllm_build(_trtllm_plan(plan, root).args,
                                                             root / "logs" / "trtllm-build.log")
    with prog.step("rendering the Triton model repository (TensorRT encoder in python + tensorrtllm)"):
        engine = read_decoder_engine(art / "engine")  # what trtllm-build actually built (its plugin_config)
        options = backend_options(engine, TrtllmOptions(max_tokens_in_paged_kv_cache=memory.kv_cache_tokens))
        report.gpu["guided_decoding"] = write_guided_decoding(plan, art, engine.vocab_size)
        spec = gpu_repo_spec(plan.checkpoint, plan.serving, engine_dir=art / "engine", tokenizer_dir="artifacts/lm",
                             encoder_max_windows=enc.max_windows, engine=engine, options=options,
                             engine_dir_at_serve=plan.gpu.engine_dir_at_serve or str(plan.artifacts() / "engine"),
                             guided_decoding=True)
        spec = with_stub_caps(spec, memory.stub_caps)  # build/memory_plan.py stub_caps → cuda_memory_cap_bytes
        # the encoder's audio cache, sized by the memory plan inside its stub's cap (the decoder front's
        # stream_interval_ms is ServingConfig's, set by build/repository.repo_spec)
        spec = replace(spec, encoder_params={**spec.encoder_params, "cache_bytes": memory.encoder_cache})
        if prepared is not None:
            spec = think.gpu_spec(spec, prepared, plan.artifacts(), memory)
        render_gpu_repository(repo_dir, spec, encoder_plan=art / "encoder.plan")
        if prepared is not None and prepared["encoder_onnx"]:
            shutil.move(str(art / "think_encoder.plan"), repo_dir / "encoder" / "1" / think.THINK_PLAN)
    report.gpu["backend_options"] = asdict(options)
    report.sections["repository"] = {"spec": asdict(spec)}
    report.sections["precisions"] = {"encoder": plan.gpu.encoder_precision, "encoder_io": "float32",
                                     "decoder": plan.gpu.precision, "kv_cache": plan.gpu.kv_cache,
                                     "prompt_table": spec.decoder_dtype}


def write_guided_decoding(plan: BuildPlan, art: Path, vocab_size: int) -> dict:
    """The backend's guided-decoding configuration (build/trtllm_guided.py): the xgrammar tokenizer info file in the
    engine directory, written from the checkpoint's tokenizer (artifacts/lm) and checked against the engine built."""
    engine_config = art / "engine" / "config.json"
    try:
        trtllm_guided.check_logits_dtype(json.loads(engine_config.read_text(encoding="utf-8")), str(engine_config))
        summary = trtllm_guided.write_tokenizer_info(art / "lm", art / "engine" / trtllm_guided.TOKENIZER_INFO,
                                                     stop_ids=(plan.checkpoint.end_id, *plan.checkpoint.stop_ids),
                                                     vocab_size=vocab_size)
    except trtllm_guided.GuidedDecodingError as e:
        raise BuildError(f"guided decoding: {e}") from None
    return {**summary, "tokenizer_info": f"artifacts/engine/{trtllm_guided.TOKENIZER_INFO}"}


def doctor_build_tools(prepare_only: bool) -> None:
    """af3trt doctor's build checks (runtime/serve/doctor.py), as a BuildError."""
    from af3trt.runtime.serve.doctor import DoctorError, build_checks

    try:
        build_checks(prepare_only)
    except DoctorError as e:
        raise BuildError(str(e)) from None


def weight_only_shape_problems(text: dict, precision: str, tp_size: int) -> list[str]:
    """Why a weight-only precision (int8_wo, int4_awq) cannot be built at this tp size for these layer shapes ([] when
    they can).

    The rules are the checkpoint validator's (export/trtllm_checkpoint.py, from TensorRT-LLM 1.2's weight-only and
    AWQ linear layers): trtllm-build pads weight-only layers to multiples of 64 x tp, AWQ layers to multiples of
    max(64, group size) x tp, and the AWQ group size (128 or 64: the groupwise kernels' sizes) must divide every
    rank's input width (export/quantize.awq_block_size_for). A checkpoint whose full shapes are not such multiples
    cannot load, so it is refused here rather than after calibration.
    """
    from af3trt.export.quantize import QuantizeError, awq_block_size_for

    heads, kv_heads, hidden = text["num_attention_heads"], text.get("num_key_value_heads"), text["hidden_size"]
    hd = text.get("head_dim") or hidden // heads
    inter = text["intermediate_size"]
    if decoder_precision(precision).awq:
        try:
            multiple = max(64, awq_block_size_for(text, tp_size)) * tp_size
        except QuantizeError as e:
            return [f"{precision} with --tp-size {tp_size}: {e}"]
    else:
        multiple = 64 * tp_size
    shapes = {"qkv": ((heads + 2 * (kv_heads or heads)) * hd, hidden), "dense": (hidden, heads * hd),
              "mlp.fc/gate": (inter, hidden), "mlp.proj": (hidden, inter)}
    bad = [f"{n} {list(s)}" for n, s in shapes.items() if s[0] % multiple or s[1] % multiple]
    return [f"{precision} layers are padded to multiples of {multiple} by trtllm-build at tp {tp_size}; "
            f"{', '.join(bad)} are not, so the checkpoint could not load"] if bad else []


def preflight(plan: BuildPlan) -> MemoryPlan:
    """Refuse, before any long step, a combination that cannot work; return the GPU memory plan.

    Refused (each with its source):
      - a GPU that cannot run the precision: check_target (af3trt.registry.check_precision);
      - a prompt longer than max_num_tokens (so chunked context is needed) with a KV cache for which TensorRT-LLM 1.2
        builds no paged context FMHA (builder.py: INT8 KV cache; FP8 KV cache under non-FP8 weights), since
        "Chunked context requires ... paged context FMHA" (trtGptModelInflightBatching.cpp): plan_trtllm_build;
      - a tensor-parallel size that does not divide the attention heads or the MLP width (TensorRT-LLM splits both
        per rank); for weight-only precisions, layer shapes that trtllm-build cannot pad-load (weight_only_shape_problems);
      - a memory plan that does not fit the target GPU (build/memory_plan.py).
    """
    g, text = plan.gpu, plan.checkpoint.text
    problems = []
    for what, n in (("attention heads", text["num_attention_heads"]), ("intermediate size", text["intermediate_size"])):
        if n % g.tp_size:
            problems.append(f"--tp-size {g.tp_size} does not divide the {what} ({n})")
    if decoder_precision(g.precision).weight_only and not problems:
        problems += weight_only_shape_problems(text, g.precision, g.tp_size)
    try:
        trtllm = _trtllm_plan(plan, Path("not-written-yet"))  # nothing is read or written: limits are derived
    except ValueError as e:
        problems.append(str(e))
        trtllm = None
    if problems:
        raise BuildError(f"precision {g.precision}, KV cache {g.kv_cache}, tp {g.tp_size} cannot work: "
                         + "; ".join(problems))
    memory = plan_for_config(plan.checkpoint.config, precision=g.precision, kv_cache=g.kv_cache,
                             encoder_precision=g.encoder_precision, tp_size=g.tp_size,
                             max_batch_size=plan.serving.max_batch_size,
                             max_audio_windows=plan.serving.max_audio_windows,
                             derived=trtllm.derived, gpu=plan.gpu_target)
    return fitting(memory)


def fitting(memory: MemoryPlan) -> MemoryPlan:
    """The plan, or BuildError when it does not fit its GPU (build/memory_plan.py check_fits)."""
    try:
        check_fits(memory)
    except MemoryPlanError as e:
        raise BuildError(str(e)) from None
    return memory


def build_from_prepared(out: Path) -> Path:
    """`af3trt build --from-prepared OUT`: the engine half of a `--prepare-only` build, on the GPU host. Needs only
    TensorRT, trtllm-build and af3trt (no transformers, no modelopt). Continues from the saved plan
    (artifacts/build_plan.json); the repository appears only when both engines are built. manifest.json, the
    report of the prepare half, gets the engine half's sections added."""
    out = Path(out).resolve()
    if (out / "model_repository").exists():
        raise BuildError(f"{out / 'model_repository'} exists: the engines were built already")
    plan, prepared = load_plan(out)
    if plan.target != "gpu" or "encoder_onnx" not in prepared:
        raise BuildError(f"{out} is not a prepared GPU build")
    gpu_target, notes = check_target(plan.gpu)  # the GPU here: engines are built for its architecture
    plan = replace(plan, gpu=replace(plan.gpu, prepare_only=False), gpu_target=gpu_target)
    doctor_build_tools(False)
    memory = preflight(plan)
    recorded = think.read_gpu(plan.artifacts(out))
    if recorded is not None:
        memory = fitting(think.memory(memory, recorded))
    prog, report = Progress(total=3), BuildReport()
    report.gpu["memory_plan"] = memory.as_dict()  # the plan for the GPU here
    scratch = out / f".model_repository.building-{os.getpid()}"
    try:
        build_engines_and_repository(plan, engine_plans(plan, prepared["encoder_onnx"]), out, scratch, prog, report,
                                     memory=memory)
        report.sections["engines_built"] = {"unix": int(time.time()), "versions": versions(), "notes": notes}
        scratch.rename(out / "model_repository")
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text(encoding="utf-8")) if manifest_path.exists() else {}
    manifest_path.write_text(json.dumps(report.merge_into(manifest, keep_validation=True), indent=2, default=str))
    print(f"model repository: {out / 'model_repository'}", flush=True)
    return out
