"""`af3trt soak --chaos` (perf/chaos.py): the oracles that tell an exact answer from a clear error, a cut, a wrong,
truncated or mixed answer and a hang; and the harness proving it catches a build that answers wrong: a repository
whose postprocess drops the last token of every response (truncated answers reported as complete) is run with the
same request mix against references from the good build."""

from __future__ import annotations

import shutil

import pytest

from af3trt.perf import chaos

SPEC = chaos.Spec("s", "grpc", {})
CHAT = chaos.Spec("c", "chat", {})


def ref(ids=(1, 2, 3, 4), text="abcd", extra=""):
    return chaos.Result("s", 0.0, 1.0, ids=list(ids), text=text, extra=extra, complete=True)


def got(ids=(), text="", complete=True, error=None, t1=1.0, extra=""):
    return chaos.Result("s", 0.0, t1, ids=list(ids), text=text, complete=complete, error=error, extra=extra)


@pytest.mark.parametrize("res, spec, outcome", [
    (got((1, 2, 3, 4), "abcd"), SPEC, "exact"),
    (got((1, 2, 3), "abc"), SPEC, "truncated"),  # a prefix reported as complete
    (got((1, 2, 3, 5), "abce"), SPEC, "wrong"),
    (got((9, 9), "zz", complete=False, error="AF3Error: boom"), SPEC, "mixed"),  # another request's tokens
    (got((1, 2), "ab", complete=False, error="AF3Error: Stub process 'x' is not healthy"), SPEC, "error"),
    (got((1, 2), "ab", complete=False), SPEC, "cut"),  # the client closed it on purpose
    (got((1, 2), "zz", complete=False), SPEC, "mixed"),  # right ids, another request's text
    (got((1, 2, 3, 4), "abcd", t1=1000.0), SPEC, "hang"),
    (got(text="abcd", extra="stop 4"), CHAT, "wrong"),  # finish reason / token count differ
    (got(text="ab", complete=False, error="HTTP 500: (no error body) oops"), CHAT, "wrong"),
    (got(text="ab", complete=False, error="HTTP 503: Triton is unavailable"), CHAT, "error"),
])
def test_every_request_is_exact_a_clear_error_or_a_counted_failure(res, spec, outcome):
    assert chaos.classify(res, ref(), spec, deadline_s=120.0) == outcome


def test_a_request_counts_under_the_fault_whose_window_it_overlaps():
    faults = [chaos.Fault("decoder SIGKILL", 1, t=10.0, t_end=20.0), chaos.Fault("openai SIGSTOP", 2, t=40.0, t_end=50.0)]
    assert chaos.fault_of(chaos.Result("s", 0.0, 5.0), faults) == "none"
    assert chaos.fault_of(chaos.Result("s", 5.0, 12.0), faults) == "decoder SIGKILL"
    assert chaos.fault_of(chaos.Result("s", 15.0, 45.0), faults) == "openai SIGSTOP"


def test_the_launchers_heal_lines_are_read():
    text = ("watchdog: model 'encoder' is back after 2.6 s (unload 0.0 s, load 2.6 s); ready=True\n"
            "watchdog: tritonserver is back after 13.5 s (killed in 0.0 s, started in 13.5 s (model loads: "
            "preprocess 13.0 s, decoder 11.5 s, af3 0.0 s)); ready=True\nthe OpenAI front is back after 6.2 s\n"
            "tritonserver started in 9.8 s (model loads: decoder 8.6 s, af3 0.0 s)\n")
    lines = chaos.heal_lines(text)
    assert lines["reload"] == [{"model": "encoder", "seconds": 2.6, "unload_s": 0.0, "load_s": 2.6}]
    assert lines["restart"][0]["model_loads_s"] == {"preprocess": 13.0, "decoder": 11.5, "af3": 0.0}
    assert lines["front"] == [{"seconds": 6.2}]
    assert lines["start"] == [{"seconds": 9.8, "model_loads_s": {"decoder": 8.6, "af3": 0.0}}]


@pytest.mark.integration
def test_the_harness_catches_a_sabotaged_build(tiny_repo, tmp_path):
    """The same mix against a build whose postprocess drops the last token of each response that holds more than one:
    the harness reports truncated (or wrong) answers and fails the run. Without this, an exact-looking chaos figure
    could come from a harness that compares nothing. (A one-token answer stays whole: the launcher's liveness probe
    asks for one token, and a build that never answers it never comes up — the probe's own test.)"""
    bad = tmp_path / "sabotaged"
    shutil.copytree(tiny_repo, bad, ignore=shutil.ignore_patterns("*.log", "__pycache__"))
    model = bad / "model_repository" / "postprocess" / "1" / "model.py"
    text = model.read_text()
    line = "tokens = ids[0, 0, : min(n, ids.shape[-1])]"
    assert line in text
    sabotage = "tokens = ids[0, 0, : min(n, ids.shape[-1]) - (min(n, ids.shape[-1]) > 1)]  # sabotage"
    model.write_text(text.replace(line, sabotage))
    res = chaos.run(bad / "model_repository", tmp_path / "out", minutes=0.5, concurrency=2, faults=False,
                    reference_repo=tiny_repo / "model_repository", deadline_s=120.0)
    print(f"\nsabotaged build: {res['outcomes']}")
    assert res["outcomes"].get("truncated", 0) + res["outcomes"].get("wrong", 0) > 0
    assert not res["ok"] and not all(res["exact_after"].values())
    assert (tmp_path / "out" / "chaos.md").exists()
