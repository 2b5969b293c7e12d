"""What every endpoint of the OpenAI front shares: the error body, the settings, the model check, and the one
answer loop, run whole (collect) or streamed as server-sent events (stream).

An endpoint builds the ensemble's request, starts `Triton.generate`, and hands the pieces to `collect` (the whole
answer, cancelled when the HTTP client goes away) or `stream` (the first response awaited before answering, so that
errors the ensemble finds in the request get their HTTP status; later errors travel as an event).
"""

from __future__ import annotations

import asyncio
import io
import json
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

import soundfile as sf
from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from af3trt.runtime.stages.contract import ENSEMBLE
from af3trt.runtime.stages.errors import ErrorCode


class APIError(Exception):
    """An HTTP error answered with OpenAI's error body {"error": {"message", "type", "param", "code"}}."""

    TYPES = {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error",
             **{c.value.http: c.value.openai for c in ErrorCode}}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    @classmethod
    def of(cls, error: ErrorCode, message: str, **kw) -> "APIError":
        """The error for a typed code (runtime/stages/errors.py): its HTTP status and OpenAI type."""
        return cls(error.value.http, message, **kw)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    """OpenAI's error body, as every error of this API is answered (documented in the OpenAPI schema)."""

    error: ErrorDetail


# The statuses an endpoint may answer besides 200, in the OpenAPI schema (/openapi.json): the only 5xx is 503.
ERROR_RESPONSES = {status: {"model": ErrorBody, "description": kind} for status, kind in (
    (400, "a request the client can fix"), (401, "missing or wrong API key"), (404, "unknown model"),
    (413, "body over --max-upload-bytes"), (503, "Triton unreachable or the ensemble not ready"))}


@dataclass(frozen=True)
class RealtimeOptions:
    """WS /v1/realtime (runtime/openai/realtime.py): sessions held at once, how long one may idle and last, how fast
    its audio may arrive (times real time, after an allowance), and whether complete windows are encoded ahead."""

    max_sessions: int = 16
    idle_timeout_s: float = 300.0
    max_session_s: float = 3600.0
    max_speed: float = 2.0
    burst_s: float = 30.0
    encode_ahead: bool = True

    FLAGS = (("max_sessions", "--realtime-max-sessions", "WebSocket sessions held at once (more are refused)"),
             ("idle_timeout_s", "--realtime-idle-timeout", "seconds a session may send nothing before it is closed"),
             ("max_session_s", "--realtime-max-session-seconds", "the longest a session lasts"),
             ("max_speed", "--realtime-max-speed", "audio may arrive at most this many times faster than real time "
                                                   "(0: no limit)"),
             ("burst_s", "--realtime-burst-seconds", "seconds of audio a session may send before the speed limit"))

    @classmethod
    def add_arguments(cls, ap) -> None:
        for name, flag, help_ in cls.FLAGS:
            ap.add_argument(flag, dest="realtime_" + name, type=type(getattr(cls, name)), default=getattr(cls, name),
                            help=help_)
        ap.add_argument("--no-realtime-encode-ahead", dest="realtime_encode_ahead", action="store_false",
                        help="encode a live session's audio only when a turn is committed (for comparison)")

    @classmethod
    def from_args(cls, args) -> "RealtimeOptions":
        return cls(**{name: getattr(args, "realtime_" + name) for name, _, _ in cls.FLAGS},
                   encode_ahead=args.realtime_encode_ahead)

    def command(self) -> list[str]:
        """These options as `af3trt openai` flags."""
        out = [x for name, flag, _ in self.FLAGS for x in (flag, str(getattr(self, name)))]
        return out + ([] if self.encode_ahead else ["--no-realtime-encode-ahead"])


@dataclass
class Settings:
    triton_url: str = "127.0.0.1:8001"
    model: str = ENSEMBLE  # the Triton ensemble
    served_model_name: str | None = None  # the id clients see (default: the ensemble's name)
    api_key: str | None = None
    max_upload_bytes: int = 64 * 2**20
    # long-form transcription (chunking_strategy): the longest audio accepted, and pieces in flight per request
    max_transcription_seconds: float = 4 * 3600.0
    transcription_concurrency: int = 4
    realtime: RealtimeOptions = field(default_factory=RealtimeOptions)

    @property
    def model_id(self) -> str:
        return self.served_model_name or self.model


@dataclass
class Piece:
    """One ensemble response: this chunk's text and ids, notices, and the prompt length (fusion's count)."""

    text: str
    ids: list[int]
    notices: list[str]
    prompt_tokens: int


def settings(request: Request) -> Settings:
    return request.app.state.settings


def check_model(request: Request, model: str | None) -> None:
    served = settings(request).model_id
    if model is not None and model != served:
        raise APIError(404, f"model {model!r} does not exist; this server serves {served!r}", param="model",
                       code="model_not_found")


