"""The serving-path benchmark's arithmetic and process table (perf/serving_path.py), without a server."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from af3trt.perf.serving_path import cpu_seconds, per_process, serving_processes, summarize


def test_the_linear_model_separates_request_and_token_cost():
    """n requests of 1 token and n of T: cpu = n * (per_request + tokens * per_token) is solved exactly."""
    n, t, req_s, tok_s = 32, 128, 0.004, 0.0002
    short = {"postprocess": n * (req_s + 1 * tok_s)}
    long_ = {"postprocess": n * (req_s + t * tok_s)}
    got = per_process(short, long_, n, n * t)["postprocess"]
    assert got["ms_per_token"] == pytest.approx(0.2) and got["ms_per_request"] == pytest.approx(4.0)
    rounds = [{p: {"ms_per_request": 1.0, "ms_per_token": 0.1} for p in ("tritonserver", "postprocess", "decoder")}]
    table = summarize(rounds, front=False)
    # the serving path leaves the decoder out (TensorRT-LLM's on the GPU target); one core: 1000 / ms
    assert table["serving_path"]["ms_per_token"]["median"] == pytest.approx(0.2)
    assert table["per_core"]["tokens_per_s"] == pytest.approx(5000)


def test_stubs_are_named_by_the_model_their_command_line_names(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "import sys, time; time.sleep(60)",
                              str(tmp_path / "model_repository" / "fusion" / "1" / "model.py")])
    try:
        procs = serving_processes(os.getpid(), None)
        assert procs["tritonserver"] == os.getpid() and procs["fusion"] == child.pid
        assert cpu_seconds(os.getpid()) > 0
    finally:
        child.kill()
        child.wait()
