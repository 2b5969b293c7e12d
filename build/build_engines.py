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
import hashlib
import json
import logging
import os
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from af3trt.build.common import BuildError, Progress, versions

log = logging.getLogger("af3trt.build")

ROOT_FILES = ("config.json",)


@dataclass
class BuildOptions:
    hf_model: Path
    out: Path
    target: str = "cpu"
    force: bool = False
    # serving limits
    max_batch_size: int = 8
    max_audio_seconds: int = 600
    max_text_len: int = 1024  # text tokens per request besides the audio tokens
    max_output_len: int = 512
    default_max_tokens: int = 128
    # CPU backends
    encoder_precision: str | None = None  # cpu: fp32 | int8 (ORT dynamic); gpu: fp16 | bf16 | fp32 | int8 | fp8
    cpu_threads: int = 0  # 0 = the runtimes' defaults
    encoder_threads: int | None = None  # per-model overrides of cpu_threads (None: cpu_threads)
    decoder_threads: int | None = None
    preprocess_threads: int | None = 1  # the log-mel of one request is small: more threads only contend
    encoder_max_batch: int = 64
    encoder_queue_delay_us: int = 2000  # the encoder's dynamic batcher waits this long for more windows
    encoder_batching: bool = True  # False: one request per encoder execution (see RepoSpec.encoder_batching)
    encoder_windows_per_run: int = 2  # CPU encoder: windows per ONNX Runtime run (0: all of an execution at once)
    preprocess_instances: int = 1
    encoder_instances: int = 1
    decoder_instances: int = 1  # CPU decoder processes, each with its own in-flight batch
    # preprocess crops each request's windows to its frame bucket (runtime/lengths.py); False sends full 30-s windows
    # (what af3trt did before the frame axis was dynamic: the benchmark's "full windows" ablation)
    crop_frames: bool = True
    max_queue_size: int = 32  # per queued stage; beyond it requests are rejected at once (see RepoSpec)
    queue_timeout_ms: int = 120000  # a request waiting longer in a stage's queue is rejected
    # GPU target (build/gpu_build.py)
    gpu: "GpuOptions | None" = None


