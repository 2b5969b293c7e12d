"""One shot from a Hugging Face AF3 checkpoint to a ready Triton model repository.

    python build/build_engines.py --hf-model DIR --target cpu --out out/af3-tiny
    af3trt build --hf-model DIR --target cpu --out out/af3-tiny

Steps (CPU target): inspect the checkpoint → export + validate the encoder ONNX → (optional INT8 encoder) →
extract the Qwen2 language model → render the repository → write manifest.json. Everything is built in a
scratch directory beside --out and moved into place at the end: an existing --out is refused unless --force,
which replaces it whole. A failed build leaves no half-written repository.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import sys
import threading
from dataclasses import asdict, replace
from pathlib import Path

from af3trt.build import gpu_build, think
from af3trt.build.common import BuildError, Progress, add_flags, flag_fields, from_flags
from af3trt.build.plan import (BuildOptions, BuildPlan, BuildReport, GpuOptions, ServingConfig, add_serving_flags,
                               check_options, make_plan, serving_from_args)
from af3trt.build.repository import render_repository, repo_spec
from af3trt.export.think import find_think
from af3trt.registry import CPU_DECODER_PRECISIONS, CPU_ENCODER_PRECISIONS, GPU_ENCODER_PRECISIONS
from af3trt.runtime.stages.params import LM_DIR
from af3trt.triton_repo.configs import RepoSpec

log = logging.getLogger("af3trt.build")


def cpu_repo_spec(plan: BuildPlan, lm: dict, onnx_rel: str, extra: dict | None = None) -> RepoSpec:
    """The RepoSpec of target "cpu": build/repository.repo_spec with the ONNX Runtime encoder and the torch decoder.
    lm: what extract_language_model reported (dtype, vocab_size); onnx_rel: the encoder ONNX under the output;
    extra: more parameters per model (encoder, decoder, fusion), e.g. think/'s (build/think.py)."""
    o = plan.options
    # the serving-path benchmark: runtime/engines/stand_in.py in place of both models
    stand_in_encoder = {"stand_in_hidden_size": plan.checkpoint.text_hidden_size} if o.stand_in_tokens_per_s else {}
    extra = extra or {}
    spec = repo_spec(
        plan.checkpoint, plan.serving, target="cpu", decoder_dtype=lm["dtype"], vocab_size=lm["vocab_size"],
        tokenizer_dir=LM_DIR, encoder_max_batch=plan.serving.encoder_max_batch,
        encoder_params={"onnx_path": onnx_rel, **stand_in_encoder, **extra.get("encoder", {})},
        decoder_params={"gpt_model_path": LM_DIR, "precision": o.cpu_decoder_precision,
                        "stand_in_tokens_per_s": float(o.stand_in_tokens_per_s),
                        # with the decoder front, the decoder answers one response per token as tensorrtllm does
                        **({"stream_interval_ms": 0} if o.decoder_front else {}), **extra.get("decoder", {})},
        prompt_table_extra_ids=True,  # the CPU decoder reuses prompt KV keyed by them (runtime/engines/decoder.py)
        decoder_front=o.decoder_front)
    return replace(spec, fusion_params={**spec.fusion_params, **extra.get("fusion", {})})


