"""gRPC client for the AF3 ensemble, and the `af3trt ask` command.

    af3trt ask --audio clip.wav "What is said?" --stream --url 127.0.0.1:8001
    af3trt ask --audio a.wav --audio b.wav --messages conversation.json

A conversation file is the ensemble's `messages` input: a JSON list of {"role": "system" | "user" | "assistant",
"content": a string or parts [{"type": "text", "text": …}, {"type": "audio", "audio_index": k}]}, where k counts
the --audio files in order.

Audio files are read here, on the client, and sent as encoded bytes; the server never opens a path or URL.
The ensemble is decoupled, so every call goes through gRPC streaming: with stream=False the server sends the
whole answer in one response.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import queue
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Iterator, Sequence

import numpy as np

MODEL = "af3"
# The ensemble's cancellation side channel (triton_repo/cancel): Triton 2.51 does not pass the cancellation of an af3
# stream on to the decoder already generating for it, so a stream closed early is also cancelled here by its id.
CANCEL_MODEL = "cancel"
CANCEL_TIMEOUT_S = 5.0

log = logging.getLogger("af3trt.client")


class AF3Error(RuntimeError):
    """The server answered this request with an error."""


class AF3ConnectionError(AF3Error):
    """The request never reached a ready af3 model: nothing listens at the address, no answer in time, or the model
    is not loaded/ready. `cause` is one of "connection refused", "timeout", "model not ready", "unavailable"."""

    def __init__(self, url: str, cause: str, detail: str = ""):
        self.url, self.cause, self.detail = url, cause, detail
        super().__init__(f"tritonserver at {url}: {cause}" + (f" ({detail})" if detail else ""))


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

    def add(self, c: Chunk) -> None:
        self.text += c.text
        self.token_ids += c.token_ids
        self.notices += c.notices
        self.chunks += 1
        if self.first_token_s is None and c.token_ids:
            self.first_token_s = c.t


@dataclass
class Request:
    """One request to the af3 ensemble: the one-turn shorthand (prompt, system_prompt, audio placed before the
    prompt) or a conversation in `messages` (runtime/conversation.py: a list of {role, content} whose audio parts
    {"type": "audio", "audio_index": k} name clips of `audio` by position). Unset sampling values take the server's
    defaults (greedy)."""

    prompt: str | None = None
    audio: Sequence[bytes] = ()
    system_prompt: str | None = None
    messages: list[dict] | str | None = None  # a str is sent as it is (already JSON)
    max_tokens: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stream: bool = True
    strip_prefix: bool | None = None
    request_id: str | None = None
    deadline_s: float | None = None  # a deadline on the whole answer: past it, the server cancels the request

    def inputs(self) -> list:
        """The ensemble's request inputs (tritonclient.grpc.InferInput) for this request."""
        params = {k: getattr(self, k) for k in _PARAMS}
        ins = _inputs(self.prompt, list(self.audio), self.system_prompt, params)
        if self.messages is not None:
            data = self.messages if isinstance(self.messages, str) else json.dumps(self.messages, ensure_ascii=False)
            ins.append(_make("messages", np.array([data.encode()], np.object_), "BYTES"))
        return ins


_PARAMS = {"max_tokens": (np.int32, "INT32"), "temperature": (np.float32, "FP32"), "top_k": (np.int32, "INT32"),
           "top_p": (np.float32, "FP32"), "repetition_penalty": (np.float32, "FP32"), "seed": (np.uint64, "UINT64"),
           "stream": (np.bool_, "BOOL"), "strip_prefix": (np.bool_, "BOOL")}


def _make(name, array, dtype):
    import tritonclient.grpc as grpcclient

    t = grpcclient.InferInput(name, list(array.shape), dtype)
    t.set_data_from_numpy(array)
    return t


def _inputs(prompt: str | None, audio, system_prompt, params: dict):
    ins = [] if prompt is None else [_make("text_input", np.array([prompt.encode()], np.object_), "BYTES")]
    if system_prompt is not None:
        ins.append(_make("system_prompt", np.array([system_prompt.encode()], np.object_), "BYTES"))
    if audio:
        ins.append(_make("audio", np.array([bytes(a) for a in audio], np.object_), "BYTES"))
    for name, value in params.items():
        if value is not None:
            np_type, triton_type = _PARAMS[name]
            ins.append(_make(name, np.array([value], np_type), triton_type))
    return ins