def checkpoint_digest(hf_dir: Path) -> dict:
    """sha256 over config.json and the weight files (name order), with sizes: identifies what was built."""
    files = sorted(p for p in hf_dir.iterdir() if p.suffix == ".safetensors" or p.name in ROOT_FILES)
    h = hashlib.sha256()
    total = 0
    for p in files:
        h.update(p.name.encode())
        with open(p, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
                total += len(chunk)
    return {"sha256": h.hexdigest(), "files": [p.name for p in files], "bytes": total}


def inspect_checkpoint(hf_dir: Path) -> dict:
    cfg_path = hf_dir / "config.json"
    if not cfg_path.exists():
        raise BuildError(f"{hf_dir} is not a Hugging Face checkpoint directory (no config.json)")
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    if cfg.get("model_type") != "audioflamingo3":
        raise BuildError(f"{hf_dir}: model_type is {cfg.get('model_type')!r}, expected 'audioflamingo3'")
    text, audio = cfg["text_config"], cfg["audio_config"]
    if not any(hf_dir.glob("*.safetensors")):
        raise BuildError(f"{hf_dir} has no .safetensors weights")
    gen = json.loads((hf_dir / "generation_config.json").read_text(encoding="utf-8")) if (hf_dir / "generation_config.json").exists() else {}
    eos = gen.get("eos_token_id", text.get("eos_token_id"))
    eos = eos if isinstance(eos, list) else [eos]
    pad = gen.get("pad_token_id", text.get("pad_token_id"))
    return {
        "text_hidden_size": text["hidden_size"], "text_layers": text["num_hidden_layers"],
        "vocab_size": text["vocab_size"], "audio_hidden_size": audio["hidden_size"],
        "audio_layers": audio["num_hidden_layers"], "audio_token_id": cfg.get("audio_token_id"),
        "dtype": text.get("dtype") or text.get("torch_dtype") or cfg.get("dtype") or cfg.get("torch_dtype"),
        "end_id": eos[0], "eos_ids": eos, "pad_id": pad if pad is not None else eos[0],
    }


def stop_ids_of(info: dict) -> list[int]:
    """The checkpoint's end ids after end_id (runtime/stop_words.py): generation stops on any of them."""
    from af3trt.runtime.stop_words import end_and_stop_ids

    return end_and_stop_ids(info.get("eos_ids") or [info["end_id"]])[1]


def serving_limits(opts: BuildOptions) -> dict:
    from af3trt.runtime import lengths

    windows = -(-opts.max_audio_seconds // lengths.WINDOW_SECONDS)
    if not 1 <= windows <= lengths.MAX_WINDOWS:
        raise BuildError(f"--max-audio-seconds must be in [1, {lengths.MAX_AUDIO_SECONDS}], got {opts.max_audio_seconds}")
    audio_tokens = windows * lengths.EMBEDS_PER_WINDOW
    return {
        "max_batch_size": opts.max_batch_size, "max_audio_seconds": opts.max_audio_seconds,
        "max_audio_windows": windows, "audio_tokens_per_request": audio_tokens,
        "max_input_len": opts.max_text_len + audio_tokens, "max_output_len": opts.max_output_len,
        "default_max_tokens": min(opts.default_max_tokens, opts.max_output_len),
    }


def build_cpu(opts: BuildOptions, work: Path, prog: Progress, manifest: dict) -> None:
    from af3trt.build.repository import render_repository
    from af3trt.export.extract_lm import extract_language_model
    from af3trt.export.onnx_export import export_encoder, quantize_encoder_dynamic
    from af3trt.triton_repo.configs import RepoSpec

    info, limits = manifest["checkpoint"]["config"], manifest["limits"]
    artifacts = work / "artifacts"
    with prog.step("exporting + validating the encoder ONNX"):
        manifest["validation"]["encoder_onnx"] = export_encoder(opts.hf_model, artifacts / "encoder.onnx")
    onnx_rel = "artifacts/encoder.onnx"
    if opts.encoder_precision == "int8":
        with prog.step("quantizing the encoder (ONNX Runtime INT8 dynamic)"):
            manifest["validation"]["encoder_int8"] = quantize_encoder_dynamic(
                artifacts / "encoder.onnx", artifacts / "encoder.int8.onnx")
        onnx_rel = "artifacts/encoder.int8.onnx"
    with prog.step("extracting the Qwen2 language model"):
        lm = extract_language_model(opts.hf_model, artifacts / "lm")
        manifest["language_model"] = {k: v for k, v in lm.items() if k != "shapes"}
    threads = str(opts.cpu_threads) if opts.cpu_threads else "0"

    def threads_of(override):
        return threads if override is None else str(override)

    spec = RepoSpec(
        target="cpu", hidden_size=info["text_hidden_size"], decoder_dtype=lm["dtype"],
        vocab_size=lm["vocab_size"], end_id=info["end_id"], pad_id=info["pad_id"], stop_ids=stop_ids_of(info),
        max_batch_size=limits["max_batch_size"], max_audio_windows=limits["max_audio_windows"],
        max_input_len=limits["max_input_len"], max_output_len=limits["max_output_len"],
        default_max_tokens=limits["default_max_tokens"], encoder_max_batch=opts.encoder_max_batch,
        encoder_params={"onnx_path": onnx_rel, "intra_op_threads": threads_of(opts.encoder_threads),
                        **({"max_windows_per_run": str(opts.encoder_windows_per_run)}
                           if opts.encoder_windows_per_run else {})},
        decoder_params={"gpt_model_path": "artifacts/lm", "max_batch_size": str(limits["max_batch_size"]),
                        "threads": threads_of(opts.decoder_threads)},
        fusion_params={"tokenizer_dir": "artifacts/lm"},
        postprocess_params={"tokenizer_dir": "artifacts/lm"},
        preprocess_params={"threads": threads_of(opts.preprocess_threads),
                           **({} if opts.crop_frames else {"crop_frames": "false"})},
        preprocess_instances=opts.preprocess_instances, encoder_instances=opts.encoder_instances,
        decoder_instances=opts.decoder_instances,
        encoder_queue_delay_us=opts.encoder_queue_delay_us, encoder_batching=opts.encoder_batching,
        max_queue_size=opts.max_queue_size, queue_timeout_ms=opts.queue_timeout_ms,
    )
    with prog.step("rendering the Triton model repository"):
        render_repository(work / "model_repository", spec)
    manifest["repository"] = {"spec": asdict(spec), "models": sorted(p.name for p in (work / "model_repository").iterdir())}
    manifest["precisions"] = {"encoder": opts.encoder_precision, "encoder_io": "float32", "decoder": lm["dtype"],
                              "prompt_table": lm["dtype"]}


def build(opts: BuildOptions) -> Path:
    opts.hf_model, opts.out = Path(opts.hf_model).resolve(), Path(opts.out).resolve()
    if opts.target not in ("cpu", "gpu"):
        raise BuildError(f"--target must be cpu or gpu, got {opts.target!r}")
    if opts.target == "cpu":
        opts.encoder_precision = opts.encoder_precision or "fp32"
        if opts.encoder_precision not in ("fp32", "int8"):
            raise BuildError(f"--encoder-precision must be fp32 or int8 on the CPU target, got {opts.encoder_precision!r}")
        total = 5 if opts.encoder_precision == "int8" else 4
    else:
        from af3trt.build.gpu_build import GpuBuildError, GpuOptions, check_target

        opts.gpu = opts.gpu or GpuOptions()
        if opts.encoder_precision:
            opts.gpu.encoder_precision = opts.encoder_precision
        opts.encoder_precision = opts.gpu.encoder_precision
        try:
            opts.gpu.check()
            check_target(opts.gpu)  # refuse what the GPU cannot run before any work
        except GpuBuildError as e:
            raise BuildError(str(e)) from None
        total = 5 + opts.gpu.accuracy_report + opts.gpu.goldens + (0 if opts.gpu.prepare_only else 3)
    if opts.out.exists() and not opts.force:
        raise BuildError(f"{opts.out} exists: pass --force to replace it (the old one is removed only after the "
                         f"new build succeeds)")
    if not opts.hf_model.is_dir():
        raise BuildError(f"--hf-model {opts.hf_model} is not a directory")

    prog = Progress(total=total)
    manifest = {"af3trt_manifest": 1, "target": opts.target, "created_unix": int(time.time()),
                "host": {"machine": platform.machine(), "system": platform.system(), "cpus": os.cpu_count()},
                "versions": versions(), "options": {k: str(v) for k, v in asdict(opts).items()},
                "validation": {}}
    with prog.step("inspecting the checkpoint"):
        manifest["checkpoint"] = {"path": str(opts.hf_model), "config": inspect_checkpoint(opts.hf_model),
                                  **checkpoint_digest(opts.hf_model)}
        manifest["limits"] = serving_limits(opts)

    opts.out.parent.mkdir(parents=True, exist_ok=True)
    work = opts.out.parent / f".{opts.out.name}.building-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        if opts.target == "gpu":
            from af3trt.build.gpu_build import build_gpu

            build_gpu(opts, work, prog, manifest)
        else:
            build_cpu(opts, work, prog, manifest)
        manifest["timings_s"] = prog.timings
        (work / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
        if opts.out.exists():
            old = opts.out.parent / f".{opts.out.name}.old-{os.getpid()}"
            opts.out.rename(old)
            work.rename(opts.out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            work.rename(opts.out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    if (opts.out / "model_repository").exists():
        print(f"model repository: {opts.out / 'model_repository'}", flush=True)
    print(f"manifest:         {opts.out / 'manifest.json'}", flush=True)
    return opts.out


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="af3trt build", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf-model", type=Path, help="Hugging Face AF3 checkpoint directory")
    ap.add_argument("--out", type=Path, help="output directory (repository, artifacts, manifest)")
    ap.add_argument("--target", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--force", action="store_true", help="replace an existing --out (atomically)")
    ap.add_argument("--max-batch-size", type=int, default=8, help="concurrent sequences in the decoder")
    ap.add_argument("--max-audio-seconds", type=int, default=600, help="audio per request (AF3 reads at most 600)")
    ap.add_argument("--max-text-len", type=int, default=1024, help="text tokens per request besides audio tokens")
    ap.add_argument("--max-output-len", type=int, default=512)
    ap.add_argument("--default-max-tokens", type=int, default=128)
    ap.add_argument("--encoder-precision", default=None,
                    help="cpu: fp32 (default) | int8 (ORT dynamic); gpu: fp16 (default) | bf16 | fp32 | int8 | fp8")
    ap.add_argument("--cpu-threads", type=int, default=0,
                    help="threads per ONNX Runtime / torch model: encoder, decoder, preprocess (0: their defaults)")
    ap.add_argument("--encoder-threads", type=int, default=None,
                    help="ONNX Runtime threads of the encoder (default: --cpu-threads; its idle threads sleep)")
    ap.add_argument("--decoder-threads", type=int, default=None, help="torch threads of the decoder "
                                                                         "(default: --cpu-threads)")
    ap.add_argument("--preprocess-threads", type=int, default=1, help="torch threads of the log-mel (default 1: "
                                                                         "one request's features are small)")
    ap.add_argument("--encoder-windows-per-run", type=int, default=2,
                    help="CPU encoder: windows per ONNX Runtime run (0: all at once; 2-4 keep a 10-min request's "
                         "attention buffers in cache: measured 1.3-2x faster per window than 10 at once)")
    ap.add_argument("--no-encoder-batching", dest="encoder_batching", action="store_false",
                    help="one request per encoder execution (faster on CPU: requests pipeline into the decoder)")
    ap.add_argument("--encoder-max-batch", type=int, default=64, help="windows per encoder execution")
    ap.add_argument("--encoder-queue-delay-us", type=int, default=2000,
                    help="how long the encoder's dynamic batcher waits to gather windows")
    ap.add_argument("--preprocess-instances", type=int, default=1, help="instances of the preprocess model")
    ap.add_argument("--encoder-instances", type=int, default=1, help="instances of the encoder model")
    ap.add_argument("--decoder-instances", type=int, default=1,
                    help="instances of the CPU decoder model (each batches its own requests)")
    ap.add_argument("--no-crop-frames", dest="crop_frames", action="store_false",
                    help="send full 30-s windows to the encoder instead of each request's frame bucket (slower; "
                         "the kept audio tokens are the same)")
    ap.add_argument("--max-queue-size", type=int, default=32,
                    help="requests that may wait in each stage's queue; more are rejected at once as busy (0: no bound)")
    ap.add_argument("--queue-timeout-ms", type=int, default=120000,
                    help="a request waiting longer than this in a stage's queue is rejected as busy (0: no timeout)")
    gpu = ap.add_argument_group("GPU target (TensorRT encoder + TensorRT-LLM 1.2 decoder)")
    gpu.add_argument("--precision", default="bf16", help="decoder: bf16 | fp16 | fp8 | int8_sq | int8_wo | int4_awq")
    gpu.add_argument("--kv-cache", default="auto", help="auto | fp8 | int8")
    gpu.add_argument("--tp-size", type=int, default=1)
    gpu.add_argument("--gpu", default=None, help="declare the target GPU (h100, a100, l40s, …) when building elsewhere")
    gpu.add_argument("--calib-audio", action="append", default=[], type=Path,
                     help="audio file for the encoder's INT8/FP8 calibration (repeatable; default: bundled clip)")
    gpu.add_argument("--prepare-only", action="store_true",
                     help="stop before the engine builds; write artifacts/gpu_build_plan.json")
    gpu.add_argument("--engine-dir-at-serve", default=None,
                     help="absolute path of the decoder engine inside the serving container")
    gpu.add_argument("--no-accuracy-report", action="store_true")
    gpu.add_argument("--no-goldens", action="store_true",
                     help="skip the reference answers for `af3trt gpu-check` (artifacts/goldens.json)")
    gpu.add_argument("--from-prepared", type=Path, default=None, metavar="OUT",
                     help="build the engines and the repository of a --prepare-only output (on the GPU host)")
    return ap


def main(argv=None) -> None:
    ap = parser()
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="    %(message)s")
    v = vars(args)
    prepared = v.pop("from_prepared")
    if prepared is not None:
        from af3trt.build.gpu_build import build_from_prepared

        try:
            build_from_prepared(prepared)
        except BuildError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2)
        return
    if args.hf_model is None or args.out is None:
        ap.error("--hf-model and --out are required (or --from-prepared OUT)")
    gpu_keys = ("precision", "kv_cache", "tp_size", "gpu", "calib_audio", "prepare_only", "engine_dir_at_serve")
    gpu_kw = {k: v.pop(k) for k in gpu_keys}
    accuracy = not v.pop("no_accuracy_report")
    goldens = not v.pop("no_goldens")
    opts = BuildOptions(**v)
    if opts.target == "gpu":
        from af3trt.build.gpu_build import GpuOptions

        opts.gpu = GpuOptions(**gpu_kw, accuracy_report=accuracy, goldens=goldens)
    try:
        build(opts)
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
