"""`af3trt ask`: one question to the AF3 ensemble from the command line, or a local file transcribed whole.

    af3trt ask --audio clip.wav "What is said?" --stream --url 127.0.0.1:8001
    af3trt ask --audio a.wav --audio b.wav --messages conversation.json
    af3trt ask --transcribe meeting.flac --url 127.0.0.1:8001

A conversation file is the ensemble's `messages` input: a JSON list of {"role": "system" | "user" | "assistant",
"content": a string or parts [{"type": "text", "text": …}, {"type": "audio", "audio_index": k}]}, where k counts
the --audio files in order. Audio files are read here, on the client, and sent as encoded bytes.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import AsyncIterator

from af3trt.runtime.client.library import MODEL, AF3Client, AF3Error, Answer, AsyncAF3Client, Request
from af3trt.runtime.stages import contract


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="af3trt ask", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("prompt", nargs="?", default=None, help="the question (or give --messages)")
    ap.add_argument("--messages", type=Path, default=None, help="a conversation: JSON file (see above)")
    ap.add_argument("--audio", action="append", default=[], type=Path, help="audio file (repeatable)")
    ap.add_argument("--system", default=None, help="system prompt")
    ap.add_argument("--url", default="127.0.0.1:8001", help="gRPC address of tritonserver")
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    ap.add_argument("--max-tokens", type=int, default=None)
    ap.add_argument("--temperature", type=float, default=None)
    ap.add_argument("--top-k", type=int, default=None)
    ap.add_argument("--top-p", type=float, default=None)
    ap.add_argument("--repetition-penalty", type=float, default=None)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--strip-prefix", action="store_true", help="drop AF3's 'The spoken content of the audio is'")
    ap.add_argument("--think", action="store_true", help="AF3's thinking mode: think/'s adapter, the prompt "
                                                        "suffix on the last user turn (docs/thinking.md)")
    ap.add_argument("--transcribe", type=Path, default=None, metavar="FILE",
                    help="transcribe a local audio file of any length: cut at pauses into pieces of at most 30 s "
                         "(--chunking), sent concurrently, printed in order with their times")
    ap.add_argument("--chunking", default="auto",
                    help="with --transcribe: 'auto' or a chunking_strategy object as JSON (runtime/stages/longform.py)")
    ap.add_argument("--concurrency", type=int, default=4, help="with --transcribe: pieces in flight")
    args = ap.parse_args(argv)
    if args.transcribe is not None:
        raise SystemExit(_transcribe(args))
    if (args.prompt is None) == (args.messages is None):
        ap.error("give a prompt or --messages (not both)")
    try:
        audio = [p.read_bytes() for p in args.audio]
        messages = args.messages.read_text(encoding="utf-8") if args.messages else None
    except (OSError, UnicodeDecodeError) as e:
        ap.error(f"cannot read {getattr(e, 'filename', None) or args.messages}: {getattr(e, 'strerror', None) or e}")
    client = AF3Client(args.url, args.model)
    kw = dict(messages=messages, system_prompt=args.system, max_tokens=args.max_tokens, temperature=args.temperature,
              top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
              stream=args.stream, strip_prefix=args.strip_prefix or None, thinking=args.think or None)
    try:
        ans = Answer()
        for c in client.stream(args.prompt, audio, **kw):
            for n in c.notices:
                print(f"[notice] {n}", file=sys.stderr)
            sys.stdout.write(c.text)
            sys.stdout.flush()
            ans.add(c)
            ans.latency_s = c.t
        print()
        print(f"[{len(ans.token_ids)} tokens, first after {ans.first_token_s or 0:.3f} s, "
              f"done after {ans.latency_s:.3f} s]", file=sys.stderr)
    except AF3Error as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1)


async def transcribe_file(path, client: AsyncAF3Client, chunking, concurrency: int = 4,
                          max_seconds: float = 4 * 3600.0, **kw) -> AsyncIterator[tuple]:
    """`af3trt ask --transcribe FILE`: (span, its text) per piece of a local file (runtime/stages/longform.py), in order,
    `concurrency` pieces at a time; kw: the Request's sampling fields."""
    from af3trt.runtime.stages import longform
    from af3trt.runtime.stages.audio import iter_mono_16k, open_audio

    async def run(span) -> AsyncIterator[str]:
        req = Request(prompt=longform.TRANSCRIPTION_PROMPT, audio=[longform.wav_bytes(span.wave)], strip_prefix=True,
                      **kw)
        yield (await client.complete(req)).text.strip()

    with open(path, "rb") as f, open_audio(f, max_seconds) as audio:
        spans = longform.aiter_thread(longform.split(iter_mono_16k(audio, max_seconds), chunking))
        async for span, text in longform.ordered(spans, run, concurrency):
            if text is not None:
                yield span, text


def _transcribe(args) -> int:
    from af3trt.runtime.stages import longform
    from af3trt.runtime.stages.errors import InvalidRequest
    from af3trt.runtime.stages.lengths import SAMPLE_RATE

    try:
        chunking = longform.parse_chunking(args.chunking)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    client = AsyncAF3Client(args.url, args.model)
    max_tokens = args.max_tokens
    if max_tokens is None:  # as the HTTP front transcribes: up to the repository's max_output_len
        import tritonclient.grpc as grpcclient

        try:
            cfg = grpcclient.InferenceServerClient(args.url).get_model_config(contract.FUSION).config
            max_tokens = int(cfg.parameters["max_output_len"].string_value) or None
        except Exception:  # noqa: BLE001 - the server's default then
            max_tokens = None
    kw = dict(max_tokens=max_tokens, temperature=args.temperature, seed=args.seed)

    async def run() -> None:
        async for span, text in transcribe_file(args.transcribe, client, chunking, args.concurrency, **kw):
            print(f"[{longform.clock(span.start / SAMPLE_RATE)} → {longform.clock(span.end / SAMPLE_RATE)}] {text}",
                  flush=True)

    try:
        asyncio.run(run())
    except (AF3Error, InvalidRequest, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    main()