def connection_error(url: str, model: str, error) -> AF3ConnectionError | None:
    """The AF3ConnectionError an error from tritonclient stands for, or None when the server answered the request
    itself (a bad request: keep its own message). gRPC statuses: UNAVAILABLE (nothing listening, connection lost),
    DEADLINE_EXCEEDED; Triton answers a request for a model that is not loaded or not ready with "Request for unknown
    model" / "is not ready"."""
    status, message = str(getattr(error, "status", lambda: "")() or ""), str(getattr(error, "message", lambda: error)())
    if "DEADLINE_EXCEEDED" in status:
        return AF3ConnectionError(url, "timeout", message)
    if "UNAVAILABLE" in status:
        cause = "connection refused" if "refused" in message.lower() else "unavailable"
        return AF3ConnectionError(url, cause, message)
    if "unknown model" in message or "is not ready" in message or "is not found" in message:
        return AF3ConnectionError(url, "model not ready", message)
    return None


def _error(url: str, model: str, error) -> AF3Error:
    """The AF3Error for an error from tritonclient: busy first (Triton's queue policy answers UNAVAILABLE too, like an
    unreachable server), then a connection problem, else the server's own message."""
    err = as_error(str(error))
    return err if isinstance(err, AF3Busy) else connection_error(url, model, error) or err


def _chunk(result, t0: float) -> Chunk | None:
    """The chunk a response carries (None for the empty final response)."""
    text = result.as_numpy("text_output")
    if text is None:
        return None
    notice = result.as_numpy("notice")
    notice = bytes(notice.reshape(-1)[0]).decode() if notice is not None else ""
    return Chunk(text=b"".join(bytes(x) for x in text.reshape(-1)).decode("utf-8", "replace"),
                 token_ids=result.as_numpy("output_ids").reshape(-1).tolist(),
                 notices=json.loads(notice) if notice else [], t=time.perf_counter() - t0)


def _receive(url: str, model: str, result, error, t0: float) -> tuple[Chunk | None, bool]:
    """(chunk or None, whether it was the request's last response) of one stream callback; raises its error."""
    if error is not None:
        raise _error(url, model, error)
    final = result.get_response().parameters.get("triton_final_response")
    return _chunk(result, t0), final is not None and final.bool_param


def _cancel_input(grpc_module, request_id: str):
    t = grpc_module.InferInput("request_id", [1], "BYTES")
    t.set_data_from_numpy(np.array([request_id.encode()], dtype=np.object_))
    return t


def _cancel_failed(request_id: str, model: str, error) -> None:
    text = str(error)
    if "unknown model" in text.lower() or "not found" in text.lower():  # a repository built before the cancel model
        log.info("request %s: the server has no %r model; its decoder stops at the deadline or max_tokens",
                 request_id, model)
    else:
        log.warning("request %s: sending the cancellation failed: %s", request_id, text)


