"""The serving-path benchmark's arithmetic and process table (perf/serving_path.py), without a server."""

from __future__ import annotations

import os

import pytest
from helpers import stub_below

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
    """A server process whose child runs as Triton starts a python stub (<...>/triton_python_backend_stub
    <repo>/<model>/<version>/model.py): named by its model. The server is a process of the test's own, so the stubs of
    a tritonserver this test session runs elsewhere are not below it."""
    with stub_below(tmp_path, "fusion") as (server, stub_pid):
        assert serving_processes(server, None) == {"tritonserver": server, "fusion": stub_pid}
        assert cpu_seconds(os.getpid()) > 0


def test_a_build_whose_load_fails_leaves_the_later_rounds_and_the_others_go_on(monkeypatch):
    """Side by side, one build's server dies (as tritonserver 2.51 did with one response per token at 300 tokens/s):
    its failure is recorded with the rounds it finished, and the other build is measured in every round."""
    import argparse
    from types import SimpleNamespace

    from af3trt.perf import serving_path as sp

    monkeypatch.setattr(sp, "serving_processes", lambda server, front: {p: os.getpid() for p in sp.SERVING_PATH})
    calls = {0: 0}

    def run_one(mode, grpc_url, http_url, clips, args, max_tokens, requests=None):
        if grpc_url == "dies":
            calls[0] += 1
            if calls[0] > 1 + 2 * 2:  # the warm-up and two rounds of 1- and T-token loads answer, then it is gone
                raise RuntimeError("grpc-stream: 8 requests failed, e.g. Deadline Exceeded")
        return 8, 8 * max_tokens, 0.5

    monkeypatch.setattr(sp, "run_one", run_one)
    server = lambda url: (SimpleNamespace(grpc_url=url, proc=SimpleNamespace(pid=os.getpid())),  # noqa: E731
                          SimpleNamespace(url="", proc=SimpleNamespace(pid=None)))
    args = argparse.Namespace(modes="grpc-stream", rounds=4, max_tokens=16, requests=8)
    runs = sp.measure({0: server("dies"), 50: server("lives")}, clips=None, args=args)
    assert runs[0]["failed"].startswith("round 3, grpc-stream: ")
    assert len(runs[0]["modes"]["grpc-stream"]["serving_path"]["ms_per_token"]["runs"]) == 2
    assert "failed" not in runs[50] and len(runs[50]["modes"]["grpc-stream"]["serving_path"]["ms_per_token"]["runs"]) == 4
