"""gRPC client library for the AF3 ensemble (the `af3trt ask` command is runtime/client/ask.py).

    with AF3Client("127.0.0.1:8001") as client:
        print(client.ask("What is said?", [open("clip.wav", "rb").read()]).text)

Audio files are read here, on the client, and sent as encoded bytes; the server never opens a path or URL.
The ensemble is decoupled, so every call goes through gRPC streaming: with stream=False the server sends the
whole answer in one response. The request's inputs are built from the ensemble's contract (runtime/stages/contract.py),
and every way of receiving (AF3Client, AF3Stream, AsyncAF3Client, the OpenAI front) reads responses with one
ResponseReader.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import threading
import time
import uuid
import weakref
from dataclasses import dataclass, field
from typing import AsyncIterator, Iterator, Sequence

import numpy as np

from af3trt.runtime.stages import contract, errors
from af3trt.runtime.stages.errors import ErrorCode

MODEL = contract.ENSEMBLE
# The ensemble's cancellation side channel (triton_repo/cancel): Triton 2.51 does not pass the cancellation of an af3
# stream on to the decoder already generating for it, so a stream closed early is also cancelled here by its id.
CANCEL_MODEL = contract.CANCEL
# After a request's last response the client waits this long at most for its stream's status (it comes within a
# round trip) instead of cancelling the stream: see AF3Client.responses
STATUS_WAIT_S = 5.0
CANCEL_TIMEOUT_S = 5.0

log = logging.getLogger("af3trt.client")


class AF3Error(RuntimeError):
    """The server answered this request with an error: `code` (runtime/stages/errors.py) is what kind, the message is the
    stage's own (without Triton's prefixes)."""

    code = ErrorCode.INTERNAL

    def __init__(self, message: str, code: ErrorCode | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code


class AF3ConnectionError(AF3Error):
    """The request never reached a ready af3 model: nothing listens at the address, no answer in time, or the model
    is not loaded/ready, or the connection was lost under the call. `cause` is one of "connection refused", "timeout",
    "model not ready", "unavailable", "connection lost"."""

    code = ErrorCode.UNAVAILABLE

    def __init__(self, url: str, cause: str, detail: str = ""):
        self.url, self.cause, self.detail = url, cause, detail
        super().__init__(f"tritonserver at {url}: {cause}" + (f" ({detail})" if detail else ""))


class AF3Busy(AF3Error):
    """The server is past capacity (UNAVAILABLE): a queue was full or the request waited too long. Retry later."""

    code = ErrorCode.UNAVAILABLE


# How "past capacity" reads in an error Triton raised itself (its queue policy), which carries no code of ours (a
# gRPC stream carries the message, not the status code); our stages tag theirs (runtime/stages/errors.py).
BUSY_MARKERS = ("Exceeds maximum queue size", "Request timeout expired")


def as_error(message: str) -> AF3Error:
    """The AF3Error of a Triton error message: the code a stage tagged it with, else busy by Triton's words, else
    internal."""
    code, text = errors.parse(message)
    if code is None and any(m in text for m in BUSY_MARKERS):
        return AF3Busy(f"server busy: {text}")
    return AF3Busy(text) if code is ErrorCode.UNAVAILABLE else AF3Error(text, code)


@dataclass
class Chunk:
    text: str
    token_ids: list[int]
    notices: list[str]
    t: float  # seconds since the request was sent
    prompt_tokens: int = -1  # the prompt's length as fusion built it (text + audio rows); -1 when not reported


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
    prompt) or a conversation in `messages` (runtime/stages/conversation.py: a list of {role, content} whose audio parts
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
    thinking: bool | None = None  # AF3's thinking mode (docs/thinking.md); None: the server's default (off)
    min_tokens: int | None = None  # the end id is not chosen before this many tokens
    ignore_eos: bool | None = None  # True: exactly max_tokens tokens (end and stop ids do not end the answer)
    # structured output (docs/structured-output.md): json | json_schema | regex | choice | grammar, and its text
    guide_type: str | None = None
    guide: str | None = None
    request_id: str | None = None
    deadline_s: float | None = None  # a deadline on the whole answer: past it, the server cancels the request

    def values(self) -> dict[str, list]:
        """The inputs this request sets, by ensemble input name: each a list of elements (BYTES as bytes), in
        the contract's order. Unset fields (None, no audio) are left out: the server applies its defaults."""
        out = {}
        for spec in contract.REQUEST_INPUTS:
            value = getattr(self, _FIELD_OF.get(spec.name, spec.name))
            if spec.name == "messages" and value is not None and not isinstance(value, str):
                value = json.dumps(value, ensure_ascii=False)
            elements = list(value) if spec.dims == (-1,) else [] if value is None else [value]
            if elements:
                out[spec.name] = [_encode(e) for e in elements] if spec.datatype == "BYTES" else elements
        return out

    def inputs(self) -> list:
        """The ensemble's request inputs (tritonclient.grpc.InferInput) for this request."""
        return [make_input(contract.request_input(name), elements) for name, elements in self.values().items()]


