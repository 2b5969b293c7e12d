"""Live audio benchmark (WS /v1/realtime, runtime/openai/realtime.py) against `af3trt serve --openai-port` on a model
repository (the tiny CPU build by default): a benchmark, not a timed test.

    python -m af3trt.perf.realtime --model-repository out/af3-tiny/model_repository --out perf/results/latest

1. Time to first token after the commit against the length of audio already streamed (30 s, 2 min, 10 min), with
   and without incremental encoding (`af3trt openai --no-realtime-encode-ahead`), one run each: a session streams
   espeak-ng speech (perf/clips.py talk) as 24-kHz PCM16 in 100-ms appends at --speed times real time, then sends
   input_audio_buffer.commit and response.create; the time is from the commit's send to the first
   response.output_text.delta. Each mode runs on a server of its own (no cache shared) and each length on other
   audio. The stages' compute for the commit's request is read from Triton's statistics (perf/stats.py).
2. Concurrent sessions at real-time rate: N sessions (1, 2, 4, …) each stream --session-seconds of speech at real
   time (their starts spread over one turn) and commit every --turn-seconds with a response of 8 tokens; a level
   holds when no append is refused and the 95th percentile of the time to first token stays under --ttft-limit.

Writes realtime.json and realtime.md to --out; prints both.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import time
from pathlib import Path

import numpy as np

from af3trt.perf import clips, machine, stats
from af3trt.build.tables import Column, markdown_table
from af3trt.runtime.batch import Served

RATE = 24000  # OpenAI's default input: 24-kHz PCM16
CHUNK_S = 0.1
ANSWER_TOKENS = 8
STAGES = ("preprocess", "encoder", "fusion", "decoder", "postprocess")


def talk_pcm24(seconds: float, seed: int) -> bytes:
    """Speech with pauses (espeak-ng sentences) as 24-kHz PCM16 bytes."""
    from scipy.signal import resample_poly

    wave, _ = clips.talk(seconds, seed=seed)
    wave = resample_poly(wave[: int(seconds * clips.SR)], 3, 2)
    return (np.clip(wave, -1, 1 - 2**-15) * 32768).astype("<i2").tobytes()


def ws_url(http_url: str) -> str:
    return http_url.replace("http://", "ws://") + "/v1/realtime"


class Session:
    """One realtime session over the websockets library: events read in the background, waited for by type."""

    def __init__(self, ws):
        self.ws, self.events, self.waiters = ws, [], []
        self.reader = asyncio.ensure_future(self._read())

    async def _read(self):
        async for message in self.ws:
            ev = json.loads(message)
            ev["_t"] = time.perf_counter()
            self.events.append(ev)
            for kind, fut in list(self.waiters):
                if ev["type"] == kind and not fut.done():
                    fut.set_result(ev)
                    self.waiters.remove((kind, fut))

    def next(self, kind: str) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        self.waiters.append((kind, fut))
        return fut

    async def send(self, ev: dict) -> None:
        await self.ws.send(json.dumps(ev))

    async def stream(self, raw: bytes, speed: float) -> None:
        """raw at `speed` times real time (0: at once) in CHUNK_S appends."""
        step = 2 * int(CHUNK_S * RATE)
        start = time.perf_counter()
        for at in range(0, len(raw), step):
            chunk = base64.b64encode(raw[at: at + step]).decode()
            await self.send({"type": "input_audio_buffer.append", "audio": chunk})
            if speed > 0:
                await asyncio.sleep(max(0.0, start + (at + step) / 2 / RATE / speed - time.perf_counter()))

    async def heard(self) -> None:
        """Every event sent so far has been handled (the reply to a session.update comes after them)."""
        updated = self.next("session.updated")
        await self.send({"type": "session.update", "session": {}})
        await updated

    def errors(self) -> list[dict]:
        return [e["error"] for e in self.events if e["type"] == "error"]


async def open_session(url: str, **session) -> Session:
    import websockets

    ws = await websockets.connect(ws_url(url), max_size=None)
    s = Session(ws)
    created = s.next("session.updated")
    await s.send({"type": "session.update", "session": {
        "type": "realtime", "max_output_tokens": ANSWER_TOKENS,
        "audio": {"input": {"format": {"type": "audio/pcm", "rate": RATE}, "turn_detection": None}}, **session}})
    await created
    return s


async def ask(s: Session) -> tuple[float, dict]:
    """commit + response.create: (seconds from the commit's send to the first text, response.done)."""
    first, done = s.next("response.output_text.delta"), s.next("response.done")
    t0 = time.perf_counter()
    await s.send({"type": "input_audio_buffer.commit"})
    await s.send({"type": "response.create"})
    ev = await done
    t_first = first.result()["_t"] if first.done() else ev["_t"]
    if not first.done():
        first.cancel()
    return t_first - t0, ev


# ---------------------------------------------------------------------------------------------- 1. TTFT vs length


async def ttft_run(url: str, grpc_url: str, seconds: float, seed: int, speed: float) -> dict:
    raw = talk_pcm24(seconds, seed)
    s = await open_session(url)
    try:
        t0 = time.perf_counter()
        await s.stream(raw, speed)
        await s.heard()
        streamed_s = time.perf_counter() - t0
        before = stats.snapshot(grpc_url)
        ttft, done = await ask(s)
        split = stats.stage_split(stats.diff(before, stats.snapshot(grpc_url)), ensemble="af3", stages=STAGES)
        assert done["response"]["status"] in ("completed", "incomplete"), done
        assert not s.errors(), s.errors()
    finally:
        await s.ws.close()
    return {"seconds": seconds, "ttft_s": round(ttft, 3), "streamed_in_s": round(streamed_s, 1),
            "requests_in_window": split.get("requests"),
            "stage_ms": {k: round(v["critical_ms"], 1) for k, v in split.get("stages", {}).items()},
            "decoder_ms": round(split.get("decoder_generation_ms", 0.0), 1),
            "prompt_tokens": done["response"]["usage"]["input_tokens"]}


def ttft_vs_length(repository: Path, lengths: list[float], speed: float) -> dict:
    out = {}
    for ahead in (True, False):
        extra = ["--realtime-max-speed", "0"] + ([] if ahead else ["--no-realtime-encode-ahead"])
        served = Served(repository, 300, extra)
        grpc_url = f"127.0.0.1:{served.grpc_port}"
        rows = []
        try:
            for i, seconds in enumerate(lengths):
                row = asyncio.run(ttft_run(served.url, grpc_url, seconds, seed=10 * i + (0 if ahead else 5),
                                           speed=speed))
                print(f"encode ahead {'on ' if ahead else 'off'}  {seconds:5.0f} s streamed: time to first token "
                      f"{row['ttft_s']:.3f} s  {row['stage_ms']}", flush=True)
                rows.append(row)
        finally:
            served.stop()
        out["with" if ahead else "without"] = rows
    return out


# ---------------------------------------------------------------------------------------------- 2. concurrency


async def agent(url: str, raw: bytes, turn_s: float, delay: float) -> dict:
    await asyncio.sleep(delay)
    s = await open_session(url)
    ttfts = []
    try:
        step = int(turn_s * RATE) * 2
        for at in range(0, len(raw), step):
            await s.stream(raw[at: at + step], 1.0)
            ttft, done = await ask(s)
            ttfts.append(ttft)
    finally:
        await s.ws.close()
    return {"ttfts": ttfts, "errors": s.errors()}


async def level(url: str, n: int, session_s: float, turn_s: float) -> dict:
    raws = [talk_pcm24(session_s, seed=100 + i) for i in range(n)]
    t0 = time.perf_counter()
    runs = await asyncio.gather(*(agent(url, raws[i], turn_s, turn_s * i / n) for i in range(n)),
                                return_exceptions=True)
    wall = time.perf_counter() - t0
    failed = [repr(r) for r in runs if isinstance(r, BaseException)]
    ttfts = [t for r in runs if isinstance(r, dict) for t in r["ttfts"]]
    errors = [e for r in runs if isinstance(r, dict) for e in r["errors"]]
    return {"sessions": n, "turns": len(ttfts), "wall_s": round(wall, 1), "failed_sessions": failed,
            "error_events": errors[:5], "error_count": len(errors),
            "ttft_p50_s": round(float(np.percentile(ttfts, 50)), 3) if ttfts else None,
            "ttft_p95_s": round(float(np.percentile(ttfts, 95)), 3) if ttfts else None,
            "ttft_max_s": round(max(ttfts), 3) if ttfts else None}


def concurrency(repository: Path, levels: list[int], session_s: float, turn_s: float, limit_s: float) -> dict:
    served = Served(repository, 300, ["--realtime-max-sessions", str(max(levels) + 1)])
    rows, held = [], 0
    try:
        for n in levels:
            row = asyncio.run(level(served.url, n, session_s, turn_s))
            row["holds"] = not row["failed_sessions"] and not row["error_count"] and row["ttft_p95_s"] is not None \
                and row["ttft_p95_s"] <= limit_s
            print(f"{n:3d} sessions at real time: time to first token p50 {row['ttft_p50_s']} s, p95 "
                  f"{row['ttft_p95_s']} s, errors {row['error_count']}, failed {len(row['failed_sessions'])}: "
                  f"{'holds' if row['holds'] else 'does not hold'}", flush=True)
            rows.append(row)
            if not row["holds"]:
                break
            held = n
    finally:
        served.stop()
    return {"levels": rows, "max_sessions_held": held, "ttft_limit_s": limit_s, "session_seconds": session_s,
            "turn_seconds": turn_s}


# ---------------------------------------------------------------------------------------------- report


TTFT = [Column("streamed", "seconds", lambda v: f"{v / 60:g} min"), Column("encode ahead", "ahead",
                                                                           lambda v: "on" if v else "off"),
        Column("time to first token (s)", "ttft_s", "{:.3f}"),
        *(Column(stage, ("stage_ms", stage), "{:.0f}") for stage in ("preprocess", "encoder", "fusion")),
        Column("decoder", "decoder_ms", "{:.0f}"), Column("prompt tokens", "prompt_tokens")]
SESSIONS = [Column("sessions"), Column("turns"), Column("TTFT p50 (s)", "ttft_p50_s"),
            Column("TTFT p95 (s)", "ttft_p95_s"), Column("TTFT max (s)", "ttft_max_s"),
            Column("error events", "error_count"), Column("holds", "holds", lambda v: "yes" if v else "no")]


def report(result: dict) -> str:
    m, t, c = result["machine"], result["ttft"], result["concurrency"]
    cpu = m["cpu"].get("Model name", "?")
    lines = ["# Live audio (WS /v1/realtime): time to first token and concurrent sessions\n",
             f"Machine: {cpu}, {m['logical_cpus']} logical CPUs, {m['ram_bytes'] / 2**30:.0f} GiB; load average at "
             f"start {result['load_average']}. {result['note']}",
             f"Model repository: {result['repository']} (CPU target). Commit {m.get('commit')}.\n",
             "## Time to first token after the commit, against audio already streamed\n",
             f"24-kHz PCM16 espeak-ng speech streamed at {result['speed']:g}x real time in 100-ms appends, then "
             f"commit + response.create ({ANSWER_TOKENS} tokens); one run each. The stage columns are the commit's "
             "request (queue + compute in Triton, ms; the decoder's is its prefill and first token, derived).\n",
             *markdown_table(TTFT, [{**r, "ahead": mode == "with"} for mode in ("with", "without") for r in t[mode]])]
    lines += ["", "## Concurrent sessions at real-time rate\n",
              f"Each session streams {c['session_seconds']:g} s of speech at real time and commits every "
              f"{c['turn_seconds']:g} s ({ANSWER_TOKENS}-token answers); a level holds with no refused append and a "
              f"95th-percentile time to first token of at most {c['ttft_limit_s']:g} s.\n",
              *markdown_table(SESSIONS, c["levels"])]
    lines.append(f"\nSessions held at real-time rate: **{c['max_sessions_held']}**.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m af3trt.perf.realtime", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-repository", type=Path, required=True)
    ap.add_argument("--lengths", default="30,120,600", help="seconds streamed before the commit")
    ap.add_argument("--speed", type=float, default=1.0, help="times real time the audio is streamed at (part 1)")
    ap.add_argument("--levels", default="1,2,4,8,16,32", help="concurrent sessions tried, until one does not hold")
    ap.add_argument("--session-seconds", type=float, default=45.0)
    ap.add_argument("--turn-seconds", type=float, default=15.0)
    ap.add_argument("--ttft-limit", type=float, default=1.0, help="seconds: the 95th percentile a level must meet")
    ap.add_argument("--parts", default="ttft,concurrency", help="what to run: ttft, concurrency (both by default; a "
                                                               "part left out is kept from --out's realtime.json)")
    ap.add_argument("--note", default="", help="a sentence about the machine's conditions, for the report")
    ap.add_argument("--out", type=Path, default=Path("perf/results/latest"))
    args = ap.parse_args(argv)
    repo = args.model_repository.resolve()
    result = {"machine": machine.describe(Path(__file__).resolve().parent.parent),
              "repository": str(args.model_repository), "load_average": machine.load_average(), "note": args.note,
              "speed": args.speed}
    parts = set(args.parts.split(","))
    previous = args.out / "realtime.json"
    kept = json.loads(previous.read_text()) if previous.exists() and parts != {"ttft", "concurrency"} else {}
    if "ttft" in parts:
        result["ttft"] = ttft_vs_length(repo, [float(x) for x in args.lengths.split(",")], args.speed)
    else:
        result.update({k: kept[k] for k in ("ttft", "speed", "load_average", "note")})
        result["concurrency_load_average"] = machine.load_average()
    if "concurrency" in parts:
        result["concurrency"] = concurrency(repo, [int(x) for x in args.levels.split(",")], args.session_seconds,
                                           args.turn_seconds, args.ttft_limit)
    else:
        result["concurrency"] = kept["concurrency"]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "realtime.json").write_text(json.dumps(result, indent=1))
    (args.out / "realtime.md").write_text(report(result))
    print(report(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
