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
from typing import Callable

from af3trt.perf.metrics import RequestRecord
from af3trt.runtime.client.library import MODEL, Request
from af3trt.runtime.stages.contract import request_input


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


def write_input_data(path: Path, requests: list[tuple[str, bytes | None]], *, max_tokens: int, stream: bool,
                     **fields) -> Path:
    """perf_analyzer's --input-data JSON: one data entry per (prompt, clip); clip None = text-only. The inputs are
    the client's (runtime/client/library.py Request.values): BYTES as length-prefixed base64, the others as content.
    fields: more Request fields of every entry (e.g. ignore_eos=True)."""
    entries = []
    for prompt, clip in requests:
        req = Request(prompt, [clip] if clip is not None else [], max_tokens=max_tokens, stream=bool(stream),
                      **fields)
        entry = {}
        for name, elements in req.values().items():
            data = {"b64": _bytes_b64(elements)} if request_input(name).datatype == "BYTES" else {"content": elements}
            entry[name] = {**data, "shape": [len(elements)]}
        entries.append(entry)
    Path(path).write_text(json.dumps({"data": entries}))
    return Path(path)


def run_perf_analyzer(binary: Path, url: str, input_data: Path, *, concurrency: list[int], streaming: bool = True,
                      requests_per_level: int = 16, out_dir: Path, model: str = MODEL, timeout: float = 1800,
                      extra: list[str] = (), rounds_per_level: int = 2, profile_export: bool = False,
                      on_level: Callable[[int, str], None] | None = None, tag: str = "") -> list[dict]:
    """perf_analyzer at each concurrency level with a fixed request count (max(requests_per_level,
    rounds_per_level x level)): these machines are too noisy for its stability windows. Returns a dict per level
    from its CSV report.

    profile_export: also write perf_analyzer's per-request timestamps and keep them parsed as row["records"]
    (RequestRecord: every response's arrival, so latency to the last response, TTFT and ITL for streams — in 2.51
    the CSV's latency of a decoupled model is the time to its *first* response). on_level(c, "before"|"after")
    is called around each level (e.g. to snapshot Triton's statistics)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    suffix = f"_{tag}" if tag else ""
    csv_path = out_dir / f"perf_analyzer{suffix}.csv"
    levels = ",".join(str(c) for c in concurrency)
    # perf_analyzer takes start:end:step; give each level its own run so arbitrary lists work
    rows = []
    for c in concurrency:
        cmd = [str(binary), "-m", model, "-i", "grpc", "-u", url, "--input-data", str(input_data),
               "--concurrency-range", f"{c}:{c}", "--request-count", str(level_requests(c, requests_per_level,
                                                                                         rounds_per_level)),
               "-f", str(csv_path), *extra]
        if streaming:
            cmd.append("--streaming")
        export = out_dir / f"profile{suffix}_c{c}.json"
        if profile_export:
            cmd += ["--profile-export-file", str(export)]
        if on_level:
            on_level(c, "before")
        proc = subprocess.run(cmd, env=perf_env(), capture_output=True, text=True, timeout=timeout)
        if on_level:
            on_level(c, "after")
        (out_dir / f"perf_analyzer{suffix}_c{c}.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            raise PerfAnalyzerError(f"perf_analyzer failed at concurrency {c} (levels {levels}):\n"
                                    f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        with open(csv_path, newline="") as f:
            level_rows = [_row(row) for row in csv.DictReader(f)]
        if profile_export:
            records, window = parse_profile_export(export.read_bytes())
            export.unlink()  # it holds every request's audio: keep only what was parsed
            for r in level_rows:
                r["records"], r["window_s"] = records, window
        rows += level_rows
    return rows


def level_requests(concurrency: int, requests_per_level: int, rounds_per_level: int = 2) -> int:
    """Requests sent at one level: at least `rounds_per_level` per concurrent slot."""
    return max(requests_per_level, rounds_per_level * concurrency)


def parse_profile_export(data: bytes | str) -> tuple[list[RequestRecord], float | None]:
    """perf_analyzer's --profile-export-file (2.51) → (records, measurement window in s).

    Each request has an absolute send `timestamp` (ns), `response_timestamps` (ns) and `response_outputs`, where a
    response's `output_ids` is a number for one token, a list for several, or absent/empty for none. Raw audio
    inputs are echoed in `request_inputs` as undecodable bytes, hence the lenient decoding."""
    if isinstance(data, bytes):
        data = data.decode("utf-8", errors="replace")
    doc = json.loads(data)
    records, window = [], None
    for exp in doc.get("experiments", []):
        bounds = exp.get("window_boundaries") or []
        if len(bounds) >= 2:
            window = (window or 0.0) + (bounds[-1] - bounds[0]) / 1e9
        for req in exp.get("requests", []):
            t0 = req["timestamp"]
            times = [(t - t0) / 1e9 for t in req.get("response_timestamps", [])]
            outs = req.get("response_outputs") or [{}] * len(times)
            tokens = [_count_ids(o.get("output_ids")) for o in outs]
            records.append(RequestRecord(start_s=t0 / 1e9, response_s=times, response_tokens=tokens,
                                         error=None if times else "no response"))
    return records, window


def _count_ids(v) -> int:
    if v is None or v == "":
        return 0
    if isinstance(v, list):
        return len(v)
    return 1


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
