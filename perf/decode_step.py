"""The CPU decoder's decode step by precision, threads, batch and instruction set (issue 20, item 4): what the CPU
build's defaults are chosen from.

    python -m af3trt.perf.decode_step --out perf/results/latest      # writes decode_step.json and decode_step.md

For each instruction set and thread count a fresh process runs runtime/engines/decoder.py's DecoderEngine on the `af3`
preset, one engine per CPU decoder precision (af3trt/registry.py CPU_DECODER_PRECISIONS, the language model written
as a build writes it): `batch` requests of a `prompt`-token prompt submitted together (one continuous batch), `steps`
tokens each; precisions and batches interleaved repeat by repeat. Reported: the engine's own decode time per step
(its `decode_seconds` / `decode_steps`), median over `repeats`.

Instruction sets: `avx512` is the machine's own; `avx2` is emulated on it by capping torch's kernels
(ATEN_CPU_CAPABILITY=avx2) and oneDNN's (ONEDNN_MAX_CPU_ISA=AVX2): the same cores and caches, without the 512-bit
and bf16 instructions. ONNX Runtime (the encoder) has no run-time cap: MLAS picks its kernels by cpuid
(onnxruntime core/mlas/lib/platform.cpp; a compile-time switch is proposed in microsoft/onnxruntime#20215).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from af3trt.build.tables import Column, markdown_table
from af3trt.runtime.engines.decoder import DecoderEngine, GenerationRequest

ISAS = {"avx512": {}, "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}}


def _steps_ms(eng, batch: int, prompt: int, steps: int, rng) -> float:
    """One continuous batch of `batch` requests submitted together: the engine's mean decode-step milliseconds."""
    before = dict(eng.stats)
    done, queued = threading.Semaphore(0), threading.Event()
    for i in range(batch):
        ids = rng.integers(0, eng.vocab_size, prompt).astype(np.int32)
        eng.submit(GenerationRequest(input_ids=ids, max_new_tokens=steps), lambda new, final: final and done.release(),
                   cancelled=(lambda: not queued.wait(60)) if i == 0 else None)
    queued.set()
    for _ in range(batch):
        assert done.acquire(timeout=600)
    return 1e3 * (eng.stats["decode_seconds"] - before["decode_seconds"]) / (eng.stats["decode_steps"]
                                                                               - before["decode_steps"])


def measure(lms: dict[str, tuple[str, bool]], batches: list[int], prompt: int, steps: int, repeats: int) -> list:
    """In this process (one ISA, one thread count): every precision (`lms`: name -> (LM directory, int8_linear)) at
    every batch, interleaved repeat by repeat (a neighbour's load falls on all of them alike); per point the median,
    min and max decode-step milliseconds over the repeats."""
    import torch

    rng = np.random.default_rng(0)
    engines = {name: DecoderEngine(Path(lm), max_batch_size=max(batches), threads=torch.get_num_threads(),
                                   int8_linear=int8) for name, (lm, int8) in lms.items()}
    try:
        times: dict[tuple[str, int], list[float]] = {(n, b): [] for n in engines for b in batches}
        for r in range(repeats + 1):  # the first is a warm-up
            for (name, batch), out in times.items():
                ms = _steps_ms(engines[name], batch, prompt, steps, rng)
                if r:
                    out.append(ms)
    finally:
        for eng in engines.values():
            eng.stop()
    isa = torch.backends.cpu.get_cpu_capability()
    return [{"precision": n, "batch": b, "ms_median": float(np.median(v)), "ms_min": min(v), "ms_max": max(v),
             "torch_capability": isa} for (n, b), v in times.items()]


def run_one(lms: dict[str, tuple[str, bool]], isa: str, threads: int, args) -> list:
    """measure() in a fresh process with the instruction-set cap and thread count in its environment."""
    env = {**os.environ, **ISAS[isa], "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE"}
    code = (f"import json; from af3trt.perf.decode_step import measure; "
            f"print('RESULT', json.dumps(measure({lms!r}, {args.batches!r}, {args.prompt}, {args.steps}, "
            f"{args.repeats})))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=3600)
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"decode-step run failed ({isa}, {threads} threads): {out.stderr[-2000:]}")
    return [{"isa": isa, "threads": threads, **row} for row in json.loads(line[len("RESULT "):])]


def prepare(work: Path, preset: str, precisions: list[str]) -> dict[str, tuple[str, bool]]:
    """The preset's checkpoint and its language model written in each precision (as `af3trt build` writes it)."""
    from af3trt.export.extract_lm import extract_language_model
    from af3trt.export.synth import write_checkpoint
    from af3trt.registry import cpu_decoder_precision

    ckpt = work / f"ckpt-{preset}"
    if not (ckpt / "config.json").exists():
        write_checkpoint(ckpt, preset, seed=0)
    out = {}
    for name in precisions:
        lm = work / f"lm-{preset}-{name}"
        if not (lm / "config.json").exists():
            extract_language_model(ckpt, lm, dtype=cpu_decoder_precision(name).dtype)
        out[name] = (str(lm), cpu_decoder_precision(name).int8_linear)
    return out


STEPS = [Column("ISA", lambda r: f"{r['isa']}{' (emulated)' if r['isa'] == 'avx2' else ''}"),
         Column("precision"), Column("threads"), Column("batch"), Column("ms per step", "ms_median", "{:.1f}"),
         Column("min-max", lambda r: f"{r['ms_min']:.1f}-{r['ms_max']:.1f}"),
         Column("ms per token", lambda r: r["ms_median"] / r["batch"], "{:.2f}")]


def render(r: dict) -> str:
    lines = [f"# CPU decoder: decode step by precision, threads, batch and ISA ({r['started_utc']})", "",
             f"`{r['preset']}` preset, {r['prompt']}-token prompts, {r['steps']} steps, median of {r['repeats']} "
             f"repeats (min-max). `avx2` is emulated on this AVX-512 CPU (ATEN_CPU_CAPABILITY=avx2, "
             f"ONEDNN_MAX_CPU_ISA=AVX2). Load average {r['load_average_start']} at start, {r['load_average_end']} "
             f"at end.", "", *markdown_table(STEPS, r["rows"])]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m af3trt.perf.decode_step", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/af3trt-decode-step"))
    ap.add_argument("--preset", default="af3")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--isas", default="avx512,avx2")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompt", type=int, default=300, help="prompt tokens (an 8-s clip is about 100 audio rows)")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    from af3trt.perf import machine

    args.work.mkdir(parents=True, exist_ok=True)
    lms = prepare(args.work, args.preset, args.precisions.split(","))
    result = {"started_utc": time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()), "preset": args.preset,
              "prompt": args.prompt, "steps": args.steps, "repeats": args.repeats,
              "load_average_start": machine.load_average(), "rows": []}
    args.batches = [int(b) for b in args.batches.split(",")]
    for isa in args.isas.split(","):
        for threads in map(int, args.threads.split(",")):
            for row in run_one(lms, isa, threads, args):
                result["rows"].append(row)
                print(json.dumps(row), flush=True)
    result["load_average_end"] = machine.load_average()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decode_step.json").write_text(json.dumps(result, indent=1))
    (args.out / "decode_step.md").write_text(render(result))
    print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
