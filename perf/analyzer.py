"""perf_analyzer (2.51, from the tritonclient wheel) driven against the AF3 ensemble over gRPC.

Input data is written in perf_analyzer's JSON format: one entry per (prompt, clip) with the encoded audio
bytes as base64 of the serialized BYTES tensor (4-byte little-endian length, then the bytes).
"""

from __future__ import annotations

import base64
import csv
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

from af3trt.runtime.client import MODEL


class PerfAnalyzerError(RuntimeError):
    pass


def find_perf_analyzer() -> Path:
    env = os.environ.get("AF3TRT_PERF_ANALYZER")
    candidates = [env] if env else []
    candidates += [str(Path(sys.executable).parent / "perf_analyzer"), shutil.which("perf_analyzer")]
    for c in candidates:
        if c and Path(c).is_file():
            return Path(c)
    raise PerfAnalyzerError("perf_analyzer not found: `pip install tritonclient[all]==2.51.0` puts it in the "
                            "environment's bin/ (or set AF3TRT_PERF_ANALYZER)")


def perf_env() -> dict[str, str]:
    """perf_analyzer links libcudart.so.12 (no GPU needed): take it from the nvidia-cuda-runtime-cu12 wheel."""
    env = dict(os.environ)
    libs = []
    try:
        import nvidia.cuda_runtime as cr

        libs.append(str(Path(list(cr.__path__)[0]) / "lib"))
    except ImportError:
        pass
    if env.get("LD_LIBRARY_PATH"):
        libs.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = ":".join(libs)
    return env


def _bytes_b64(items: list[bytes]) -> str:
    return base64.b64encode(b"".join(struct.pack("<I", len(b)) + b for b in items)).decode()


def write_input_data(path: Path, requests: list[tuple[str, bytes | None]], *, max_tokens: int, stream: bool) -> Path:
    """perf_analyzer's --input-data JSON: one data entry per (prompt, clip); clip None = text-only."""
    entries = []
    for prompt, clip in requests:
        e = {
            "text_input": {"b64": _bytes_b64([prompt.encode()]), "shape": [1]},
            "max_tokens": {"content": [max_tokens], "shape": [1]},
            "stream": {"content": [bool(stream)], "shape": [1]},
        }
        if clip is not None:
            e["audio"] = {"b64": _bytes_b64([clip]), "shape": [1]}
        entries.append(e)
    Path(path).write_text(json.dumps({"data": entries}))
    return Path(path)


def run_perf_analyzer(binary: Path, url: str, input_data: Path, *, concurrency: list[int], streaming: bool = True,
                      requests_per_level: int = 16, out_dir: Path, model: str = MODEL, timeout: float = 1800,
                      extra: list[str] = ()) -> list[dict]:
    """perf_analyzer at each concurrency level with a fixed request count (max(requests_per_level, 2 x level)):
    these machines are too noisy for its stability windows. Returns a dict per level from its CSV report."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / "perf_analyzer.csv"
    levels = ",".join(str(c) for c in concurrency)
    # perf_analyzer takes start:end:step; give each level its own run so arbitrary lists work
    rows = []
    for c in concurrency:
        cmd = [str(binary), "-m", model, "-i", "grpc", "-u", url, "--input-data", str(input_data),
               "--concurrency-range", f"{c}:{c}", "--request-count", str(max(requests_per_level, 2 * c)),
               "-f", str(csv_path), *extra]
        if streaming:
            cmd.append("--streaming")
        proc = subprocess.run(cmd, env=perf_env(), capture_output=True, text=True, timeout=timeout)
        (out_dir / f"perf_analyzer_c{c}.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            raise PerfAnalyzerError(f"perf_analyzer failed at concurrency {c} (levels {levels}):\n"
                                    f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        with open(csv_path, newline="") as f:
            for row in csv.DictReader(f):
                rows.append(_row(row))
    return rows


def _row(row: dict) -> dict:
    def num(key):
        v = row.get(key)
        return float(v) if v not in (None, "") else None

    return {
        "concurrency": int(float(row["Concurrency"])),
        "throughput_rps": num("Inferences/Second"),
        "p50_latency_us": num("p50 latency"), "p90_latency_us": num("p90 latency"),
        "p99_latency_us": num("p99 latency"), "avg_latency_us": num("Avg latency"),
        "server_queue_us": num("Server Queue"), "server_compute_infer_us": num("Server Compute Infer"),
        "raw": row,
    }
