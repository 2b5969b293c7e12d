"""gRPC client for the AF3 ensemble, and the `af3trt ask` command.

    af3trt ask --audio clip.wav "What is said?" --stream --url 127.0.0.1:8001

Audio files are read here, on the client, and sent as encoded bytes; the server never opens a path or URL.
The ensemble is decoupled, so every call goes through gRPC streaming: with stream=False the server sends the
whole answer in one response.
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

MODEL = "af3"


class AF3Error(RuntimeError):
    """The server answered this request with an error."""


class AF3Busy(AF3Error):
    """The server is past capacity (UNAVAILABLE): a queue was full or the request waited too long. Retry later."""


# How "past capacity" reads in the error text: Triton's queue policy ("Exceeds maximum queue size", "Request
# timeout expired"), our CPU decoder's "server busy" (a gRPC stream carries the message, not the status code).
BUSY_MARKERS = ("Exceeds maximum queue size", "Request timeout expired", "server busy")


def as_error(message: str) -> AF3Error:
    return AF3Busy(f"server busy: {message}") if any(m in message for m in BUSY_MARKERS) else AF3Error(message)


@dataclass
class Chunk:
    text: str
    token_ids: list[int]
    notices: list[str]
    t: float  # seconds since the request was sent


@dataclass
class Answer:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)
    chunks: int = 0
    first_token_s: float | None = None
    latency_s: float = 0.0


def _inputs(prompt: str, audio, system_prompt, params: dict):
    import tritonclient.grpc as grpcclient

    def make(name, array, dtype):
        t = grpcclient.InferInput(name, list(array.shape), dtype)
        t.set_data_from_numpy(array)
        return t

    ins = [make("text_input", np.array([prompt.encode()], np.object_), "BYTES")]
    if system_prompt is not None:
        ins.append(make("system_prompt", np.array([system_prompt.encode()], np.object_), "BYTES"))
    if audio:
        ins.append(make("audio", np.array([bytes(a) for a in audio], np.object_), "BYTES"))
    kinds = {"max_tokens": (np.int32, "INT32"), "temperature": (np.float32, "FP32"), "top_k": (np.int32, "INT32"),
             "top_p": (np.float32, "FP32"), "repetition_penalty": (np.float32, "FP32"), "seed": (np.uint64, "UINT64"),
             "stream": (np.bool_, "BOOL"), "strip_prefix": (np.bool_, "BOOL")}
    for name, value in params.items():
        if value is not None:
            np_type, triton_type = kinds[name]
            ins.append(make(name, np.array([value], np_type), triton_type))
    return ins


class AF3Client:
    def __init__(self, url: str = "127.0.0.1:8001", model: str = MODEL, timeout: float = 600.0):
        self.url, self.model, self.timeout = url, model, timeout

    def stream(self, prompt: str, audio: list[bytes] = (), *, system_prompt: str | None = None,
               max_tokens: int | None = None, temperature: float | None = None, top_k: int | None = None,
               top_p: float | None = None, repetition_penalty: float | None = None, seed: int | None = None,
               stream: bool = True, strip_prefix: bool | None = None,
               request_id: str | None = None, deadline_s: float | None = None) -> Iterator[Chunk]:
        """Yield the answer's chunks as the server sends them (one chunk when stream=False).

        deadline_s: a gRPC deadline on the whole answer; when it passes, the server cancels the request."""
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        params = dict(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                      repetition_penalty=repetition_penalty, seed=seed, stream=stream, strip_prefix=strip_prefix)
        inputs = _inputs(prompt, list(audio), system_prompt, params)
        results: queue.Queue = queue.Queue()
        client = grpcclient.InferenceServerClient(self.url)
        t0 = time.perf_counter()
        client.start_stream(callback=lambda result, error: results.put((result, error)), stream_timeout=deadline_s)
        try:
            try:
                client.async_stream_infer(self.model, inputs, request_id=request_id or uuid.uuid4().hex,
                                          enable_empty_final_response=True,
                                          timeout=None if deadline_s is None else int(deadline_s * 1e6))
            except InferenceServerException as e:  # the stream broke before the request left (server down)
                try:
                    _, error = results.get(timeout=1.0)
                except queue.Empty:
                    error = e
                raise as_error(str(error or e)) from None
            while True:
                try:
                    result, error = results.get(timeout=self.timeout)
                except queue.Empty:
                    raise AF3Error(f"no response within {self.timeout:.0f} s") from None
                if error is not None:
                    raise as_error(str(error))
                response = result.get_response()
                text = result.as_numpy("text_output")
                if text is not None:
                    notice = result.as_numpy("notice")
                    notice = bytes(notice.reshape(-1)[0]).decode() if notice is not None else ""
                    yield Chunk(text=b"".join(bytes(x) for x in text.reshape(-1)).decode("utf-8", "replace"),
                                token_ids=result.as_numpy("output_ids").reshape(-1).tolist(),
                                notices=json.loads(notice) if notice else [], t=time.perf_counter() - t0)
                final = response.parameters.get("triton_final_response")
                if final is not None and final.bool_param:
                    return
        finally:
            client.stop_stream(cancel_requests=True)
            client.close()

    def ask(self, prompt: str, audio: list[bytes] = (), **kw) -> Answer:
        """The whole answer, with its first-chunk time and latency."""
        ans = Answer()
        t0 = time.perf_counter()
        for c in self.stream(prompt, audio, **kw):
            ans.text += c.text
            ans.token_ids += c.token_ids
            ans.notices += c.notices
            ans.chunks += 1
            if ans.first_token_s is None and c.token_ids:
                ans.first_token_s = c.t
        ans.latency_s = time.perf_counter() - t0
        return ans


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="af3trt ask", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("prompt")
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
    args = ap.parse_args(argv)
    audio = [p.read_bytes() for p in args.audio]
    client = AF3Client(args.url, args.model)
    kw = dict(system_prompt=args.system, max_tokens=args.max_tokens, temperature=args.temperature,
              top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
              stream=args.stream, strip_prefix=args.strip_prefix or None)
    try:
        ans = Answer()
        for c in client.stream(args.prompt, audio, **kw):
            for n in c.notices:
                print(f"[notice] {n}", file=sys.stderr)
            sys.stdout.write(c.text)
            sys.stdout.flush()
            ans.token_ids += c.token_ids
            if ans.first_token_s is None and c.token_ids:
                ans.first_token_s = c.t
            ans.latency_s = c.t
        print()
        print(f"[{len(ans.token_ids)} tokens, first after {ans.first_token_s or 0:.3f} s, "
              f"done after {ans.latency_s:.3f} s]", file=sys.stderr)
    except AF3Error as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
