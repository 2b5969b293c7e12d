"""Times the GPU preprocessing path (af3trt.kernels) against the CPU path it replaces, side by side in one run.

    python -m af3trt.perf.kernels_bench [--windows 1 4 20] [--hidden 3584] [--repeats 20] [--json OUT]

Per window count W (30-s windows of noise; a 10-min request is 20):
  log-mel   CPU: runtime/audio.log_mel (what preprocess runs on the CPU target) · GPU: the same windows through
            torch.stft + mel matmul + the torch-composed epilogue, and with the fused Triton epilogue; GPU times
            include the host → device copy of the samples and a synchronize.
  table     CPU: the fusion path's numpy compaction + torch cast to bf16 · GPU: index_select + cast, and the Triton
            gather+cast kernel, from an f32 [W, 750, H] already on the device (where the TensorRT encoder leaves it).
Medians over --repeats after two warm-up runs. Without CUDA only the CPU path is timed, and the script says so:
the kernels run here only through Triton's interpreter, which checks correctness (tests/test_kernels.py), not speed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from af3trt.kernels import logmel, table
from af3trt.runtime.stages import audio, lengths


def median_ms(fn, repeats: int, cuda: bool) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def run(windows: list[int], hidden: int, repeats: int) -> dict:
    cuda = torch.cuda.is_available()
    kernels = logmel.triton_kernels()
    out = {"cuda": cuda, "device": torch.cuda.get_device_name() if cuda else None, "hidden": hidden,
           "repeats": repeats, "torch": torch.__version__, "triton": kernels.triton.__version__ if kernels else None,
           "rows": []}
    rng = np.random.default_rng(0)
    for w in windows:
        chunks = [(0.1 * rng.standard_normal(lengths.WINDOW_SAMPLES)).astype(np.float32) for _ in range(w)]
        embeds = rng.standard_normal((w, lengths.EMBEDS_PER_WINDOW, hidden)).astype(np.float32)
        rows = [lengths.EMBEDS_PER_WINDOW] * (w - 1) + [lengths.EMBEDS_PER_WINDOW // 3]
        row = {"windows": w,
               "log_mel_cpu_ms": median_ms(lambda: audio.log_mel(chunks), repeats, False),
               "table_cpu_ms": median_ms(lambda: torch.from_numpy(
                   np.concatenate([embeds[i, :n] for i, n in enumerate(rows)])).to(torch.bfloat16), repeats, False)}
        if cuda:
            dev = torch.device("cuda")
            emb_dev = torch.from_numpy(embeds).to(dev)
            row["log_mel_gpu_torch_ms"] = median_ms(lambda: logmel.log_mel_windows(
                logmel.pad_windows(chunks, dev), use_triton=False), repeats, True)
            row["log_mel_gpu_triton_ms"] = median_ms(lambda: logmel.log_mel_windows(
                logmel.pad_windows(chunks, dev), use_triton=True), repeats, True)
            row["table_gpu_torch_ms"] = median_ms(lambda: table.prompt_table(
                emb_dev, rows, torch.bfloat16, use_triton=False), repeats, True)
            row["table_gpu_triton_ms"] = median_ms(lambda: table.prompt_table(
                emb_dev, rows, torch.bfloat16, use_triton=True), repeats, True)
        out["rows"].append(row)
    return out


def render(r: dict) -> str:
    lines = [f"GPU preprocessing kernels vs the CPU path (medians of {r['repeats']}, ms; H={r['hidden']}, bf16 table)"]
    if not r["cuda"]:
        lines.append("No CUDA device in this process: only the CPU path is timed. The kernels are checked here on CPU "
                     "through Triton's interpreter (tests/test_kernels.py); their speed needs a GPU.")
    else:
        lines.append(f"device: {r['device']}; torch {r['torch']}, triton {r['triton']}")
    for row in r["rows"]:
        text = f"W={row['windows']:>2}  log-mel CPU {row['log_mel_cpu_ms']:8.2f}"
        if r["cuda"]:
            text += (f" | GPU torch {row['log_mel_gpu_torch_ms']:7.3f}, GPU+Triton {row['log_mel_gpu_triton_ms']:7.3f}"
                     f" ({row['log_mel_cpu_ms'] / row['log_mel_gpu_triton_ms']:.0f}x CPU)")
        text += f"   table CPU {row['table_cpu_ms']:7.2f}"
        if r["cuda"]:
            text += (f" | GPU torch {row['table_gpu_torch_ms']:6.3f}, Triton {row['table_gpu_triton_ms']:6.3f}")
        lines.append(text)
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="af3trt-kernels-bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, nargs="+", default=[1, 4, 20], help="30-s windows per batch")
    ap.add_argument("--hidden", type=int, default=3584, help="decoder hidden size H (AF3: 3584)")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)
    r = run(args.windows, args.hidden, args.repeats)
    print(render(r))
    if args.json:
        args.json.write_text(json.dumps(r, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
