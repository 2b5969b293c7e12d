"""`af3trt fuzz`: the OpenAI front fuzzed from its own OpenAPI schema for minutes, over a build.

    af3trt fuzz --model-repository OUT/model_repository --minutes 10 [--examples 50] [--out perf/results/latest]

Starts tritonserver over the build and `af3trt openai` in front of it (loopback, free ports, stopped by PID), asks a
known-answer question, then runs schemathesis cases generated from the front's /openapi.json against every operation
it lists, round after round (each round `--examples` cases per operation, a fresh seed) until the minutes are over.
Most cases are seeded so that they reach the model (seed_case): the served model id, a valid conversation, valid audio
or a mutated clip (audio_seeds: cut, wrong headers, extreme rates and channel counts, long silences), numbers
folded into their ranges; a third stay as generated. Then, for --grpc-share of the minutes, hypothesis requests go
to the ensemble over gRPC (grpc_requests: the same audio and conversations, every request field), each answered,
busy, or refused with a client's code.
Every response is checked (check_response, the same rules as the suite's bounded run in tests/test_openai_server.py):
- no 5xx except the documented 503 (Triton not ready);
- the status code is one the schema declares for the operation;
- every 4xx/5xx body is OpenAI's error object {"error": {"message", "type", "param", "code"}} (not /health, which
  answers its own status body);
- every JSON body conforms to the operation's response schema.
Afterwards the front must answer /health 200 and the known-answer question exactly as before, and a known gRPC request
give the same token ids. A summary (cases and statuses per operation and per mode, how many reached the decoder,
failures with the request that caused them) is printed and written to OUT/fuzz.md and OUT/fuzz.json. Needs
schemathesis (pip install af3trt[test]).
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


# ------------------------------------------------------------------------------------------------ seeds
# A case generated from the schema alone almost never reaches the model (issue 31: 58 of 19,407 chat cases got a 200,
# no transcription case was valid audio). So most cases are seeded: the served model id, a valid conversation, valid
# audio or a mutation of it (audio_seeds), and the schema's numbers folded into their valid ranges; the rest stay as
# generated.

MODES = ("as generated", "seeded", "mutated audio")
MODE_WEIGHTS = ("seeded", "seeded", "seeded", "mutated audio", "as generated")  # drawn from: 3 in 5 seeded


def _wav(wave, rate: int, channels: int = 1, subtype: str = "PCM_16") -> bytes:
    import io

    import numpy as np
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.repeat(np.asarray(wave, np.float32)[:, None], channels, 1), rate, format="WAV", subtype=subtype)
    return buf.getvalue()


def _patch(data: bytes, at: int, value: int, size: int) -> bytes:
    return data[:at] + value.to_bytes(size, "little") + data[at + size:]


def audio_seeds() -> tuple[list[bytes], dict[str, bytes]]:
    """(valid clips, {mutation: clip}): the bundled speech and short synthetic clips in WAV/FLAC/OGG; cut, wrong
    headers, extreme sample rates and channel counts claimed in a WAV header, long silences, a header claiming hours,
    nothing at all."""
    import io

    import numpy as np
    import soundfile as sf

    from af3trt.perf import clips
    from af3trt.runtime import assets

    def enc(wave, rate, fmt, subtype=None, channels=1):
        buf = io.BytesIO()
        sf.write(buf, np.repeat(np.asarray(wave, np.float32)[:, None], channels, 1), rate, format=fmt,
                 subtype=subtype)
        return buf.getvalue()

    speech = assets.speech_path().read_bytes()
    tone = np.sin(np.arange(16000) / 5.0).astype(np.float32) * 0.3
    valid = [speech, clips.flac_bytes(clips.speech(2.0, seed=7)), enc(tone[:8000], 8000, "WAV", "PCM_16"),
             enc(tone, 44100, "OGG", "VORBIS"), enc(tone, 48000, "FLAC", None, channels=2)]
    wav = _wav(tone, 16000)  # RIFF: channels at byte 22 (2 bytes), sample rate at 24 (4), data size at 40 (4)
    mutations = {
        "truncated to half": speech[: len(speech) // 2],
        "header only": wav[:44],
        "ten bytes": speech[:10],
        "empty": b"",
        "RIFF without WAVE": wav[:8] + b"WAVX" + wav[12:],
        "FLAC magic broken": b"fLaX" + speech[4:],
        "rate 1 Hz": _patch(wav, 24, 1, 4),
        "rate 4 GHz": _patch(wav, 24, 4_000_000_000, 4),
        "rate 400 kHz": _patch(wav, 24, 400_000, 4),
        "0 channels": _patch(wav, 22, 0, 2),
        "64 channels": _patch(wav, 22, 64, 2),
        "65535 channels": _patch(wav, 22, 65535, 2),
        "32 channels": _wav(tone[:3200], 16000, channels=32),
        "data size claims 4 GB": _patch(wav, 40, 0xFFFFFFF0, 4),
        "10 min of silence at 1 kHz": enc(np.zeros(600_000, np.float32), 1000, "FLAC"),
        "1 s at 384 kHz": enc(np.zeros(384_000, np.float32), 384_000, "FLAC"),
        "30 min of silence at 1 kHz, float": _wav(np.zeros(1_800_000), 1000, subtype="FLOAT"),
    }
    return valid, mutations


def conversations(rng, clip: bytes) -> list[dict]:
    """A valid OpenAI conversation with `clip` in it, one of a few shapes (one turn, a system message, an earlier
    exchange, the audio after the text, text only)."""
    import base64

    audio = {"type": "input_audio", "input_audio": {"data": base64.b64encode(clip).decode(),
                                                    "format": _format_of(clip)}}
    ask = {"type": "text", "text": rng.choice(["What is said?", "Describe the sound.", "Transcribe it.", "Who?"])}
    shapes = [
        [{"role": "user", "content": [audio, ask]}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [audio, ask]}],
        [{"role": "user", "content": [audio, ask]}, {"role": "assistant", "content": "A voice."},
         {"role": "user", "content": "Say more."}],
        [{"role": "developer", "content": "Answer in English."}, {"role": "user", "content": [ask, audio]}],
        [{"role": "user", "content": ask["text"]}],
    ]
    return rng.choice(shapes)


def _format_of(clip: bytes) -> str:
    return {b"RIFF": "wav", b"fLaC": "flac", b"OggS": "ogg"}.get(clip[:4], "wav")


def _fold(value, lo: float, hi: float, rng, integer: bool):
    """A generated number folded into [lo, hi] (a fresh draw when it is not a finite number)."""
    import math

    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        value = rng.uniform(lo, hi)
    span = hi - lo
    folded = lo + (abs(value) % span if span else 0)
    return int(folded) if integer else folded


def seed_case(case, mode: str, rng, model: str, seeds: tuple[list[bytes], dict[str, bytes]]):
    """`case` (schemathesis) seeded in place for `mode` (MODES): the served model, a valid conversation with valid or
    mutated audio, the numbers the model reads folded into their valid ranges. "as generated": only the model, in
    half of those cases (a generated name is almost never the served one: 404 before anything else is read)."""
    body = case.body
    if not isinstance(body, dict):
        return case
    if mode == "as generated":
        if "model" in body and rng.random() < 0.5:
            body["model"] = model
        return case
    valid, mutations = seeds
    clip = rng.choice(valid) if mode == "seeded" else mutations[rng.choice(sorted(mutations))]
    body["model"] = model
    if case.path.endswith("/chat/completions"):
        body["messages"] = conversations(rng, clip)
        for key, (lo, hi, integer) in {"max_tokens": (1, 16, True), "max_completion_tokens": (1, 16, True),
                                       "min_tokens": (0, 1, True), "temperature": (0.0, 2.0, False),
                                       "top_p": (0.01, 1.0, False), "seed": (0, 2**32, True)}.items():
            if key in body and body[key] is not None:
                body[key] = _fold(body[key], lo, hi, rng, integer)
        if "max_tokens" in body and "max_completion_tokens" in body:
            body["max_completion_tokens"] = body["max_tokens"]
        if body.get("n") is not None:
            body["n"] = 1
        if body.get("stop") is not None and not (isinstance(body["stop"], str) and body["stop"]):
            body["stop"] = [s for s in body["stop"] if isinstance(s, str) and s][:4] or None
    elif case.path.endswith("/audio/transcriptions"):
        from schemathesis.transport.serialization import Binary

        body["file"] = Binary(clip)
        if body.get("temperature") is not None:
            body["temperature"] = _fold(body["temperature"], 0.0, 1.0, rng, False)
        if "chunking_strategy" in body and rng.random() < 0.5:
            body["chunking_strategy"] = "auto"
    return case


def fuzz(url: str, *, api_key: str | None = None, examples: int = 40, minutes: float | None = None,
         derandomize: bool = False, timeout: float = 120.0) -> dict:
    """Cases from `url`/openapi.json against every operation: one round of `examples` per operation (minutes None),
    or rounds until `minutes` are over; each case as generated, seeded, or seeded with mutated audio (seed_case).
    Returns {"operations": {"METHOD /path": {"cases", "statuses", "by_mode": {mode: {status: n}}}}, "failures":
    [str], "rounds", "seconds"}; a failing case is recorded and the run goes on."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    from hypothesis import strategies as st

    import random

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    schema = schemathesis.openapi.from_url(url + "/openapi.json", headers=headers)
    operations = [r.ok() for r in schema.get_all_operations()]
    served = served_model(url, headers)
    seeds = audio_seeds()
    stats = {f"{op.method.upper()} {op.path}": {"cases": 0, "statuses": Counter(), "by_mode": {}}
             for op in operations}
    failures: list[str] = []
    t0 = time.monotonic()
    deadline = t0 + 60 * minutes if minutes else None
    rounds = 0

    def check(case) -> None:
        case, mode = case
        if deadline and time.monotonic() > deadline:
            return  # the time is over: the rest of this round's cases are skipped
        entry = stats[f"{case.method.upper()} {case.path}"]
        entry["cases"] += 1
        try:
            response = case.call(headers=headers, timeout=timeout)
            entry["statuses"][response.status_code] += 1
            entry["by_mode"].setdefault(mode, Counter())[response.status_code] += 1
            check_response(case, response)
        except Exception as e:  # noqa: BLE001 - every failure is recorded, the run goes on
            sent = json.dumps(case.body, default=str)[:400] if isinstance(case.body, (dict, list)) else ""
            failures.append(f"{case.method.upper()} {case.path}: {type(e).__name__}: {str(e)[:400]} | sent {sent}")

    while True:
        rounds += 1
        for op in operations:
            cases = st.tuples(op.as_strategy(), st.sampled_from(MODE_WEIGHTS),
                              st.randoms(use_true_random=False)).map(
                lambda c: (seed_case(c[0], c[1], c[2], served, seeds), c[1]))
            run = settings(max_examples=examples, deadline=None, derandomize=derandomize, database=None,
                           suppress_health_check=list(HealthCheck))(given(case=cases)(check))
            run()
        if deadline is None or time.monotonic() > deadline:
            break
    return {"operations": {k: {"cases": v["cases"], "statuses": dict(sorted(v["statuses"].items())),
                               "by_mode": {m: dict(sorted(c.items())) for m, c in v["by_mode"].items()}}
                           for k, v in stats.items()},
            "failures": failures, "rounds": rounds, "seconds": round(time.monotonic() - t0, 1)}


