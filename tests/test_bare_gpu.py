"""scripts/bare_gpu.py, the one script for a bare GPU machine (torch + OpenAI Triton only), run here on the CPU with
--quick: the same code paths (kernels through TRITON_INTERPRET=1, the stub's cap through tests/fakes/cuda_memory.py).
It has not run on a GPU yet: there it runs without --quick and with the real allocator's cap."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_bare_gpu_script_runs_and_reports_each_part(tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "bare_gpu.py"), "--out", str(out), "--device", "cpu",
                        "--quick"], cwd=ROOT, env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True,
                       text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "bare_gpu.json").read_text())
    assert res["kernels"]["passed"] and res["kernels"]["triton_vs_torch"]["table_equal"]
    assert res["bench"]["rows"][0]["log_mel_cpu_ms"] > 0
    before, now = res["item3-before"], res["item3-now"]
    # round 2's sizing: the 1-GiB cache cannot be kept under the 0.44-GiB cap (copies dropped or the cache cleared)
    assert before["cache_bytes"] > before["cap_bytes"]
    assert before["cache_stats"]["failed_puts"] + before["cache_stats"]["clears"] > 0
    # the plan's: every request answered, the cache within its budget, nothing dropped
    assert now["all_ok"] and now["cache_stats"]["failed_puts"] == 0 and now["cache_stats"]["clears"] == 0
    assert all(q["cache_bytes_held"] <= now["cache_bytes"] for q in now["requests"]) and now["peak"] <= now["cap_bytes"]
    d = res["dlpack"]
    assert d["zero_copy"] and d["equal_to_torch_gather"] and d["dtype"] == "torch.bfloat16"
    assert (out / "bare_gpu.md").read_text().startswith("# bare_gpu.py")