def build_cpu(plan: BuildPlan, work: Path, prog: Progress, report: BuildReport) -> None:
    # imported here: `af3trt build --from-prepared` runs this module in the serving container, which lacks export/'s
    # dependencies (onnx, onnxruntime, transformers)
    from af3trt.export.extract_lm import extract_language_model
    from af3trt.export.onnx_export import export_encoder, quantize_encoder_dynamic

    art = plan.artifacts(work)
    with prog.step("exporting + validating the encoder ONNX"):
        report.validation["encoder_onnx"] = export_encoder(plan.hf_model, art / "encoder.onnx")
    onnx_rel = "artifacts/encoder.onnx"
    if plan.encoder_precision == "int8":
        with prog.step("quantizing the encoder (ONNX Runtime INT8 dynamic)"):
            report.validation["encoder_int8"] = quantize_encoder_dynamic(art / "encoder.onnx",
                                                                         art / "encoder.int8.onnx")
        onnx_rel = "artifacts/encoder.int8.onnx"
    precision = CPU_DECODER_PRECISIONS[plan.options.cpu_decoder_precision]
    with prog.step(f"extracting the Qwen2 language model ({precision.name})"):
        lm = extract_language_model(plan.hf_model, art / "lm", dtype=precision.dtype)
        report.sections["language_model"] = {k: v for k, v in lm.items() if k != "shapes"}
    extra = None
    found = think.load(plan.hf_model, plan.options.think)
    if found is not None and precision.int8_linear:  # runtime/engines/decoder.py cannot put its LoRA rows on int8 layers
        raise BuildError(f"--cpu-decoder-precision {precision.name} cannot serve the checkpoint's think/ adapter: "
                         f"build with --no-think, or another precision")
    if found is not None:
        with prog.step("building think/ (AF3's thinking mode: encoder variant, LoRA)"):
            extra = think.build_cpu(found, plan.hf_model, art, report)
    spec = cpu_repo_spec(plan, lm, onnx_rel, extra)  # the decoder loads the weights as its precision says
    with prog.step("rendering the Triton model repository"):
        render_repository(work / "model_repository", spec)
    report.sections["repository"] = {"spec": asdict(spec),
                                     "models": sorted(p.name for p in (work / "model_repository").iterdir())}
    report.sections["precisions"] = {"encoder": plan.encoder_precision, "encoder_io": "float32",
                                     "decoder": lm["dtype"], "decoder_precision": precision.name,
                                     "prompt_table": lm["dtype"]}


def clean_stale_scratch(out: Path) -> list[Path]:
    """Remove the scratch folders (`.OUT.building-PID`, `.OUT.old-PID`) that builds of `out` left behind when they
    were killed beyond cleaning up (SIGKILL, a power cut): with the real checkpoint each holds an ONNX encoder and a
    15-GB language model. A folder whose PID still runs is another build's: it is reported, not touched. Returns the
    folders removed."""
    removed = []
    for scratch in sorted(out.parent.glob(f".{out.name}.building-*")) + sorted(out.parent.glob(f".{out.name}.old-*")):
        pid = scratch.name.rsplit("-", 1)[1]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
            alive = True
        except ProcessLookupError:
            alive = False
        except PermissionError:  # another user's process
            alive = True
        if alive:
            print(f"note: {scratch} belongs to a build that is still running (pid {pid}); left alone", flush=True)
            continue
        shutil.rmtree(scratch, ignore_errors=True)
        removed.append(scratch)
        print(f"removed {scratch}: left by a build (pid {pid}) that did not finish", flush=True)
    return removed


def _stop_on_sigterm(signum, _frame):
    """SIGTERM (an orchestrator, `timeout`, kill) ends the build as Ctrl-C does: the exception unwinds through
    build(), which removes its scratch folder (before: SIGTERM's default action left it on disk)."""
    raise SystemExit(128 + signum)