def grpc_requests(seeds: tuple[list[bytes], dict[str, bytes]], thinking: bool = False):
    """Hypothesis strategy of ("tame" | "wild", client Request) to the ensemble. Three in four are tame (valid by
    construction, so each must reach the decoder): valid audio, a prompt or a valid
    conversation, every number in its range, thinking only where the build has it (`thinking`);
    the rest are wild: a mutated clip or random bytes, any conversation (wrong roles, audio indices out of range,
    random text), any number of the field's type."""
    from hypothesis import strategies as st

    from af3trt.runtime.client.library import Request

    valid, mutations = seeds

    def flip(clip_and_flips) -> bytes:  # bytes of a valid clip's first 256 (its header) xor-ed
        data = bytearray(clip_and_flips[0])
        for at, value in clip_and_flips[1]:
            if at < len(data):
                data[at] ^= value
        return bytes(data)

    flipped = st.tuples(st.sampled_from(valid), st.lists(st.tuples(st.integers(0, 255), st.integers(1, 255)),
                                                         max_size=8)).map(flip)
    clip = st.one_of(st.sampled_from(valid), st.sampled_from(sorted(mutations.values())), flipped,
                     st.binary(max_size=512))
    ask = st.one_of(st.sampled_from(["What is said?", "Describe the sound.", "Transcribe the input speech."]),
                    st.text(max_size=80))
    turn = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "developer", "tool"]),
                                  "content": st.one_of(ask, st.lists(st.one_of(
                                      st.builds(lambda t: {"type": "text", "text": t}, ask),
                                      st.builds(lambda k: {"type": "audio", "audio_index": k}, st.integers(-1, 3))),
                                      max_size=3))})
    def valid_conversation(clips: int):  # one user turn that references every clip sent, then asks
        return st.builds(lambda t: [{"role": "user", "content": [*({"type": "audio", "audio_index": k}
                                                                    for k in range(clips)),
                                                                  {"type": "text", "text": t}]}], ask)

    messages = st.one_of(st.none(), valid_conversation(1), st.lists(turn, max_size=4), st.text(max_size=60))

    def number(lo, hi, integer, wild):  # in range; anywhere in the type for a wild request
        base = st.integers(lo, hi) if integer else st.floats(lo, hi)
        wide = st.integers(-2**31, 2**31 - 1) if integer else st.floats(width=32)
        return st.one_of(st.none(), base, wide) if wild else st.one_of(st.none(), base)

    @st.composite
    def requests(draw) -> tuple[str, Request]:
        kind = draw(st.sampled_from(["tame"] * 3 + ["wild"]))  # a quarter with anything in every field
        wild = kind == "wild"
        audio = draw(st.lists(clip if wild else st.sampled_from(valid), min_size=0 if wild else 1, max_size=2))
        conversation = draw(messages if wild else st.one_of(st.none(), valid_conversation(len(audio))))
        return kind, Request(
            prompt=None if conversation is not None else draw(ask), messages=conversation, audio=audio,
            system_prompt=draw(st.one_of(st.none(), ask)) if wild or conversation is None else None,
            max_tokens=draw(number(1, 16, True, wild)),
            temperature=draw(number(0.0, 2.0, False, wild)), top_k=draw(number(0, 50, True, wild)),
            top_p=draw(number(0.01, 1.0, False, wild)), repetition_penalty=draw(number(0.5, 2.0, False, wild)),
            seed=draw(st.one_of(st.none(), st.integers(0, 2**64 - 1))), stream=draw(st.booleans()),
            strip_prefix=draw(st.one_of(st.none(), st.booleans())),
            thinking=draw(st.one_of(st.none(), st.booleans()) if wild or thinking else st.sampled_from([None, False])),
            min_tokens=draw(number(0, 1, True, wild)), ignore_eos=draw(st.one_of(st.none(), st.booleans())))

    return requests()