def send_cancel(url: str, request_id: str, model: str = CANCEL_MODEL) -> bool:
    """Tell the server to stop generating for `request_id` (after its stream was closed); best effort: False, and
    logged, when it could not be delivered (an older repository without the cancel model, a server gone)."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    try:
        client.infer(model, [_cancel_input(grpcclient, request_id)], client_timeout=CANCEL_TIMEOUT_S)
        return True
    except Exception as e:  # noqa: BLE001 - best effort: the stream is already closed
        _cancel_failed(request_id, model, e)
        return False
    finally:
        client.close()


async def send_cancel_async(client, request_id: str, model: str = CANCEL_MODEL) -> bool:
    """send_cancel over an open `tritonclient.grpc.aio.InferenceServerClient`."""
    import tritonclient.grpc.aio as aioclient

    try:
        await client.infer(model, [_cancel_input(aioclient, request_id)], client_timeout=CANCEL_TIMEOUT_S)
        return True
    except Exception as e:  # noqa: BLE001 - best effort: the stream is already closed
        _cancel_failed(request_id, model, e)
        return False


class AF3Client:
    def __init__(self, url: str = "127.0.0.1:8001", model: str = MODEL, timeout: float = 600.0):
        self.url, self.model, self.timeout = url, model, timeout

    def stream(self, prompt: str | None = None, audio: Sequence[bytes] = (), **kw) -> Iterator[Chunk]:
        """Yield the answer's chunks as the server sends them (one chunk when stream=False). Keywords: the fields
        of Request (system_prompt, messages, max_tokens, …, stream, strip_prefix, request_id,
        deadline_s: a gRPC deadline on the whole answer; when it passes, the server cancels the request)."""
        return self.responses(Request(prompt, audio, **kw))

    def responses(self, req: Request) -> Iterator[Chunk]:
        """Yield the chunks of one request as they arrive. Closing the iterator early (break, .close(), garbage
        collection) closes the gRPC stream with cancel_requests=True and sends the request id to the server's
        cancel model (send_cancel): the decoder stops generating for it. Raises
        AF3ConnectionError when the server cannot be reached or the model is not ready, AF3Error for a request the
        server refused (the server's message)."""
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        inputs = req.inputs()
        request_id = req.request_id or uuid.uuid4().hex
        results: queue.Queue = queue.Queue()
        client = grpcclient.InferenceServerClient(self.url)
        t0 = time.perf_counter()
        client.start_stream(callback=lambda result, error: results.put((result, error)), stream_timeout=req.deadline_s)
        running = False  # sent, and neither its last response nor an error came back
        try:
            try:
                client.async_stream_infer(self.model, inputs, request_id=request_id,
                                          enable_empty_final_response=True,
                                          timeout=None if req.deadline_s is None else int(req.deadline_s * 1e6))
            except InferenceServerException as e:  # the stream broke at once: its callback holds the cause
                try:
                    _, error = results.get(timeout=5)
                except queue.Empty:
                    error = e
                raise _error(self.url, self.model, error) from None
            running = True
            while True:
                try:
                    result, error = results.get(timeout=self.timeout)
                except queue.Empty:
                    raise AF3ConnectionError(self.url, "timeout", f"no response within {self.timeout:g} s") from None
                running = error is None
                chunk, final = _receive(self.url, self.model, result, error, t0)
                if final:
                    running = False
                if chunk is not None:
                    yield chunk
                if final:
                    return
        finally:
            client.stop_stream(cancel_requests=True)
            client.close()
            if running:  # closed early: the af3 ensemble does not pass the stream's cancellation to the decoder
                send_cancel(self.url, request_id)

    def ask(self, prompt: str | None = None, audio: Sequence[bytes] = (), **kw) -> Answer:
        """The whole answer, with its first-chunk time and latency (keywords as for stream)."""
        return self.complete(Request(prompt, audio, **kw))

    def complete(self, req: Request) -> Answer:
        """The whole answer of one request, with its first-chunk time and latency."""
        ans = Answer()
        t0 = time.perf_counter()
        for c in self.responses(req):
            ans.add(c)
        ans.latency_s = time.perf_counter() - t0
        return ans


class AsyncAF3Client:
    """The same requests from asyncio code (an HTTP front end): `async for chunk in client.responses(req)`.

    Leaving the loop early (break, `aclose()`, the task cancelled when an HTTP client disconnects) cancels the gRPC
    call and sends the request id to the cancel model (send_cancel_async): the decoder stops generating. Errors
    as AF3Client's: AF3ConnectionError, AF3Error.
    """

    def __init__(self, url: str = "127.0.0.1:8001", model: str = MODEL, timeout: float = 600.0):
        self.url, self.model, self.timeout = url, model, timeout

    async def responses(self, req: Request) -> AsyncIterator[Chunk]:
        import grpc
        import tritonclient.grpc.aio as aioclient
        from tritonclient.utils import InferenceServerException

        request_id = req.request_id or uuid.uuid4().hex
        request = {"model_name": self.model, "inputs": req.inputs(), "request_id": request_id,
                   "parameters": {"triton_enable_empty_final_response": True}}

        async def one_request():
            yield request

        client = aioclient.InferenceServerClient(self.url)
        t0 = time.perf_counter()
        stream = client.stream_infer(one_request())
        running = True  # until its last response or an error came back
        try:
            while True:
                try:
                    result, error = await asyncio.wait_for(stream.__anext__(), self.timeout)
                except asyncio.TimeoutError:
                    raise AF3ConnectionError(self.url, "timeout", f"no response within {self.timeout:g} s") from None
                except grpc.RpcError as e:
                    result, error = None, InferenceServerException(msg=e.details(), status=str(e.code()))
                except StopAsyncIteration:
                    raise AF3ConnectionError(self.url, "unavailable", "the stream ended before the last response") \
                        from None
                running = error is None
                chunk, final = _receive(self.url, self.model, result, error, t0)
                if final:
                    running = False
                if chunk is not None:
                    yield chunk
                if final:
                    return
        finally:
            stream.cancel()
            try:
                if running:  # left early: the af3 ensemble does not pass the call's cancellation to the decoder
                    await send_cancel_async(client, request_id)
            finally:
                await client.close()

    async def complete(self, req: Request) -> Answer:
        """The whole answer of one request, with its first-chunk time and latency."""
        ans = Answer()
        t0 = time.perf_counter()
        async for c in self.responses(req):
            ans.add(c)
        ans.latency_s = time.perf_counter() - t0
        return ans


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
    args = ap.parse_args(argv)
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
              stream=args.stream, strip_prefix=args.strip_prefix or None)
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


if __name__ == "__main__":
    main()
