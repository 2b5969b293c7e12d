"""`af3trt listen`: stream an audio file to WS /v1/realtime (the OpenAI front, runtime/openai/realtime.py) at real-time
speed, as a microphone would, and print what the server says as it says it.

    af3trt listen meeting.flac --question "What was decided?"        the file, then one question about it
    af3trt listen call.wav --vad                                      the server finds the turns and answers each
    af3trt listen talk.mp3 --transcribe --vad                         a transcript per turn
    af3trt listen clip.wav --speed 0 --question "..."                 as fast as the server takes it

The file is decoded here (any WAV/FLAC/OGG/MP3, mono 16 kHz, runtime/stages/audio.py) and sent as 16-kHz PCM16 in
100-ms appends; the session is the OpenAI Realtime API's, spoken with the websockets library. Without --vad the whole
file is one turn, committed at its end. The time from the commit to the first text is printed last.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import json
import os
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from af3trt.runtime.stages.audio import AudioError, iter_mono_16k, open_audio
from af3trt.runtime.stages.lengths import SAMPLE_RATE

CHUNK_S = 0.1


def pcm16_chunks(path: Path):
    """The file as 16-kHz PCM16 bytes, CHUNK_S at a time."""
    with open(path, "rb") as f:
        stream = open_audio(f)
        pending = np.zeros(0, np.float32)
        with stream:
            for block in iter_mono_16k(stream):
                pending = np.concatenate([pending, block])
                n = int(CHUNK_S * SAMPLE_RATE)
                while len(pending) >= n:
                    yield _pcm16(pending[:n])
                    pending = pending[n:]
        if len(pending):
            yield _pcm16(pending)


def _pcm16(x: np.ndarray) -> bytes:
    return (np.clip(x, -1.0, 1.0 - 2**-15) * 32768).astype("<i2").tobytes()


def ws_url(url: str, model: str | None) -> str:
    parts = urlsplit(url if "://" in url else "http://" + url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    path = parts.path.rstrip("/")
    path = path if path.endswith("/v1") else path + "/v1"
    return urlunsplit((scheme, parts.netloc, path + "/realtime", f"model={model}" if model else "", ""))


async def listen(args) -> int:
    import websockets

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    kind = "transcription" if args.transcribe else "realtime"
    session = {"type": kind, "audio": {"input": {
        "format": {"type": "audio/pcm", "rate": SAMPLE_RATE},
        "turn_detection": {"type": "server_vad", "silence_duration_ms": args.silence_ms} if args.vad else None}}}
    if not args.transcribe and args.max_tokens:
        session["max_output_tokens"] = args.max_tokens
    clock = {"commit": None, "first": None}
    # the reader ends once the file was sent, the server has heard all of it (its reply to a last session.update) and
    # every turn it committed is answered
    turns = {"committed": 0, "answered": 0, "updated": 0}

    async with websockets.connect(ws_url(args.url, args.model), additional_headers=headers,
                                  max_size=None) as ws:
        async def send(ev: dict) -> None:
            await ws.send(json.dumps(ev))

        async def read() -> int:
            async for message in ws:
                ev = json.loads(message)
                kind_ = ev["type"]
                if kind_ == "error":
                    print(f"\n[error] {ev['error'].get('code')}: {ev['error']['message']}", file=sys.stderr)
                    if ev["error"].get("code") in ("invalid_api_key", "session_limit_reached", "model_not_found"):
                        return 1
                elif kind_ == "input_audio_buffer.speech_started":
                    print(f"[speech from {ev['audio_start_ms'] / 1000:.1f} s]", file=sys.stderr)
                elif kind_ == "input_audio_buffer.committed":
                    turns["committed"] += 1
                    clock["commit"] = clock["commit"] or time.perf_counter()
                elif kind_ == "session.updated":
                    turns["updated"] += 1  # the first answers the session's setup, the second the last event
                elif kind_ in ("response.output_text.delta", "conversation.item.input_audio_transcription.delta"):
                    clock["first"] = clock["first"] or time.perf_counter()
                    print(ev["delta"], end="", flush=True)
                elif kind_ in ("response.done", "conversation.item.input_audio_transcription.completed",
                               "conversation.item.input_audio_transcription.failed"):
                    print()
                    turns["answered"] += 1
                if turns["updated"] == 2 and turns["answered"] >= turns["committed"]:
                    return 0
            return 1  # the server closed the session first

        reader = asyncio.ensure_future(read())
        await send({"type": "session.update", "session": session})
        start, sent = time.perf_counter(), 0.0
        chunks = pcm16_chunks(args.file)
        if args.vad:  # a pause after the file, so that the detector ends its last turn
            silence = bytes(2 * int(CHUNK_S * SAMPLE_RATE))
            chunks = itertools.chain(chunks, [silence] * (args.silence_ms // int(CHUNK_S * 1000) + 2))
        for chunk in chunks:
            if reader.done():
                return reader.result()
            await send({"type": "input_audio_buffer.append", "audio": base64.b64encode(chunk).decode()})
            sent += len(chunk) / 2 / SAMPLE_RATE
            if args.speed > 0:  # real time (or speed times it): wait until this much audio would have been heard
                await asyncio.sleep(max(0.0, start + sent / args.speed - time.perf_counter()))
        if not args.vad:
            clock["commit"] = time.perf_counter()
            await send({"type": "input_audio_buffer.commit"})
            if not args.transcribe:
                if args.question:
                    await send({"type": "conversation.item.create", "item": {
                        "type": "message", "role": "user", "content": [{"type": "input_text", "text": args.question}]}})
                await send({"type": "response.create"})
        await send({"type": "session.update", "session": {}})  # its reply: the server has heard all of the file
        try:
            rc = await asyncio.wait_for(reader, args.timeout)
        except asyncio.TimeoutError:
            print(f"[no answer within {args.timeout:g} s]", file=sys.stderr)
            return 1
        if clock["commit"] and clock["first"] and not args.vad:
            print(f"[first text {clock['first'] - clock['commit']:.3f} s after the commit]", file=sys.stderr)
        return rc


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="af3trt listen", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("file", type=Path, help="audio file (WAV, FLAC, OGG, MP3)")
    ap.add_argument("--url", default="http://127.0.0.1:9000", help="the OpenAI front (af3trt openai / serve)")
    ap.add_argument("--model", default=None, help="the served model id (default: the server's)")
    ap.add_argument("--question", default=None, help="asked after the file (without --vad)")
    ap.add_argument("--transcribe", action="store_true", help="a transcription session: a transcript per turn")
    ap.add_argument("--vad", action="store_true", help="the server finds turns by voice activity")
    ap.add_argument("--silence-ms", type=int, default=500, help="with --vad: the pause that ends a turn")
    ap.add_argument("--speed", type=float, default=1.0, help="times real time (0: as fast as possible)")
    ap.add_argument("--max-tokens", type=int, default=None, help="longest answer")
    ap.add_argument("--api-key-env", default=None, metavar="VAR", help="send the key in this environment variable")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the answer after the file")
    args = ap.parse_args(argv)
    args.api_key = os.environ.get(args.api_key_env, "") if args.api_key_env else ""
    try:
        return asyncio.run(listen(args))
    except (OSError, AudioError) as e:
        print(f"af3trt listen: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