def check_audio(data: bytes, where: str, max_seconds: float) -> None:
    """Refuse empty and over-long clips here; the ensemble would truncate the latter (as AF3's processor does)."""
    if not data:
        raise APIError(400, f"{where}: the audio is empty")
    try:
        info = sf.info(io.BytesIO(data))
    except (sf.SoundFileError, RuntimeError, ValueError):
        return  # undecodable audio: the ensemble's decoder gives the precise error (400)
    if info.duration > max_seconds:
        raise APIError(400, f"{where}: the audio is {info.duration:.1f} s long; this server reads at most "
                            f"{max_seconds:g} s", code="audio_too_long")


class StopScanner:
    """Applies OpenAI's `stop`: text up to (not including) the first stop string, released as soon as it cannot
    be the start of one."""

    def __init__(self, stops: list[str]):
        self.stops, self.held, self.stopped = stops, "", False
        self.keep = max((len(s) for s in stops), default=1) - 1

    def feed(self, text: str) -> str:
        if not self.stops:
            return text
        self.held += text
        hits = [i for i in (self.held.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.held, self.stopped = self.held[: min(hits)], "", True
            return out
        cut = max(0, len(self.held) - self.keep)
        out, self.held = self.held[:cut], self.held[cut:]
        return out

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


@dataclass
class Answer:
    """What an answer loop has seen so far: the text released, the token count, the prompt length (-1 until a
    response reports it), and whether a stop string ended it."""

    text: str = ""
    n_ids: int = 0
    prompt_tokens: int = -1
    stopped: bool = False


async def deltas(pieces: AsyncIterator[Piece], answer: Answer, stops: list[str] = ()) -> AsyncIterator[str]:
    """The answer loop: each piece's text as it may be released (up to the first stop string), recorded in answer.
    Closes `pieces` however it ends (leaving early cancels the request in Triton)."""
    scan = StopScanner(list(stops))
    try:
        async for piece in pieces:
            answer.n_ids += len(piece.ids)
            answer.prompt_tokens = piece.prompt_tokens if piece.prompt_tokens >= 0 else answer.prompt_tokens
            text = scan.feed(piece.text)
            if text:
                answer.text += text
                yield text
            if scan.stopped:
                answer.stopped = True
                return
        tail = scan.flush()
        if tail:
            answer.text += tail
            yield tail
    finally:
        await pieces.aclose()


async def watch_disconnect(request: Request, task: asyncio.Task) -> None:
    while not task.done():
        if await request.is_disconnected():
            task.cancel()
            return
        await asyncio.sleep(0.1)


async def collect(request: Request, pieces: AsyncIterator[Piece], stops: list[str] = ()) -> Answer:
    """The whole answer; cancelled (and so the Triton request) when the HTTP client goes away."""
    answer = Answer()

    async def run():
        async for _ in deltas(pieces, answer, stops):
            pass
        return answer

    task = asyncio.ensure_future(run())
    watcher = asyncio.ensure_future(watch_disconnect(request, task))
    try:
        return await task
    finally:
        watcher.cancel()


class ClosingStreamingResponse(StreamingResponse):
    """A StreamingResponse that closes its body generator however the response ends. Starlette (1.10) leaves the
    generator suspended when a client's disconnect cancels the response at a send; it would be finalized only when
    the garbage collector gets to it, and its `finally` is what cancels the request in Triton."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def _primed(first: Piece | None, rest: AsyncIterator[Piece]) -> AsyncIterator[Piece]:
    try:
        if first is not None:
            yield first
        async for p in rest:
            yield p
    finally:
        await rest.aclose()


async def stream(pieces: AsyncIterator[Piece], events: Callable[[AsyncIterator[Piece]], AsyncIterator[dict | str]],
                 done: str | None = None) -> ClosingStreamingResponse:
    """A server-sent-event response of `events(pieces)`. The first piece is awaited before answering, so that
    errors the ensemble finds in the request (bad audio, an over-long prompt) become HTTP errors with their status;
    after the first byte the status is sent, and an error travels as an event. `done`: a last event (OpenAI's
    chat stream ends with "[DONE]")."""
    try:
        first = await pieces.__anext__()
    except StopAsyncIteration:
        first = None
    except BaseException:
        await pieces.aclose()
        raise
    body = events(_primed(first, pieces))

    async def lines():
        try:
            async for event in body:
                yield sse(event)
        except APIError as e:
            yield sse(e.body())
        finally:
            await body.aclose()
        if done is not None:
            yield sse(done)

    return ClosingStreamingResponse(lines(), media_type="text/event-stream", headers={"cache-control": "no-cache"})