# Request fields named otherwise than the ensemble input they fill; every other input is the field of its name.
_FIELD_OF = {"text_input": "prompt"}


def _encode(element) -> bytes:
    return element.encode() if isinstance(element, str) else bytes(element)


def make_input(spec: contract.TensorSpec, elements: list):
    """One tritonclient.grpc.InferInput of shape [len(elements)], typed as the contract says."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import triton_to_np_dtype

    array = np.array(elements, dtype=triton_to_np_dtype(spec.datatype))
    t = grpcclient.InferInput(spec.name, list(array.shape), spec.datatype)
    t.set_data_from_numpy(array)
    return t


# How a call that lost its connection reads, the server having answered nothing: grpc.aio fails an operation in its own
# core with INTERNAL "Internal error from Core" (grpc/grpc src/python/grpcio/grpc/_cython/_cygrpc/aio/call.pyx.pxi
# _AioCall.set_internal_error), and grpc's HTTP/2 transport reports a stream the peer reset as "Received RST_STREAM
# with error code <n>" with the status of that code (2: INTERNAL, 8: CANCELLED; src/core/ext/transport/chttp2/
# transport/frame_rst_stream.cc). Both seen here when a replica behind HAProxy was SIGKILLed under open streams.
AIO_LOCAL_FAILURE = "Internal error from Core"
STREAM_RESET = "Received RST_STREAM"


def lost_in_transport(status: str, message: str) -> bool:
    """Whether a gRPC status (its name, e.g. "INTERNAL" or "StatusCode.INTERNAL") and message say the connection was
    lost under the call rather than answered."""
    return ("INTERNAL" in status and message.strip() == AIO_LOCAL_FAILURE) or STREAM_RESET in message


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
    if lost_in_transport(status, message):
        return AF3ConnectionError(url, "connection lost", message)
    if "unknown model" in message or "is not ready" in message or "is not found" in message:
        return AF3ConnectionError(url, "model not ready", message)
    return None


def _error(url: str, model: str, error) -> AF3Error:
    """The AF3Error for an error from tritonclient: busy first (Triton's queue policy answers UNAVAILABLE too, like an
    unreachable server), then a connection problem, else the server's own message."""
    message = error.message() if hasattr(error, "message") else None
    err = as_error(str(error) if message is None else str(message))
    return err if isinstance(err, AF3Busy) else connection_error(url, model, error) or err


def _never_connected(error) -> bool:
    """Whether a stream's first error says no connection was made (gRPC UNAVAILABLE, "failed to connect"): the
    request never left the client."""
    if error is None:
        return False
    status, message = str(getattr(error, "status", lambda: "")() or ""), str(getattr(error, "message", lambda: error)())
    return "UNAVAILABLE" in status and "failed to connect" in message.lower()


def _chunk(result, t0: float) -> Chunk | None:
    """The chunk a response carries (None for the empty final response)."""
    text = result.as_numpy("text_output")
    if text is None:
        return None
    notice = result.as_numpy("notice")
    notice = bytes(notice.reshape(-1)[0]).decode() if notice is not None else ""
    prompt = result.as_numpy("prompt_tokens")
    return Chunk(text=b"".join(bytes(x) for x in text.reshape(-1)).decode("utf-8", "replace"),
                 token_ids=result.as_numpy("output_ids").reshape(-1).tolist(),
                 notices=json.loads(notice) if notice else [], t=time.perf_counter() - t0,
                 prompt_tokens=int(prompt.reshape(-1)[0]) if prompt is not None else -1)


