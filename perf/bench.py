"""One command from nothing to a benchmark report of the AF3 Triton ensemble.

    python -m af3trt.perf.bench --out perf/results/<stamp>          # the `af3` preset: AF3's compute split
    python -m af3trt.perf.bench --repo OUT                 # an existing build (CPU or GPU repository)
    python -m af3trt.perf.bench --url HOST:PORT [--hf-model DIR | --repo OUT]   # an existing server

Steps: synthetic checkpoint of the preset (unless --hf-model/--repo) → CPU repository (unless --repo/--url) →
tritonserver on loopback (unless --url) → clips → the headline comparison (perf/compare.py: a burst of 8 spoken
clips and steady concurrency 8 against transformers one-at-a-time and batched, interleaved, medians of three; TTFT
for a 5-s clip; encoder ms against clip seconds) → perf_analyzer concurrency sweeps, non-streaming and streaming
(per-request timestamps from its profile export; Triton statistics diffed around every point) → our own client
(per-request overhead at c=1, streaming cross-check, audio-length and output-length studies) → transformers'
generate on the same checkpoint and clips (sequential and batched) → the full-window ablation (a build that
sends whole 30-s windows, as before the frame axis was dynamic: TTFT and encoder curve) → GPU projection →
results.json, report.md, PNG plots. Every figure in the report names the tool that measured it.

    af3trt bench --serving-path [--out DIR]   # perf/serving_path.py: CPU per request and per streamed token
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from af3trt.perf import clips as clipgen
from af3trt.perf import compare, machine, metrics, stats
from af3trt.perf.loadgen import run_load
from af3trt.perf.measure import probe_requests, sweep_perf_analyzer
from af3trt.runtime.stages import lengths
from af3trt.runtime.stages.contract import ENSEMBLE, STAGES

log = logging.getLogger("af3trt.bench")

REPO_ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ("What is said in the audio?", "Transcribe the input speech.", "Describe the audio in detail.",
           "What sounds can you hear in this recording?")
DEFAULT_LENGTH_CLIPS = "speech:5,speech:30,speech:120,speech:600,nonspeech:5,nonspeech:30,nonspeech:120,nonspeech:600"
# After a run the ensemble stays "live" for Triton's whole 30-s exit timeout (seen with 2.51 after streamed
# requests; every request had its final response): nothing is in flight when we stop, so don't wait for it.
DEFAULT_SCALING_EXTRA = "speech:60,speech:300"  # with the 30 s, 2 min and 10 min clips: 1, 2, 4, 10, 20 windows


BUILD_EPILOG = """CPU build (ignored with --repo/--url): every flag of `af3trt build --target cpu` (see `af3trt build
--help`: serving limits, --encoder-precision, --cpu-decoder-precision, threads, --no-encoder-batching, …), with these
defaults of the benchmark: --encoder-precision fp32, --max-batch-size 16, --max-text-len 512, --max-output-len 256,
--default-max-tokens = --max-tokens, --cpu-threads = logical CPUs."""


def parser() -> argparse.ArgumentParser:
    """The benchmark's own flags; the CPU build's are af3trt build's (build_parser), parsed from what is left."""
    ap = argparse.ArgumentParser(prog="af3trt-bench", description=__doc__, epilog=BUILD_EPILOG, allow_abbrev=False,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_argument_group("what to measure")
    src.add_argument("--preset", default="af3", help="synthetic checkpoint preset (af3trt.export.synth): af3 "
                                                     "(default: AF3's encoder/decoder compute split), small, tiny")
    src.add_argument("--hf-model", type=Path, help="an AF3 checkpoint instead of the synthetic preset")
    src.add_argument("--repo", type=Path, help="an existing build output (with model_repository/, manifest.json)")
    src.add_argument("--url", help="an existing server's gRPC address HOST:PORT (nothing is built or started)")
    src.add_argument("--out", type=Path, help="results directory (default perf/results/<UTC stamp>)")
    src.add_argument("--work", type=Path, help="where checkpoint and repository are cached "
                                               "(default ~/.cache/af3trt/bench)")
    ab = ap.add_argument_group("ablations: other CPU builds (ignored with --repo/--url)")
    ab.add_argument("--ablation-levels", default="",
                    help="non-streaming levels run again on a build with the other encoder precision ('' to skip)")
    ab.add_argument("--no-full-window-ablation", dest="full_window_ablation", action="store_false",
                    help="skip the build that sends full 30-s windows (TTFT and encoder curve before cropping)")
    ab.add_argument("--no-batching-ablation", dest="batching_ablation", action="store_false",
                    help="skip the build with the other encoder batching setting (burst and steady c=8 once)")
    s = ap.add_argument_group("sweep")
    s.add_argument("--concurrency", default="1,4,8,16,32")
    s.add_argument("--modes", default="nonstream,stream", help="perf_analyzer sweeps: nonstream, stream")
    s.add_argument("--requests-per-level", type=int, default=12)
    s.add_argument("--rounds-per-level", type=int, default=2, help="at least this many requests per slot")
    s.add_argument("--main-clips", default="spoken", choices=["spoken", "speech"],
                   help="sweep inputs: the 8 spoken clips of the comparison, or main-variants speech clips")
    s.add_argument("--main-seconds", type=float, default=10.0, help="clip length of the speech sweep inputs")
    s.add_argument("--main-variants", type=int, default=4, help="distinct (clip, prompt) inputs in the sweep")
    s.add_argument("--max-tokens", type=int, default=32)
    s.add_argument("--client-levels", default="1,8", help="levels of the own-client streaming cross-check")
    s.add_argument("--client-requests", type=int, default=12)
    s.add_argument("--overhead-requests", type=int, default=12, help="sequential requests of the c=1 probe")
    s.add_argument("--length-clips", default=DEFAULT_LENGTH_CLIPS, help="KIND:SECONDS,… ('' to skip)")
    s.add_argument("--scaling-extra", default=DEFAULT_SCALING_EXTRA, help="more clips for the window scaling")
    s.add_argument("--length-repeats", type=int, default=2, help="requests per clip up to 2 min (1 above)")
    s.add_argument("--output-lengths", default="1,8,32,128", help="max_tokens of the output-length study")
    s.add_argument("--thinking-requests", type=int, default=4,
                   help="base and thinking requests each of the thinking study (c=1; 0 to skip; docs/thinking.md)")
    s.add_argument("--thinking-max-tokens", type=int, default=128, help="max_tokens of the thinking study "
                                                                         "(thinking answers run longer)")
    c = ap.add_argument_group("headline comparison (perf/compare.py)")
    c.add_argument("--compare-rounds", type=int, default=3, help="interleaved rounds (0 to skip the comparison)")
    c.add_argument("--burst-clips", type=int, default=8, help="distinct spoken clips of 7-10 s (espeak-ng)")
    c.add_argument("--steady-concurrency", type=int, default=8)
    c.add_argument("--steady-requests", type=int, default=24, help="requests per steady perf_analyzer run")
    c.add_argument("--ttft-requests", type=int, default=10, help="streaming requests of the 5-s TTFT probe")
    c.add_argument("--encoder-curve", default=",".join(str(x) for x in compare.ENCODER_SECONDS),
                   help="clip seconds of the encoder-cost curve ('' to skip)")
    bl = ap.add_argument_group("transformers baseline")
    bl.add_argument("--no-baseline", action="store_true")
    bl.add_argument("--baseline-requests", type=int, default=6, help="sequential requests")
    bl.add_argument("--baseline-max-batch", type=int, default=16, help="largest batched-generate level")
    bl.add_argument("--baseline-max-seconds", type=float, default=120.0,
                    help="longest length-study clip the baseline also runs")
    bl.add_argument("--baseline-threads", default="auto", help="torch threads: auto (faster of 1 and all) or N")
    ap.add_argument("--projection-config", type=Path, help="config.json of the model to project on GPUs "
                                                           "(default: the published AF3 dimensions)")
    ap.add_argument("-v", "--verbose", action="store_true")
    return ap


def parse_args(argv=None) -> argparse.Namespace:
    """The benchmark's flags, and in `.build` af3trt build's flags of the CPU build."""
    ap = parser()
    args, rest = ap.parse_known_args(argv)
    args.build = build_parser().parse_args(rest)  # every other flag is af3trt build's (the error names it if not)
    if args.build.target != "cpu":
        ap.error("af3trt bench builds the CPU target: build a GPU repository with `af3trt build` and pass --repo")
    return args


# The benchmark's own defaults for af3trt build's flags (the others are the build's: `af3trt build --help`).
# default_max_tokens None: --max-tokens; cpu_threads: one thread per logical CPU for encoder and decoder.
BUILD_DEFAULTS = {"encoder_precision": "fp32", "max_batch_size": 16, "max_text_len": 512, "max_output_len": 256,
                  "default_max_tokens": None, "cpu_threads": os.cpu_count() or 1}


def build_parser() -> argparse.ArgumentParser:
    """The CPU build's flags: af3trt build's own parser (build/build_engines.py: ServingConfig's generated flags, the
    precisions' choices from the registry, threads), with the benchmark's BUILD_DEFAULTS. The one hook into the
    build's flag definitions: whatever `af3trt build` takes, the benchmark takes the same way."""
    from af3trt.build.build_engines import parser

    ap = parser()
    ap.prog = "af3trt-bench"
    ap.set_defaults(**BUILD_DEFAULTS)
    return ap


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


class Phases:
    """Wall time of each phase, for the report (and to keep the default run under its budget)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.t0 = time.perf_counter()

    @contextmanager
    def __call__(self, name: str):
        log.info("== %s", name)
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(time.perf_counter() - t, 1)
            log.info("== %s: %.1f s", name, self.seconds[name])

    def total(self) -> float:
        return round(time.perf_counter() - self.t0, 1)


# ------------------------------------------------------------------------------------------------ setup

def prepare_checkpoint(args, work: Path) -> Path:
    if args.hf_model:
        return args.hf_model.resolve()
    if args.repo and (args.repo / "manifest.json").exists():
        path = Path(json.loads((args.repo / "manifest.json").read_text())["checkpoint"]["path"])
        if path.is_dir():
            return path
    from af3trt.export.synth import write_checkpoint

    ckpt = work / f"ckpt-{args.preset}"
    marker = ckpt / "af3trt_synth.json"
    if not (marker.exists() and json.loads(marker.read_text()).get("preset") == args.preset):
        shutil.rmtree(ckpt, ignore_errors=True)
        write_checkpoint(ckpt, args.preset, seed=0)
    if args.thinking_requests and not (ckpt / "think").exists():  # both modes served from the one build
        from af3trt.export.think import write_think

        write_think(ckpt, seed=0)
    return ckpt


def build_options(args, ckpt: Path, out: Path, precision: str | None = None, crop_frames: bool = True):
    """The BuildOptions of the benchmark's CPU build: af3trt build's flags as given (args.build) on `ckpt` into
    `out`; `precision` (the encoder's) and crop_frames=False for the ablations."""
    from af3trt.build.build_engines import options_from_args

    flags = vars(args.build) | {"hf_model": ckpt, "out": out, "force": True}
    if flags["default_max_tokens"] is None:
        flags["default_max_tokens"] = args.max_tokens
    opts = options_from_args(argparse.Namespace(**flags))
    return replace(opts, encoder_precision=precision or opts.encoder_precision,
                   serving=replace(opts.serving, crop_frames=opts.serving.crop_frames and crop_frames))


def with_build(args, **changes) -> argparse.Namespace:
    """A copy of the benchmark's arguments whose build flags have `changes` (an ablation's build)."""
    return argparse.Namespace(**{**vars(args), "build": argparse.Namespace(**{**vars(args.build), **changes})})


def prepare_repository(args, ckpt: Path, work: Path, precision: str | None = None, crop_frames: bool = True) -> Path:
    """The build output to serve: --repo, or a CPU build cached under --work keyed by its options."""
    if args.repo and precision is None and crop_frames:
        return args.repo.resolve()
    from af3trt.build.build_engines import build
    from af3trt.build.plan import checkpoint_digest

    opts = build_options(args, ckpt, work, precision, crop_frames)
    name = f"repo-{args.preset}-{opts.encoder_precision}-{opts.cpu_decoder_precision}" \
        + ("-batched" if opts.serving.encoder_batching else "") + ("" if opts.serving.crop_frames else "-full-windows")
    opts = replace(opts, out=work / name)
    key = {k: str(v) for k, v in asdict(opts).items() if k not in ("out", "force")}
    key["checkpoint"] = checkpoint_digest(ckpt)["sha256"]
    key["sources"] = source_digest()
    stamp = opts.out / "bench_build.json"
    if not (stamp.exists() and json.loads(stamp.read_text()) == key):
        build(opts)
        stamp.write_text(json.dumps(key, indent=1))
    return opts.out


def source_digest() -> str:
    """The model adapters are copied into the repository at build time: rebuild when they change."""
    from af3trt.triton_repo import configs

    h = hashlib.sha256()
    for p in sorted(Path(configs.__file__).parent.glob("*/model.py")):
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def make_inputs(args, spoken: list[tuple[float, bytes]] | None = None) -> tuple[list[tuple[str, bytes]], list[dict]]:
    """The sweep's (prompt, clip) inputs: the comparison's spoken clips, or `main_variants` speech clips of
    main_seconds, each with its prompt."""
    if spoken:
        return compare.items_of(spoken), [{"clip": f"spoken-{s:.1f}s", "seed": i, "prompt": compare.PROMPT,
                                           "bytes": len(b)} for i, (s, b) in enumerate(spoken)]
    inputs, meta = [], []
    for i in range(args.main_variants):
        spec = clipgen.ClipSpec("speech", args.main_seconds)
        inputs.append((PROMPTS[i % len(PROMPTS)], clipgen.make_clip(spec, seed=i)))
        meta.append({"clip": spec.name, "seed": i, "prompt": PROMPTS[i % len(PROMPTS)], "bytes": len(inputs[-1][1])})
    return inputs, meta


# ------------------------------------------------------------------------------------------------ measuring

def sweep(args, url: str, inputs, out: Path, mode: str, server_pid: int | None) -> list[dict]:
    """sweep_perf_analyzer at the levels and request counts of the command line."""
    return sweep_perf_analyzer(url, inputs, out, mode, server_pid, concurrency=ints(args.concurrency),
                               max_tokens=args.max_tokens, requests_per_level=args.requests_per_level,
                               rounds_per_level=args.rounds_per_level)


def sweep_client(args, url: str, inputs) -> list[dict]:
    points = []
    for c in ints(args.client_levels):
        before = stats.snapshot(url)
        records, wall = run_load(url, inputs, concurrency=c, requests=max(args.client_requests, 2 * c),
                                 max_tokens=args.max_tokens, stream=True)
        split = stats.stage_split(stats.diff(before, stats.snapshot(url)), ensemble=ENSEMBLE, stages=STAGES)
        summary = metrics.summarize(records)
        points.append({"concurrency": c, "mode": "stream", "tool": "af3trt client (gRPC streaming, Python threads)",
                       **summary, "split": split})
    return points


def length_study(args, url: str, specs: list[clipgen.ClipSpec], clips_out: dict) -> list[dict]:
    """Each clip at c=1, streaming, Triton statistics around every request; clips_out[name] = (seconds, bytes)."""
    rows = []
    for spec in specs:
        clip = clipgen.make_clip(spec, seed=100)
        clips_out[spec.name] = (spec.seconds, clip)
        repeats = args.length_repeats if spec.seconds <= 120 else 1
        probes = probe_requests(url, [(PROMPTS[0], clip)] * repeats, max_tokens=args.max_tokens, stream=True)
        ok = [p for p in probes if p["latency_ms"] is not None]
        windows, _ = lengths.window_count(int(round(spec.seconds * lengths.SAMPLE_RATE)))
        row = {"clip": spec.name, "kind": spec.kind, "seconds": spec.seconds, "windows": windows,
               "requests": len(probes), "errors": len(probes) - len(ok),
               "tool": "af3trt client + Triton statistics (c=1, streaming)"}
        if ok:
            row.update(_probe_medians(ok))
        rows.append(row)
        log.info("length %s: e2e %.0f ms, encoder %.0f ms, TTFT %.0f ms", spec.name, row.get("latency_ms", 0),
                 row.get("encoder_ms", 0), row.get("ttft_ms", 0))
    return rows


def _probe_medians(probes: list[dict]) -> dict:
    def med(f):
        vals = [v for v in (f(p) for p in probes) if v is not None]
        return float(np.median(vals)) if vals else None

    def stage(name, key):
        return lambda p: p["split"].get("stages", {}).get(name, {}).get(key)

    return {"latency_ms": med(lambda p: p["latency_ms"]), "ttft_ms": med(lambda p: p["ttft_ms"]),
            "tokens": med(lambda p: len(p["ids"])),
            "preprocess_ms": med(stage("preprocess", "critical_ms")),
            "encoder_ms": med(stage("encoder", "compute_infer_ms")),
            "fusion_ms": med(stage("fusion", "critical_ms")),
            "decoder_ms": med(lambda p: p["split"].get("decoder_generation_ms")),
            "overhead_ms": med(lambda p: p["overhead"].get("total_ms"))}


def thinking_study(args, url: str, inputs, repo_manifest: dict | None) -> dict:
    """The same inputs as base and as thinking requests, one at a time (streaming): tokens, latency, TTFT, stage
    split per mode. Thinking answers run longer: max_tokens is --thinking-max-tokens for both."""
    if repo_manifest is not None and "think" not in repo_manifest:
        return {"skipped": "the repository was built without think/ (docs/thinking.md)"}
    items = [inputs[i % len(inputs)] for i in range(args.thinking_requests)]
    out = {"tool": "af3trt client + Triton statistics (c=1, streaming)", "max_tokens": args.thinking_max_tokens}
    probes = {"base": [], "thinking": []}
    for item in items:  # interleaved, so that machine noise falls on both modes alike
        for mode, thinking in (("base", None), ("thinking", True)):
            probes[mode] += probe_requests(url, [item], max_tokens=args.thinking_max_tokens, stream=True,
                                           thinking=thinking)
    for mode, runs in probes.items():
        ok = [p for p in runs if p["latency_ms"] is not None]
        out[mode] = {"requests": len(runs), "errors": len(runs) - len(ok), **(_probe_medians(ok) if ok else {})}
    log.info("thinking: %s tokens in %s ms vs base %s tokens in %s ms", out["thinking"].get("tokens"),
             out["thinking"].get("latency_ms"), out["base"].get("tokens"), out["base"].get("latency_ms"))
    return out


def output_length_study(args, url: str, inputs) -> list[dict]:
    rows = []
    for n in ints(args.output_lengths):
        probes = probe_requests(url, [inputs[0]] * 2, max_tokens=n, stream=True)
        ok = [p for p in probes if p["latency_ms"] is not None]
        itl = [g for p in ok for g in metrics.RequestRecord(**p["record"]).inter_token_s()]
        row = {"max_tokens": n, "tool": "af3trt client + Triton statistics (c=1, streaming)", **_probe_medians(ok),
               "itl_ms_p50": 1e3 * float(np.median(itl)) if itl else None}
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------ baseline

def load_baseline(args, ckpt: Path, inputs):
    """transformers' AF3 on the checkpoint, its torch threads the faster of 1 and all cores on one warm request (a
    noisy 2-core box punishes oversubscription). → (TransformersBaseline, {threads, thread_calibration_s})."""
    from af3trt.perf import baseline as bl

    ref = bl.TransformersBaseline(ckpt)
    candidates = [1, os.cpu_count() or 1] if args.baseline_threads == "auto" else [int(args.baseline_threads)]
    timing = {}
    for n in dict.fromkeys(candidates):
        ref.set_threads(n)
        ref.generate([inputs[0]], args.max_tokens)  # warm-up
        timing[n] = min(ref.generate([inputs[0]], args.max_tokens)[0] for _ in range(2))
    best = min(timing, key=timing.get)
    ref.set_threads(best)
    return ref, {"threads": best, "thread_calibration_s": {str(k): v for k, v in timing.items()}}


def run_baseline(args, ckpt: Path, inputs, length_clips: dict[str, tuple[float, bytes]], ours_ids: list[list[int]],
                 loaded=None) -> dict:
    from af3trt.perf import baseline as bl

    ref, calibration = loaded or load_baseline(args, ckpt, inputs)
    out = {"tool": "transformers AudioFlamingo3ForConditionalGeneration.generate (this process)", **calibration}
    seq = ref.sequential(inputs, args.baseline_requests, args.max_tokens)
    out["sequential"] = {"seconds": seq["seconds"], "tokens": seq["tokens"],
                         "points": [bl.sequential_point(seq["seconds"], seq["tokens"], c)
                                    for c in ints(args.concurrency)]}
    out["agreement"] = bl.agreement(ours_ids, seq["ids"][: len(ours_ids)])
    out["sequential_ids"] = seq["ids"]
    batched = []
    for c in ints(args.concurrency):
        if c > args.baseline_max_batch:
            continue
        run = ref.batched(inputs, c, args.max_tokens)
        batched.append({**bl.batched_point(run), "tokens": run["tokens"],
                        # batched row i is inputs[i % n]; the sequential run covers the first baseline_requests
                        "agreement_with_sequential": bl.agreement(
                            [run["ids"][i] for i in range(c) if i % len(inputs) < len(seq["ids"])],
                            [seq["ids"][i % len(inputs)] for i in range(c) if i % len(inputs) < len(seq["ids"])])})
        log.info("baseline batched c=%d: %.2f req/s", c, batched[-1]["throughput_rps"])
    out["batched"] = batched
    by_length = []
    for name, (secs, clip) in length_clips.items():
        if secs > args.baseline_max_seconds:
            continue
        s, (ids,) = ref.generate([(PROMPTS[0], clip)], args.max_tokens)
        by_length.append({"clip": name, "seconds": secs, "latency_ms": 1e3 * s, "tokens": len(ids)})
    out["lengths"] = by_length
    return out


# ------------------------------------------------------------------------------------------------ main

@dataclass
class Run:
    """One benchmark run: its arguments, where it writes and caches, its phases' timer, the results as they fill,
    and what the steps hand on (the checkpoint, the main server, the inputs, the ids it answered)."""

    args: argparse.Namespace
    out: Path
    work: Path
    results: dict
    phases: Phases = field(default_factory=Phases)
    ckpt: Path | None = None
    repo: Path | None = None
    server: object | None = None  # the main build's TritonServer while it runs
    url: str = ""
    spoken: list | None = None  # the comparison's spoken clips: (seconds, bytes)
    inputs: list = field(default_factory=list)  # the sweep's (prompt, clip) pairs
    ours_ids: list = field(default_factory=list)  # the main build's answers to the inputs
    ablation_ids: list | None = None  # the other encoder precision's answers
    length_clips: dict = field(default_factory=dict)  # the length study's clips: name → (seconds, bytes)
    loaded: tuple | None = None  # the transformers baseline, loaded once for the comparison and the baseline

    @property
    def server_pid(self) -> int | None:
        return self.server.proc.pid if self.server is not None else None

    def stop_server(self, phase: str) -> None:
        if self.server is not None:
            with self.phases(phase):
                self.server.stop()
            self.server = None


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    run = start_run(args)
    try:
        serve_main_build(run)
        measure_main_build(run)
        run.stop_server("server stop (main)")
        run_ablations(run)
        if not args.no_baseline:
            with run.phases("transformers baseline"):
                run_transformers_baseline(run)
    finally:
        run.stop_server("server stop")
        run.results["load_average_end"] = machine.load_average()
    write_results(run)
    print(f"report: {run.out / 'report.md'}\nresults: {run.out / 'results.json'}\ntotal: {run.phases.total():.0f} s",
          flush=True)
    return 0


def start_run(args) -> Run:
    """The results directory (--out, else perf/results/<UTC stamp>), the build cache, the results' header."""
    from af3trt.runtime.serve.triton_install import CACHE

    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = (args.out or REPO_ROOT / "perf" / "results" / stamp).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = (args.work or CACHE / "bench").resolve()
    work.mkdir(parents=True, exist_ok=True)
    flags = {**vars(args.build), **{k: v for k, v in vars(args).items() if k != "build"}}
    results = {"af3trt_bench": 1, "started_utc": stamp, "args": {k: str(v) for k, v in flags.items()},
               "machine": machine.describe(REPO_ROOT), "load_average_start": machine.load_average()}
    return Run(args, out, work, results)


def serve_main_build(run: Run) -> None:
    """The checkpoint, the main build and its server (unless --url: the server there)."""
    from af3trt.runtime.serve.server import TritonServer

    args = run.args
    with run.phases("checkpoint"):
        run.ckpt = prepare_checkpoint(args, run.work) if not (args.url and args.no_baseline) else None
    run.results["checkpoint"] = _checkpoint_info(run.ckpt, args)
    if not args.url:
        with run.phases("build"):
            run.repo = prepare_repository(args, run.ckpt, run.work)
        with run.phases("server start"):
            run.server = TritonServer(run.repo / "model_repository", log_path=run.out / "tritonserver.log",
                                      exit_timeout=3).start(timeout=600)
    run.url = args.url or run.server.grpc_url
    run.results["repository"] = _repo_info(run.repo)
    run.results["url"] = run.url


def measure_main_build(run: Run) -> None:
    """Everything measured on the main server: the c=1 overhead, the headline comparison, perf_analyzer's sweeps,
    our client's cross-check, the audio-length, output-length and thinking studies."""
    args, results, url = run.args, run.results, run.url
    with run.phases("clips"):
        run.spoken = clipgen.spoken_clips(args.burst_clips) \
            if (args.compare_rounds or args.main_clips == "spoken") else None
        run.inputs, results["inputs"] = make_inputs(args, run.spoken if args.main_clips == "spoken" else None)
        specs = [clipgen.ClipSpec.parse(s) for s in args.length_clips.split(",") if s.strip()]
        extra = [clipgen.ClipSpec.parse(s) for s in args.scaling_extra.split(",") if s.strip()] if specs else []

    with run.phases("warm-up and per-request overhead (c=1)"):
        calib = probe_requests(url, run.inputs, max_tokens=args.max_tokens, stream=False)  # also warms every stage
        run.ours_ids = [p["ids"] for p in calib]
        probes = probe_requests(url, [run.inputs[i % len(run.inputs)] for i in range(args.overhead_requests)],
                                max_tokens=args.max_tokens, stream=False)
        results["overhead_probe"] = summarize_probes(probes)

    if args.compare_rounds and not args.no_baseline:
        with run.phases("headline comparison (af3trt and transformers interleaved)"):
            run.loaded = load_baseline(args, run.ckpt, run.inputs)
            results["compare"] = run_compare(args, url, run.loaded[0], run.spoken, run.out, run.server_pid)

    results["sweeps"] = {}
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        with run.phases(f"perf_analyzer sweep ({mode})"):
            results["sweeps"][mode] = sweep(args, url, run.inputs, run.out, mode, run.server_pid)
    if args.client_levels:
        with run.phases("own-client streaming sweep"):
            results["client_sweep"] = sweep_client(args, url, run.inputs)
    if specs:
        with run.phases("audio-length study"):
            results["lengths"] = length_study(args, url, specs + extra, run.length_clips)
    if args.output_lengths:
        with run.phases("output-length study"):
            results["output_lengths"] = output_length_study(args, url, run.inputs)
    if args.thinking_requests:
        with run.phases("thinking study (base and thinking requests, c=1)"):
            manifest = json.loads((run.repo / "manifest.json").read_text()) \
                if run.repo is not None and (run.repo / "manifest.json").exists() else None
            results["thinking"] = thinking_study(args, url, run.inputs, manifest)


def run_ablations(run: Run) -> None:
    """Other CPU builds of the same checkpoint, one after another (not with --url or --repo): full 30-s windows and
    the other encoder-batching setting (both beside the headline comparison), the other encoder precision."""
    args, results = run.args, run.results
    if args.url or args.repo:
        return
    if args.full_window_ablation and results.get("compare"):
        with run.phases("ablation: full 30-s windows"):
            results["compare"]["full_window"] = run_variant(
                lambda: prepare_repository(args, run.ckpt, run.work, crop_frames=False),
                run.out / "tritonserver-full-windows.log",
                lambda url, pid: run_full_window(args, url, run.inputs, run.spoken))
    if args.batching_ablation and results.get("compare"):
        batching = not args.build.encoder_batching
        with run.phases(f"ablation: encoder batching {'on' if batching else 'off'}"):
            results["compare"]["batching"] = batching_ablation(run, with_build(
                args, encoder_batching=batching, encoder_queue_delay_us=2000 if batching else 0))
    if args.ablation_levels:
        other = "int8" if args.build.encoder_precision == "fp32" else "fp32"
        with run.phases(f"ablation: {other} encoder"):
            results["ablation"] = precision_ablation(run, other)


def batching_ablation(run: Run, other: argparse.Namespace) -> dict:
    """The burst and steady c=8 once on the build with the other encoder-batching setting."""
    args = run.args

    def measure(url, pid):
        probe_requests(url, run.inputs, max_tokens=args.max_tokens, stream=False)  # warm-up
        return {"burst": compare.burst(url, run.spoken, args.max_tokens),
                "steady": compare.steady(url, run.spoken, args.max_tokens, args.steady_concurrency,
                                         run.out / "compare" / "batching", args.steady_requests, pid)}

    return {"encoder_batching": other.build.encoder_batching, "queue_delay_us": other.build.encoder_queue_delay_us,
            **run_variant(lambda: prepare_repository(other, run.ckpt, run.work), run.out / "tritonserver-batching.log",
                          measure)}


def precision_ablation(run: Run, precision: str) -> dict:
    """perf_analyzer's non-streaming sweep at --ablation-levels on a build with the other encoder precision, and how
    often its answers are the main build's."""
    from af3trt.runtime.serve.server import TritonServer

    args = run.args
    repo = prepare_repository(args, run.ckpt, run.work, precision)
    run.server = TritonServer(repo / "model_repository", log_path=run.out / f"tritonserver-{precision}.log",
                              exit_timeout=3).start(timeout=600)
    url = run.server.grpc_url
    run.ablation_ids = [p["ids"] for p in probe_requests(url, run.inputs, max_tokens=args.max_tokens, stream=False)]
    levels = argparse.Namespace(**{**vars(args), "concurrency": args.ablation_levels})
    out = {"encoder_precision": precision, "repository": _repo_info(repo),
           "nonstream": sweep(levels, url, run.inputs, run.out / "ablation", "nonstream", run.server_pid),
           "agreement_with_main": baseline_agreement(run.ablation_ids, run.ours_ids)}
    run.server.stop()
    run.server = None
    return out


def run_transformers_baseline(run: Run) -> None:
    results = run.results
    results["baseline"] = run_baseline(run.args, run.ckpt, run.inputs, run.length_clips, run.ours_ids, run.loaded)
    if "ablation" in results:
        results["ablation"]["agreement_with_transformers"] = baseline_agreement(
            run.ablation_ids, results["baseline"]["sequential_ids"][: len(run.ablation_ids)])


def write_results(run: Run) -> None:
    """The GPU projection (the published AF3 dimensions or --projection-config, and the benchmarked checkpoint's),
    the derived figures, results.json, gpu_projection.md, report.md and the plots."""
    from af3trt.perf import projection, report

    args, results = run.args, run.results
    with run.phases("projection and report"):
        proj_cfg = json.loads(args.projection_config.read_text()) if args.projection_config \
            else projection.AF3_REFERENCE_CONFIG
        label = f"{args.projection_config}" if args.projection_config else "AF3 (published dimensions: Qwen2.5-7B " \
                                                                            "decoder, Whisper-large-v3 encoder)"
        projs = [projection.project(proj_cfg, label=label)]
        if run.ckpt is not None:
            projs.append(projection.project(json.loads((run.ckpt / "config.json").read_text()),
                                            label=f"benchmarked checkpoint ({results['checkpoint'].get('label')})"))
        results["projection"] = projs
        results["derived"] = report.headline(results)
        results["phase_seconds"] = run.phases.seconds
        results["total_seconds"] = run.phases.total()
        (run.out / "results.json").write_text(json.dumps(results, indent=1, default=_json_default))
        (run.out / "gpu_projection.md").write_text(projection.render_markdown(projs))
        report.write_report(results, run.out)


def run_variant(build_repo, log_path: Path, measure) -> dict:
    """Build (cached) and serve another repository, measure(url, server pid) on it, stop it. A failure is recorded
    in the result ({"error": …}) and the benchmark goes on: the main figures are already measured."""
    from af3trt.runtime.serve.server import TritonServer

    server = None
    try:
        repo = build_repo()
        server = TritonServer(repo / "model_repository", log_path=log_path, exit_timeout=3).start(timeout=600)
        return measure(server.grpc_url, server.proc.pid)
    except Exception as e:  # noqa: BLE001 — reported, see the docstring
        log.exception("ablation failed (server log: %s)", log_path)
        return {"error": f"{type(e).__name__}: {e}", "server_log": str(log_path)}
    finally:
        if server is not None:
            server.stop()


def run_compare(args, url: str, ref, spoken, out: Path, server_pid: int | None) -> dict:
    """The headline: interleaved rounds against transformers, TTFT for the bundled 5-s clip, the encoder curve."""
    from af3trt.runtime import assets

    cmp = {"rounds": compare.run_rounds(url, ref, spoken, rounds=args.compare_rounds, max_tokens=args.max_tokens,
                                        concurrency=args.steady_concurrency, steady_requests=args.steady_requests,
                                        out=out / "compare", server_pid=server_pid)}
    ttft = compare.ttft_c1(url, assets.speech_path().read_bytes(), args.ttft_requests, args.max_tokens)
    cmp["ttft"] = {**ttft, "p50_ms": ttft["ttft_ms"]["p50"]}
    if args.encoder_curve:
        cmp["encoder_curve"] = compare.encoder_curve(url, tuple(float(x) for x in args.encoder_curve.split(",")), 2)
    return cmp


def run_full_window(args, url: str, inputs, spoken) -> dict:
    """The same measurements on a build that sends full 30-s windows: what cropping buys."""
    from af3trt.runtime import assets

    probe_requests(url, inputs, max_tokens=args.max_tokens, stream=False)  # warm every stage
    ttft = compare.ttft_c1(url, assets.speech_path().read_bytes(), args.ttft_requests, args.max_tokens)
    fw = {"ttft": ttft, "ttft_p50_ms": ttft["ttft_ms"]["p50"], "encoder_ms_p50": ttft["encoder_ms_p50"],
          "burst": compare.burst(url, spoken, args.max_tokens)}
    if args.encoder_curve:
        fw["encoder_curve"] = compare.encoder_curve(url, tuple(float(x) for x in args.encoder_curve.split(",")), 2)
    return fw


def summarize_probes(probes: list[dict]) -> dict:
    ok = [p for p in probes if p["latency_ms"] is not None]
    ov = [p["overhead"] for p in ok if p["overhead"]]

    def p50(key, src=ov):
        vals = [o[key] for o in src if o.get(key) is not None]
        return float(np.median(vals)) if vals else None

    parts = {}
    for o in ov:
        for k, v in o["parts_ms"].items():
            parts.setdefault(k, []).append(v)
    return {"tool": "one open gRPC stream (tritonclient, no per-request connection set-up), one request at a time, "
                    "Triton statistics around each",
            "requests": len(probes), "errors": len(probes) - len(ok),
            "latency_ms_p50": float(np.median([p["latency_ms"] for p in ok])) if ok else None,
            "overhead_ms_p50": p50("total_ms"), "server_overhead_ms_p50": p50("server_ms"),
            "transport_ms_p50": p50("transport_ms"), "features_ms_p50": p50("features_ms"),
            "overhead_without_features_ms_p50": p50("without_features_ms"),
            "parts_ms_p50": {k: float(np.median(v)) for k, v in parts.items()},
            "encoder_ms_p50": float(np.median([p["split"]["stages"]["encoder"]["compute_infer_ms"] for p in ok
                                               if "encoder" in p["split"].get("stages", {})] or [np.nan])),
            "decoder_ms_p50": float(np.median([p["split"]["decoder_generation_ms"] for p in ok
                                               if "decoder_generation_ms" in p["split"]] or [np.nan]))}


def baseline_agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    from af3trt.perf.baseline import agreement

    return agreement(a, b)


def _checkpoint_info(ckpt: Path | None, args) -> dict:
    if ckpt is None:
        return {"label": "unknown (--url without a checkpoint)"}
    synth = ckpt / "af3trt_synth.json"
    info = {"path": str(ckpt)}
    if synth.exists():
        s = json.loads(synth.read_text())
        info.update(label=f"synthetic '{s['preset']}' preset", synth=s)
    else:
        info["label"] = ckpt.name
    cfg = json.loads((ckpt / "config.json").read_text())
    t, a = cfg.get("text_config", {}), cfg.get("audio_config", {})
    info["dims"] = {"decoder": {k: t.get(k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                        "num_key_value_heads", "intermediate_size", "vocab_size")},
                    "encoder": {k: a.get(k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                        "intermediate_size")}}
    try:
        from af3trt.build.sizing import decoder_params, dims_from_config, encoder_params

        d, e = dims_from_config(cfg)
        info["params"] = {"decoder": decoder_params(d)["total"], "encoder": encoder_params(e)["total"] if e else 0}
    except Exception:  # noqa: BLE001 — informative only
        pass
    return info


def _repo_info(repo: Path | None) -> dict:
    if repo is None or not (repo / "manifest.json").exists():
        return {"path": str(repo) if repo else None}
    m = json.loads((repo / "manifest.json").read_text())
    spec = m.get("repository", {}).get("spec", {})
    keep = ("target", "max_batch_size", "encoder_max_batch", "encoder_batching", "encoder_queue_delay_us",
            "preprocess_instances",
            "encoder_instances", "fusion_instances", "decoder_instances", "decoder_params", "encoder_params",
            "preprocess_params", "max_input_len", "max_output_len")
    return {"path": str(repo), "target": m.get("target"), "precisions": m.get("precisions"),
            "validation": m.get("validation"), "spec": {k: spec.get(k) for k in keep if k in spec}}


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


if __name__ == "__main__":
    sys.exit(main())
