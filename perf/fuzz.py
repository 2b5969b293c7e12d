"""`af3trt fuzz`: the OpenAI front fuzzed from its own OpenAPI schema for minutes, over a build.

    af3trt fuzz --model-repository OUT/model_repository --minutes 10 [--examples 50] [--out perf/results/latest]

Starts tritonserver over the build and `af3trt openai` in front of it (loopback, free ports, stopped by PID), asks a
known-answer question, then runs schemathesis cases generated from the front's /openapi.json against every operation
it lists, round after round (each round `--examples` cases per operation, a fresh seed) until the minutes are over;
half the cases name the served model, so that they get past the model check into the request's other fields.
Every response is checked (check_response, the same rules as the suite's bounded run in tests/test_openai_server.py):
- no 5xx except the documented 503 (Triton not ready);
- the status code is one the schema declares for the operation;
- every 4xx/5xx body is OpenAI's error object {"error": {"message", "type", "param", "code"}} (not /health, which
  answers its own status body);
- every JSON body conforms to the operation's response schema.
Afterwards the front must answer /health 200 and the known-answer question exactly as before. A summary (cases and
statuses per operation, failures with the request that caused them) is printed and written to OUT/fuzz.md and
OUT/fuzz.json. Needs schemathesis (pip install af3trt[test]).
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

from af3trt.build.tables import Column, markdown_table

ERROR_FIELDS = {"message", "type", "param", "code"}
KNOWN_ANSWER_TOKENS = 16


def check_response(case, response) -> None:
    """AssertionError (naming the request) when `response` to schemathesis `case` breaks one of the rules above;
    schemathesis' own failure group when the status or the body does not conform to the schema."""
    from schemathesis.checks import response_schema_conformance, status_code_conformance

    where = f"{case.method} {case.path} -> {response.status_code}: {response.text[:300]}"
    assert response.status_code < 500 or response.status_code == 503, where
    case.validate_response(response, checks=[status_code_conformance])
    if response.status_code >= 400 and case.path != "/health":  # /health answers its own status body
        body = json.loads(response.text)
        assert set(body) == {"error"} and set(body["error"]) == ERROR_FIELDS, where
        assert isinstance(body["error"]["message"], str) and body["error"]["message"], where
    if "json" in str(response.headers.get("content-type", "")):
        case.validate_response(response, checks=[response_schema_conformance])


def fuzz(url: str, *, api_key: str | None = None, examples: int = 40, minutes: float | None = None,
         derandomize: bool = False, timeout: float = 120.0) -> dict:
    """Cases from `url`/openapi.json against every operation: one round of `examples` per operation (minutes None),
    or rounds until `minutes` are over. Returns {"operations": {"METHOD /path": {"cases", "statuses"}}, "failures":
    [str], "rounds", "seconds"}; a failing case is recorded and the run goes on."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    from hypothesis import strategies as st

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    schema = schemathesis.openapi.from_url(url + "/openapi.json", headers=headers)
    operations = [r.ok() for r in schema.get_all_operations()]
    served = served_model(url, headers)
    stats = {f"{op.method.upper()} {op.path}": {"cases": 0, "statuses": Counter()} for op in operations}
    failures: list[str] = []
    t0 = time.monotonic()
    deadline = t0 + 60 * minutes if minutes else None
    rounds = 0

    def check(case) -> None:
        if deadline and time.monotonic() > deadline:
            return  # the time is over: the rest of this round's cases are skipped
        entry = stats[f"{case.method.upper()} {case.path}"]
        entry["cases"] += 1
        try:
            response = case.call(headers=headers, timeout=timeout)
            entry["statuses"][response.status_code] += 1
            check_response(case, response)
        except Exception as e:  # noqa: BLE001 - every failure is recorded, the run goes on
            sent = json.dumps(case.body, default=str)[:400] if isinstance(case.body, (dict, list)) else ""
            failures.append(f"{case.method.upper()} {case.path}: {type(e).__name__}: {str(e)[:400]} | sent {sent}")

    while True:
        rounds += 1
        for op in operations:
            cases = st.tuples(op.as_strategy(), st.booleans()).map(lambda c: with_model(*c, served))
            run = settings(max_examples=examples, deadline=None, derandomize=derandomize, database=None,
                           suppress_health_check=list(HealthCheck))(given(case=cases)(check))
            run()
        if deadline is None or time.monotonic() > deadline:
            break
    return {"operations": {k: {"cases": v["cases"], "statuses": dict(sorted(v["statuses"].items()))}
                           for k, v in stats.items()},
            "failures": failures, "rounds": rounds, "seconds": round(time.monotonic() - t0, 1)}


def served_model(url: str, headers: dict) -> str:
    """The model id the front serves (GET /v1/models)."""
    with urllib.request.urlopen(urllib.request.Request(url + "/v1/models", headers=headers), timeout=30) as r:
        return json.loads(r.read())["data"][0]["id"]


def with_model(case, served: bool, model: str):
    """Half the cases name the served model: a generated `model` string is almost never it, and the front answers 404
    before it reads anything else of the request."""
    if served and isinstance(case.body, dict) and "model" in case.body:
        case.body["model"] = model
    return case


def known_answer(url: str, clip: bytes, api_key: str | None = None) -> str:
    """The front's answer to one fixed chat request (the bundled speech clip, KNOWN_ANSWER_TOKENS)."""
    body = {"model": "af3", "max_tokens": KNOWN_ANSWER_TOKENS, "messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": base64.b64encode(clip).decode(), "format": "flac"}},
        {"type": "text", "text": "What is said in the audio?"}]}]}
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {api_key}"} if api_key else {})})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())["choices"][0]["message"]["content"]


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=30) as r:
            return r.status == 200
    except OSError:
        return False