@dataclass
class ResponseReader:
    """Reads the responses of one request, however they arrive (a stream callback's queue, an asyncio stream):
    each response's chunk, an error as AF3Error, and whether the request is still running in the server.

        reader = ResponseReader(url, model, running=True)  # once the request is sent
        while not reader.final:
            chunk = reader.read(*next_response())  # (result, error) of one response
    """

    url: str
    model: str
    running: bool = False  # sent, and neither its last response nor an error came back
    final: bool = False  # its last response came back
    t0: float = field(default_factory=time.perf_counter)  # chunk times count from here

    def read(self, result, error) -> Chunk | None:
        """The chunk of one response (None for the empty final one); raises the request's error."""
        if error is not None:
            self.running = False  # an error ends the request in the server
            raise _error(self.url, self.model, error)
        final = result.get_response().parameters.get("triton_final_response")
        self.final = final is not None and final.bool_param
        self.running = not self.final
        return _chunk(result, self.t0)


def _cancel_failed(request_id: str, model: str, error) -> None:
    text = str(error)
    if "unknown model" in text.lower() or "not found" in text.lower():  # a repository built before the cancel model
        log.info("request %s: the server has no %r model; its decoder stops at the deadline or max_tokens",
                 request_id, model)
    else:
        log.warning("request %s: sending the cancellation failed: %s", request_id, text)


def connectivity(channel):
    """A grpc channel's connectivity state now (grpc.ChannelConnectivity), read without channel.subscribe(): a
    subscription starts a polling thread per channel that holds its callback, and so the client, for as long as the
    channel is open (seen: each AF3Client created and dropped without close() left one thread behind, 300 clients →
    301 threads). Read through grpcio's own channel object (grpc/_channel.py Channel._channel
    .check_connectivity_state, what subscribe()'s polling thread calls; grpcio 1.7x)."""
    from grpc._common import CYGRPC_CONNECTIVITY_STATE_TO_CHANNEL_CONNECTIVITY as STATES

    return STATES[channel._channel.check_connectivity_state(False)]