def fuzz_grpc(url: str, *, examples: int = 100, minutes: float | None = None, derandomize: bool = False,
              timeout: float = 120.0, thinking: bool = False) -> dict:
    """grpc_requests() through the ensemble over gRPC (AF3Client), `examples` per round, rounds until `minutes` are
    over (one when None). Each request must end answered, busy, or refused with a client's code (invalid_argument,
    unsupported) and a message; anything else (internal, no server, no answer in time) is a failure. Returns
    {"cases", "outcomes", "tame", "failures", "rounds", "seconds"}; "answered" with tokens means it reached the decoder,
    "tame" counts the requests valid by construction and those of them that did."""
    from hypothesis import HealthCheck, given, settings

    from af3trt.runtime.client.library import AF3Busy, AF3Client, AF3ConnectionError, AF3Error
    from af3trt.runtime.stages.errors import ErrorCode

    client = AF3Client(url, timeout=timeout)
    outcomes: Counter = Counter()
    tame: Counter = Counter()  # tame requests (valid by construction): how many, and how many reached the decoder
    failures: list[str] = []
    t0 = time.monotonic()
    deadline = t0 + 60 * minutes if minutes else None
    rounds = 0

    def check(case) -> None:
        if deadline and time.monotonic() > deadline:
            return
        kind, req = case
        tame["cases"] += kind == "tame"
        try:
            answer = client.complete(req)
            outcomes["answered with tokens" if answer.token_ids else "answered, no tokens"] += 1
            tame["answered with tokens"] += kind == "tame" and bool(answer.token_ids)
        except AF3Busy:
            outcomes["busy"] += 1
        except AF3ConnectionError as e:
            failures.append(f"no answer: {e} | {_describe(req)}")
        except AF3Error as e:
            if e.code in (ErrorCode.INVALID_ARGUMENT, ErrorCode.UNSUPPORTED) and str(e):
                outcomes[f"refused: {e.code.value.tag}"] += 1
            else:
                failures.append(f"{e.code.name}: {str(e)[:300]} | {_describe(req)}")
        except Exception as e:  # noqa: BLE001 - recorded, the run goes on
            failures.append(f"{type(e).__name__}: {str(e)[:300]} | {_describe(req)}")

    requests = grpc_requests(audio_seeds(), thinking)
    try:
        while True:
            rounds += 1
            settings(max_examples=examples, deadline=None, derandomize=derandomize, database=None,
                     suppress_health_check=list(HealthCheck))(given(case=requests)(check))()
            if deadline is None or time.monotonic() > deadline:
                break
    finally:
        client.close()
    return {"cases": sum(outcomes.values()) + len(failures), "outcomes": dict(outcomes), "tame": dict(tame),
            "failures": failures,
            "rounds": rounds, "seconds": round(time.monotonic() - t0, 1)}