def build(opts: BuildOptions) -> Path:
    """Build `opts.out` from `opts.hf_model`; returns the output directory (BuildError when it cannot)."""
    check_options(opts)
    gpu_target, notes = gpu_build.check_target(opts.gpu) if opts.target == "gpu" else (None, [])
    if opts.target == "cpu":
        total = (5 if opts.encoder_precision == "int8" else 4) + bool(opts.think and find_think(opts.hf_model))
    else:
        g = opts.gpu
        total = 5 + g.accuracy_report + g.goldens + (0 if g.prepare_only else 3)
    if opts.out.exists() and not opts.force:
        raise BuildError(f"{opts.out} exists: pass --force to replace it (the old one is removed only after the "
                         f"new build succeeds)")
    if not opts.hf_model.is_dir():
        raise BuildError(f"--hf-model {opts.hf_model} is not a directory")

    prog, report = Progress(total=total), BuildReport()
    with prog.step("inspecting the checkpoint"):
        plan = make_plan(opts, gpu_target=gpu_target, notes=notes)

    plan.out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_scratch(plan.out)
    work = plan.out.parent / f".{plan.out.name}.building-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        (gpu_build.build_gpu if plan.target == "gpu" else build_cpu)(plan, work, prog, report)
        report.timings_s = prog.timings
        (work / "manifest.json").write_text(json.dumps(plan.manifest(report), indent=2, default=str))
        if plan.out.exists():
            old = plan.out.parent / f".{plan.out.name}.old-{os.getpid()}"
            plan.out.rename(old)
            work.rename(plan.out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            work.rename(plan.out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    if (plan.out / "model_repository").exists():
        print(f"model repository: {plan.out / 'model_repository'}", flush=True)
    print(f"manifest:         {plan.out / 'manifest.json'}", flush=True)
    return plan.out


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="af3trt build", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf-model", type=Path, help="Hugging Face AF3 checkpoint directory")
    ap.add_argument("--out", type=Path, help="output directory (repository, artifacts, manifest)")
    ap.add_argument("--target", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--force", action="store_true", help="replace an existing --out (atomically)")
    add_serving_flags(ap.add_argument_group("serving (both targets; CPU: the CPU target's models only)"))
    ap.add_argument("--encoder-precision", default=None,
                    help=f"cpu: {' | '.join(CPU_ENCODER_PRECISIONS)} (default fp32; int8: ORT dynamic); "
                         f"gpu: {' | '.join(GPU_ENCODER_PRECISIONS)} (default fp16)")
    ap.add_argument("--cpu-decoder-precision", choices=list(CPU_DECODER_PRECISIONS), default="auto",
                    help="cpu: the decoder's weights and arithmetic (auto: the checkpoint's dtype; bf16 halves the "
                         "bytes a memory-bound decode step reads, within the accuracy bounds of af3trt/registry.py)")
    ap.add_argument("--stand-in-tokens-per-s", type=float, default=0.0,
                    help="measure the serving path alone: encoder and decoder are stand-ins without weights or "
                         "compute (runtime/engines/stand_in.py) making deterministic tokens, never an end id, at this many "
                         "per second per request (0: the real models; `af3trt bench --serving-path` builds one)")
    ap.add_argument("--decoder-front", action="store_true",
                    help="with --stand-in-tokens-per-s: the GPU target's ensemble shape, the decoder front (coalescing "
                         "at --stream-interval-ms) calling a decoder that sends one response per token")
    ap.add_argument("--no-think", dest="think", action="store_false",
                    help="leave out the checkpoint's think/ (AF3's thinking mode); thinking requests are then refused")
    gpu = ap.add_argument_group("GPU target (TensorRT encoder + TensorRT-LLM 1.2 decoder)")
    add_flags(gpu, GpuOptions)
    gpu.add_argument("--from-prepared", type=Path, default=None, metavar="OUT",
                     help="build the engines and the repository of a --prepare-only output (on the GPU host)")
    return ap


def options_from_args(args: argparse.Namespace) -> BuildOptions:
    """The BuildOptions of parsed `af3trt build` flags (ValueError for a serving value out of range)."""
    v = {k: val for k, val in vars(args).items() if k != "from_prepared"}
    serving = serving_from_args(args)
    gpu = from_flags(GpuOptions, args)
    for f in flag_fields(ServingConfig) + flag_fields(GpuOptions):
        v.pop(f.name)
    return BuildOptions(**v, serving=serving, gpu=gpu if v["target"] == "gpu" else None)


def main(argv=None) -> None:
    ap = parser()
    args = ap.parse_args(argv)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        _main(ap, args)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.INFO, format="    %(message)s")
    if args.from_prepared is not None:
        try:
            gpu_build.build_from_prepared(args.from_prepared)
        except BuildError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2)
        return
    if args.hf_model is None or args.out is None:
        ap.error("--hf-model and --out are required (or --from-prepared OUT)")
    try:
        opts = options_from_args(args)
    except ValueError as e:
        ap.error(str(e))
    try:
        build(opts)
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