def send_cancel(url: str, request_id: str, model: str = CANCEL_MODEL) -> bool:
    """Tell the server to stop generating for `request_id` (after its stream was closed); best effort: False, and
    logged, when it could not be delivered (an older repository without the cancel model, a server gone)."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    try:
        client.infer(model, [make_input(contract.CANCEL_INPUT, [request_id.encode()])],
                     client_timeout=CANCEL_TIMEOUT_S)
        return True
    except Exception as e:  # noqa: BLE001 - best effort: the stream is already closed
        _cancel_failed(request_id, model, e)
        return False
    finally:
        client.close()


def send_cancel_over(stub, url: str, request_id: str, model: str = CANCEL_MODEL) -> bool:
    """send_cancel over an open channel's GRPCInferenceServiceStub (AF3Client's connection)."""
    from tritonclient.grpc._utils import _get_inference_request

    request = _get_inference_request(
        model_name=model, inputs=[make_input(contract.CANCEL_INPUT, [request_id.encode()])], model_version="",
        request_id="", outputs=None, sequence_id=0, sequence_start=False, sequence_end=False, priority=0,
        timeout=None, parameters=None)
    try:
        stub.ModelInfer(request, timeout=CANCEL_TIMEOUT_S)
        return True
    except Exception as e:  # noqa: BLE001 - best effort: the stream is already closed
        _cancel_failed(request_id, model, getattr(e, "details", lambda: e)())
        return False


async def send_cancel_async(client, request_id: str, model: str = CANCEL_MODEL) -> bool:
    """send_cancel over an open `tritonclient.grpc.aio.InferenceServerClient`."""
    try:
        await client.infer(model, [make_input(contract.CANCEL_INPUT, [request_id.encode()])],
                           client_timeout=CANCEL_TIMEOUT_S)
        return True
    except Exception as e:  # noqa: BLE001 - best effort: the stream is already closed
        _cancel_failed(request_id, model, e)
        return False


class AF3Stream:
    """One gRPC connection with one open stream, requests sent on it one at a time: no connection set-up per
    request (what the serving stack costs alone, e.g. perf's per-request overhead probe). AF3Client instead
    runs concurrent requests as streams of one connection.

        with AF3Stream(url) as s:
            for chunk in s.responses(Request("What is said?", [clip])): ...

    Leaving a request's responses early (break, .close()) stops the stream with cancel_requests=True, sends the
    request id to the cancel model (send_cancel), and the next request opens a new stream. `stream_timeout`: a
    gRPC deadline on the stream (AF3Client sets the request's deadline_s).
    """

    def __init__(self, url: str = "127.0.0.1:8001", model: str = MODEL, timeout: float = 600.0,
                 stream_timeout: float | None = None):
        import tritonclient.grpc as grpcclient

        self.url, self.model, self.timeout, self.stream_timeout = url, model, timeout, stream_timeout
        self.client = grpcclient.InferenceServerClient(url)
        self._results: queue.Queue | None = None  # (result, error) of each response; None: no stream open

    def _open(self) -> queue.Queue:
        if self._results is None:
            results: queue.Queue = queue.Queue()
            self.client.start_stream(callback=lambda result, error: results.put((result, error)),
                                     stream_timeout=self.stream_timeout)
            self._results = results
        return self._results

    def _stop(self) -> None:
        if self._results is not None:
            self._results = None
            self.client.stop_stream(cancel_requests=True)

    def responses(self, req: Request) -> Iterator[Chunk]:
        """Yield the chunks of one request as they arrive. Raises AF3ConnectionError when the server cannot be
        reached, does not answer within `timeout` or the model is not ready, AF3Error for a request the server
        refused (the server's message)."""
        from tritonclient.utils import InferenceServerException

        request_id = req.request_id or uuid.uuid4().hex
        inputs = req.inputs()
        reader = ResponseReader(self.url, self.model)
        results = self._open()
        try:
            try:
                self.client.async_stream_infer(self.model, inputs, request_id=request_id,
                                               enable_empty_final_response=True,
                                               timeout=None if req.deadline_s is None else int(req.deadline_s * 1e6))
            except InferenceServerException as e:  # the stream broke at once: its callback holds the cause
                try:
                    _, error = results.get(timeout=5)
                except queue.Empty:
                    error = e
                self._stop()
                raise _error(self.url, self.model, error) from None
            reader.running = True
            while not reader.final:
                try:
                    result, error = results.get(timeout=self.timeout)
                except queue.Empty:
                    raise AF3ConnectionError(self.url, "timeout", f"no response within {self.timeout:g} s") from None
                if result is not None and result.get_response().id != request_id:
                    continue  # a late response of an earlier request on this stream
                chunk = reader.read(result, error)
                if chunk is not None:
                    yield chunk
        finally:
            if reader.running:  # closed early: the af3 ensemble does not pass the stream's cancellation on
                self._stop()
                send_cancel(self.url, request_id)

    def close(self) -> None:
        self._stop()
        self.client.close()

    def __enter__(self) -> "AF3Stream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AF3Client:
    """Requests to the af3 ensemble from any number of threads over ONE gRPC channel (one HTTP/2 connection, shared
    with the process's other AF3Clients of the same url), opened at the first request and kept until close(): each
    request is a stream of its own on it. A connection per request
    costs the server: tritonserver 2.51 keeps tens of KB for every client connection it ever accepted (docs/memory.md).

        with AF3Client("127.0.0.1:8001") as client:
            client.ask("What is said?", [clip])
    """

    def __init__(self, url: str = "127.0.0.1:8001", model: str = MODEL, timeout: float = 600.0,
                 private_connection: bool = False):
        self.url, self.model, self.timeout = url, model, timeout
        # gRPC shares one connection between the channels of a process with the same target and options (its
        # global subchannel pool), so AF3Client objects of one process share theirs; private_connection=True gives
        # this client one of its own (`af3trt soak --client per-connection` opens one per request with it).
        self.private_connection = private_connection
        self._stub = None  # GRPCInferenceServiceStub over self._channel, made at the first request
        self._channel = None
        self._release = None  # weakref.finalize closing self._channel: when close() is called or the client is freed
        self._fresh = False  # after a failed connection: channels of our own (not gRPC's shared subchannel)
        self._lock = threading.Lock()

    def _service(self):
        import grpc

        with self._lock:
            if self._stub is not None and connectivity(self._channel) is grpc.ChannelConnectivity.TRANSIENT_FAILURE:
                # the connection failed (the server restarted or went away) and gRPC is waiting out its reconnect
                # backoff, during which every call fails at once with "connection refused" even after the server
                # is back: start over with a connection of our own instead of waiting for the shared one's backoff
                self._drop_channel()
                self._fresh = True
            if self._stub is None:
                from tritonclient.grpc import MAX_GRPC_MESSAGE_SIZE, service_pb2_grpc

                channel = grpc.insecure_channel(self.url, options=[
                    ("grpc.max_send_message_length", MAX_GRPC_MESSAGE_SIZE),
                    ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_SIZE),
                    ("grpc.use_local_subchannel_pool", int(self.private_connection or self._fresh))])
                self._channel = channel
                self._stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
                # A client that goes out of scope without close() releases its connection when it is freed: the
                # finalizer holds the channel, never the client
                self._release = weakref.finalize(self, channel.close)
            return self._stub

    def _drop_channel(self) -> None:
        if self._release is not None:
            self._release()  # closes the channel (once)
        self._channel = self._stub = self._release = None

    def close(self) -> None:
        """Close the connection (requests still running fail); the next request opens a new one."""
        with self._lock:
            self._drop_channel()

    def __enter__(self) -> "AF3Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def stream(self, prompt: str | None = None, audio: Sequence[bytes] = (), **kw) -> Iterator[Chunk]:
        """Yield the answer's chunks as the server sends them (one chunk when stream=False). Keywords: the fields
        of Request (system_prompt, messages, max_tokens, …, stream, strip_prefix, request_id,
        deadline_s: a gRPC deadline on the whole answer; when it passes, the server cancels the request)."""
        return self.responses(Request(prompt, audio, **kw))

    def responses(self, req: Request) -> Iterator[Chunk]:
        """Yield the chunks of one request as they arrive, on a stream of its own over the client's connection.
        Closing the iterator early (break, .close(), garbage collection) cancels that stream only and sends the
        request id to the server's cancel model (send_cancel): the decoder stops generating for it. Raises
        AF3ConnectionError when the server cannot be reached or the model is not ready, AF3Error for a request the
        server refused (the server's message)."""
        import grpc
        from tritonclient.grpc import InferResult
        from tritonclient.grpc._utils import _get_inference_request  # what tritonclient's own streams send
        from tritonclient.utils import InferenceServerException

        request_id = req.request_id or uuid.uuid4().hex
        request = _get_inference_request(
            model_name=self.model, inputs=req.inputs(), model_version="", request_id=request_id, outputs=None,
            sequence_id=0, sequence_start=False, sequence_end=False, priority=0,
            timeout=None if req.deadline_s is None else int(req.deadline_s * 1e6),
            parameters={"triton_enable_empty_final_response": True})
        done = threading.Event()

        def requests():
            yield request
            done.wait()  # our half of the stream stays open until the last response, as the OpenAI front's does

        def open_call(stub):
            call = stub.ModelStreamInfer(requests(), timeout=req.deadline_s)
            results: queue.Queue = queue.Queue()

            def receive():  # the call's responses as (result, error), in a thread: `timeout` bounds each wait below
                try:
                    for r in call:
                        results.put((None, InferenceServerException(msg=r.error_message)) if r.error_message
                                    else (InferResult(r.infer_response), None))
                except grpc.RpcError as e:
                    results.put((None, InferenceServerException(msg=e.details(), status=str(e.code()))))
                results.put(None)

            threading.Thread(target=receive, name=f"af3-{request_id[:8]}", daemon=True).start()
            return call, results

        def open_on_a_live_channel():
            # another thread may close the channel between our _service() and the call (it replaced a failed
            # connection): the call then raises ValueError before anything is sent, so it goes on the new channel
            for _ in range(3):
                stub = self._service()
                try:
                    return (stub, *open_call(stub))
                except ValueError as e:  # grpcio: "Cannot invoke RPC: Channel closed!"
                    error = e
            raise AF3ConnectionError(self.url, "unavailable", f"the connection kept closing: {error}")

        stub, call, results = open_on_a_live_channel()
        resent = got = False  # got: a response arrived on this request's stream
        reader = ResponseReader(self.url, self.model, running=True)
        try:
            while not reader.final:
                try:
                    item = results.get(timeout=self.timeout)
                except queue.Empty:
                    raise AF3ConnectionError(self.url, "timeout", f"no response within {self.timeout:g} s") from None
                if item is None:
                    raise AF3ConnectionError(self.url, "unavailable", "the stream ended before the last response")
                if not resent and not got and _never_connected(item[1]):
                    # a connection made before (shared, or ours) that the server dropped, still in gRPC's reconnect
                    # backoff: the request never reached the server, so it goes once more on a new connection of
                    # our own (a server that is really down refuses that one too, and the error is raised)
                    resent = True
                    with self._lock:
                        if self._stub is stub:  # not a new one another thread already made
                            self._drop_channel()
                        self._fresh = True
                    stub, call, results = open_on_a_live_channel()
                    continue
                chunk = reader.read(*item)
                got = True
                if chunk is not None:
                    yield chunk
        finally:
            done.set()  # half-closes our side: the server answers with the stream's status
            if reader.running:  # closed early: the af3 ensemble does not pass the stream's cancellation on
                call.cancel()
                send_cancel_over(stub, self.url, request_id)
            else:
                # Wait for that status (a loopback round trip) before the request is over, so that closing the
                # connection right after it never cancels a finished stream: tritonserver 2.51 keeps memory for
                # every decoupled stream cancelled after its last response (4-22 KB with the connection, docs/memory.md)
                try:
                    while results.get(timeout=min(self.timeout, STATUS_WAIT_S)) is not None:
                        pass
                except queue.Empty:
                    pass

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


async def drain(stream) -> None:
    """Read an async stream to its end (the server's status)."""
    async for _ in stream:
        pass


class AsyncAF3Client:
    """The same requests from asyncio code (an HTTP front end): `async for chunk in client.responses(req)`.

    Leaving the loop early (break, `aclose()`, the task cancelled when an HTTP client disconnects) cancels the gRPC
    call and sends the request id to the cancel model (send_cancel_async): the decoder stops generating. Errors
    as AF3Client's: AF3ConnectionError, AF3Error.
    """

    def __init__(self, url: str = "127.0.0.1:8001", model: str = MODEL, timeout: float = 600.0):
        self.url, self.model, self.timeout = url, model, timeout
        self._clients: dict = {}  # {event loop: tritonclient.grpc.aio.InferenceServerClient}: one channel per loop

    def _client(self):
        """This event loop's client (an aio channel is bound to the loop that made it): one connection, a stream
        per request."""
        import tritonclient.grpc.aio as aioclient

        loop = asyncio.get_running_loop()
        for other in [lp for lp in self._clients if lp.is_closed()]:
            del self._clients[other]  # its loop is gone, and its channel with it
        if loop not in self._clients:
            self._clients[loop] = aioclient.InferenceServerClient(self.url)
        return self._clients[loop]

    async def close(self) -> None:
        """Close this event loop's connection."""
        client = self._clients.pop(asyncio.get_running_loop(), None)
        if client is not None:
            await client.close()

    async def responses(self, req: Request) -> AsyncIterator[Chunk]:
        import grpc
        from tritonclient.utils import InferenceServerException

        request_id = req.request_id or uuid.uuid4().hex
        request = {"model_name": self.model, "inputs": req.inputs(), "request_id": request_id,
                   "parameters": {"triton_enable_empty_final_response": True}}

        async def one_request():
            yield request

        client = self._client()
        reader = ResponseReader(self.url, self.model, running=True)  # sent as the stream starts
        stream = client.stream_infer(one_request())
        try:
            while not reader.final:
                try:
                    result, error = await asyncio.wait_for(stream.__anext__(), self.timeout)
                except asyncio.TimeoutError:
                    raise AF3ConnectionError(self.url, "timeout", f"no response within {self.timeout:g} s") from None
                except grpc.RpcError as e:
                    result, error = None, InferenceServerException(msg=e.details(), status=str(e.code()))
                except StopAsyncIteration:
                    raise AF3ConnectionError(self.url, "unavailable", "the stream ended before the last response") \
                        from None
                chunk = reader.read(result, error)
                if chunk is not None:
                    yield chunk
        finally:
            if reader.running:  # left early: cancel this request's stream only (the connection stays for the next);
                stream.cancel()  # the af3 ensemble does not pass the call's cancellation on
                await send_cancel_async(client, request_id)
            else:  # done: let the stream end with the server's status rather than cancel it (see AF3Client.responses)
                try:
                    await asyncio.wait_for(drain(stream), min(self.timeout, STATUS_WAIT_S))
                except (asyncio.TimeoutError, grpc.RpcError):
                    stream.cancel()

    async def complete(self, req: Request) -> Answer:
        """The whole answer of one request, with its first-chunk time and latency."""
        ans = Answer()
        t0 = time.perf_counter()
        async for c in self.responses(req):
            ans.add(c)
        ans.latency_s = time.perf_counter() - t0
        return ans