def _describe(req) -> str:
    return json.dumps({k: (f"<{len(v)} clips: {[len(c) for c in v]} bytes>" if k == "audio" else v)
                       for k, v in vars(req).items() if v not in (None, ())}, default=str)[:400]


def known_ids(url: str, clip: bytes) -> list[int]:
    """The token ids of one fixed gRPC request (the bundled clip, KNOWN_ANSWER_TOKENS)."""
    from af3trt.runtime.client.library import AF3Client

    with AF3Client(url, timeout=300) as client:
        return client.ask("What is said?", [clip], max_tokens=KNOWN_ANSWER_TOKENS).token_ids


def served_model(url: str, headers: dict) -> str:
    """The model id the front serves (GET /v1/models)."""
    with urllib.request.urlopen(urllib.request.Request(url + "/v1/models", headers=headers), timeout=30) as r:
        return json.loads(r.read())["data"][0]["id"]


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


def fmt(c: dict) -> str:
    """Counts as 'key: n, …' (— for none)."""
    return ", ".join(f"{k}: {v}" for k, v in c.items()) or "—"


OPERATIONS = [Column("operation", "operation", "`{}`"), Column("cases"), Column("statuses", fmt=fmt),
              *(Column(m, lambda r, m=m: r.get("by_mode", {}).get(m, {}), fmt) for m in MODES)]