OPERATIONS = [Column("operation", "operation", "`{}`"), Column("cases"),
              Column("statuses", lambda r: ", ".join(f"{k}: {v}" for k, v in r["statuses"].items()))]


def write_summary(result: dict, out: Path) -> str:
    lines = [f"# OpenAI front fuzzed from its OpenAPI schema ({result['seconds']:.0f} s, {result['rounds']} rounds)",
             "", f"Build: `{result['model_repository']}`; schemathesis {result['schemathesis']}, "
             f"{result['examples']} cases per operation per round. `af3trt fuzz` (perf/fuzz.py).", "",
             *markdown_table(OPERATIONS, [{"operation": op, **s} for op, s in result["operations"].items()])]
    lines += ["", f"- failures: **{len(result['failures'])}**"]
    lines += [f"  - {f}" for f in result["failures"][:20]]
    lines += [f"- healthy afterwards: **{result['healthy_after']}**",
              f"- known answer unchanged afterwards: **{result['exact_after']}** ({result['answer_before']!r})"]
    text = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "fuzz.md").write_text(text)
    (out / "fuzz.json").write_text(json.dumps(result, indent=1))
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="af3trt fuzz", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-repository", type=Path, required=True)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--examples", type=int, default=50, help="cases per operation per round")
    ap.add_argument("--out", type=Path, default=Path("perf/results/latest"))
    args = ap.parse_args(argv)
    try:
        import schemathesis
    except ImportError:
        sys.exit("af3trt fuzz needs schemathesis: pip install 'af3trt[test]'")
    from af3trt.perf.serving_path import OpenAIFront
    from af3trt.runtime import assets
    from af3trt.runtime.serve.server import TritonServer

    clip = assets.speech_path().read_bytes()
    logs = Path(tempfile.mkdtemp(prefix="af3trt-fuzz-"))
    print(f"logs: {logs}", flush=True)
    with ExitStack() as stack:
        srv = stack.enter_context(TritonServer(args.model_repository.resolve(),
                                               log_path=logs / "tritonserver.log").start(timeout=600))
        front = OpenAIFront(srv.grpc_url, logs / "openai.log")
        stack.callback(front.stop)
        before = known_answer(front.url, clip)
        result = fuzz(front.url, examples=args.examples, minutes=args.minutes)
        after = known_answer(front.url, clip)
        result.update(model_repository=str(args.model_repository), schemathesis=schemathesis.__version__,
                      examples=args.examples, answer_before=before, healthy_after=healthy(front.url),
                      exact_after=after == before)
    print(write_summary(result, args.out))
    return 0 if not result["failures"] and result["healthy_after"] and result["exact_after"] else 1


if __name__ == "__main__":
    sys.exit(main())