def write_summary(result: dict, out: Path) -> str:
    lines = [f"# Fuzzing that reaches the model ({result['seconds']:.0f} s: OpenAI front {result['rounds']} rounds, "
             f"gRPC {result['grpc']['rounds']} rounds)", "",
             f"Build: `{result['model_repository']}`; schemathesis {result['schemathesis']}, {result['examples']} cases "
             f"per operation per round from the front's /openapi.json, each {', '.join(MODES)} (perf/fuzz.py "
             f"seed_case: the served model id, a valid conversation, valid audio or one of {result['mutations']} "
             f"audio mutations, the numbers folded into range); then hypothesis requests over gRPC (grpc_requests). "
             f"`af3trt fuzz` (perf/fuzz.py). {result.get('note', '')}", "",
             *markdown_table(OPERATIONS, [{"operation": op, **st} for op, st in result["operations"].items()])]
    g = result["grpc"]
    reached = sum(v["statuses"].get(200, 0) for k, v in result["operations"].items() if k.startswith("POST"))
    posted = sum(v["cases"] for k, v in result["operations"].items() if k.startswith("POST"))
    lines += ["", f"- OpenAI front: **{reached} of {posted}** POST cases answered 200 (reached the decoder)",
              f"- gRPC: {g['cases']} requests: {fmt(g['outcomes'])}; tame (valid by construction): "
              f"{g.get('tame', {}).get('answered with tokens', 0)} of {g.get('tame', {}).get('cases', 0)} reached the decoder",
              f"- failures: **{len(result['failures']) + len(g['failures'])}**"]
    lines += [f"  - {f}" for f in (result["failures"] + g["failures"])[:20]]
    lines += [f"- healthy afterwards: **{result['healthy_after']}**",
              f"- known answers unchanged afterwards: **{result['exact_after']}** (front: "
              f"{result['answer_before']!r}; gRPC token ids {result['ids_before']})"]
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
    ap.add_argument("--grpc-share", type=float, default=0.3, help="share of the minutes for the gRPC requests")
    ap.add_argument("--note", default="", help="a line for the summary (e.g. how loaded the machine was)")
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
        before, ids_before = known_answer(front.url, clip), known_ids(srv.grpc_url, clip)
        result = fuzz(front.url, examples=args.examples, minutes=args.minutes * (1 - args.grpc_share))
        thinking = (args.model_repository.resolve().parent / "artifacts" / "think").is_dir()
        result["grpc"] = fuzz_grpc(srv.grpc_url, examples=args.examples, minutes=args.minutes * args.grpc_share,
                                   thinking=thinking)
        after, ids_after = known_answer(front.url, clip), known_ids(srv.grpc_url, clip)
        result.update(model_repository=str(args.model_repository), schemathesis=schemathesis.__version__,
                      examples=args.examples, answer_before=before, ids_before=ids_before,
                      healthy_after=healthy(front.url), exact_after=after == before and ids_after == ids_before,
                      mutations=len(audio_seeds()[1]), note=args.note,
                      seconds=round(result["seconds"] + result["grpc"]["seconds"], 1))
    print(write_summary(result, args.out))
    ok = not result["failures"] and not result["grpc"]["failures"]
    return 0 if ok and result["healthy_after"] and result["exact_after"] else 1


if __name__ == "__main__":
    sys.exit(main())
