"""OpenAI-compatible HTTP front end for the AF3 ensemble: what people reach with the `openai` package or curl.

    af3trt openai --triton 127.0.0.1:8001 [--port 9000] [--api-key-env AF3TRT_API_KEY]

A thin translation layer, no model logic: each HTTP request becomes one request to the `af3` ensemble over
Triton's gRPC streaming API (FastAPI + uvicorn for HTTP, Starlette's StreamingResponse for server-sent events,
tritonclient's asyncio client for gRPC). Prompt rendering, audio decoding, token counts and limits all stay in
the ensemble, so the HTTP answer is the gRPC answer: same token ids, same errors.

    POST /v1/chat/completions      messages with text and input_audio parts (base64 wav/mp3/flac/ogg); stream
    POST /v1/audio/transcriptions  multipart upload; AF3's transcription prompt, its answer prefix stripped
    GET  /v1/models                the ensemble, under its Triton name (or --served-model-name)
    GET  /health                   200 only while Triton reports the ensemble and every model it runs ready

Errors use OpenAI's error body {"error": {"message", "type", "param", "code"}}: 400 for what the client can fix
(bad base64, audio the ensemble cannot decode or longer than it reads, parameters out of range, n > 1), 401
for a missing or wrong API key, 404 for an unknown model, 413 for a body over --max-upload-bytes, 503 when
Triton cannot be reached or the ensemble is not ready. A client that disconnects cancels its gRPC stream and sends
the request id to the repository's `cancel` model, which the CPU decoder polls: it stops generating. Binds
127.0.0.1 unless told otherwise; the API key is read from an environment variable and never logged.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import hmac
import io
import json
import logging
import os
import re
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Literal

import grpc
import soundfile as sf
import tritonclient.grpc.aio as grpcaio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import UploadFile
from tritonclient.utils import InferenceServerException

from af3trt.runtime import lengths
from af3trt.runtime.client import Request as Job
from af3trt.runtime.client import AF3ConnectionError, AF3Error, ResponseReader, send_cancel_async
from af3trt.runtime.contract import ENSEMBLE

log = logging.getLogger("af3trt.openai")

# AF3's transcription request, as AudioFlamingo3Processor.apply_transcription_request builds it
# (transformers models/audioflamingo3/processing_audioflamingo3.py, default_transcription_prompt); its answer
# "The spoken content of the audio is "…"." is unwrapped by the ensemble's strip_prefix.
TRANSCRIPTION_PROMPT = "Transcribe the input speech."
AUDIO_FORMATS = ("wav", "mp3", "flac", "ogg")
# Exceptions our Triton models raise for a bad request (ValueError subclasses, runtime/triton_io.py prefixes the
# message with the class name); anything else that fails a request is a server error.
CLIENT_ERRORS = re.compile(r"\b(AudioError|PromptError|RequestError|DecodeError|ValueError): ")


class APIError(Exception):
    """An HTTP error answered with OpenAI's error body."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             413: "invalid_request_error", 503: "service_unavailable", 500: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

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


# ------------------------------------------------------------------------------------------------ Triton side


@dataclass(frozen=True)
class EnsembleInfo:
    """What the HTTP layer needs to know about the served repository, read from Triton's model configs."""

    inputs: frozenset[str]  # the ensemble's request inputs (e.g. whether `messages` exists)
    models: tuple[str, ...]  # the ensemble and the models its steps run
    default_max_tokens: int  # fusion's default when a request gives none
    max_output_len: int
    max_audio_seconds: float


@dataclass
class Piece:
    """One ensemble response: this chunk's text and ids, notices, and the prompt length (fusion's count)."""

    text: str
    ids: list[int]
    notices: list[str]
    prompt_tokens: int


def _unavailable(url: str, e: BaseException) -> APIError:
    return APIError(503, f"Triton at {url} is unavailable: {e}", code="triton_unavailable")


class Triton:
    """The ensemble over gRPC (asyncio): readiness, its limits, and streamed generation with cancellation."""

    def __init__(self, url: str, model: str = ENSEMBLE):
        self.url, self.model = url, model
        self.client = grpcaio.InferenceServerClient(url)
        self._info: EnsembleInfo | None = None
        self._cancels: set[asyncio.Task] = set()  # cancellations in flight (kept referenced until done)

    async def close(self) -> None:
        if self._cancels:  # let the last cancellations reach Triton (each has its own short timeout)
            await asyncio.wait(set(self._cancels))
        await self.client.close()

    async def info(self) -> EnsembleInfo:
        if self._info is None:
            try:
                ens = (await self.client.get_model_config(self.model, client_timeout=10)).config
                steps = tuple(s.model_name for s in ens.ensemble_scheduling.step)
                params = {}
                for m in ("fusion", "preprocess"):
                    if m in steps:
                        cfg = (await self.client.get_model_config(m, client_timeout=10)).config
                        params.update({k: v.string_value for k, v in cfg.parameters.items()})
            except (InferenceServerException, grpc.RpcError) as e:
                raise _unavailable(self.url, e) from None
            self._info = EnsembleInfo(
                inputs=frozenset(i.name for i in ens.input), models=(self.model, *steps),
                default_max_tokens=int(params.get("default_max_tokens", 0)) or 0,
                max_output_len=int(params.get("max_output_len", 0)) or 0,
                max_audio_seconds=float(int(params.get("max_audio_windows", lengths.MAX_WINDOWS))
                                        * lengths.WINDOW_SECONDS))
        return self._info

    async def ready(self) -> tuple[bool, str]:
        try:
            if not await self.client.is_server_ready(client_timeout=5):
                return False, "Triton is not ready"
            for m in (await self.info()).models:
                if not await self.client.is_model_ready(m, client_timeout=5):
                    return False, f"model {m} is not ready"
        except (InferenceServerException, grpc.RpcError, APIError) as e:
            return False, f"Triton at {self.url} is unavailable: {getattr(e, 'message', e)}"
        return True, "ready"

    async def generate(self, job: Job, request_id: str) -> AsyncIterator[Piece]:
        """The ensemble's responses for one request. Leaving the iteration early (a client that went away, a
        stop string) cancels the gRPC call, which Triton turns into a cancellation of the request, and sends the
        request id to the cancel model: Triton 2.51 does not pass the first on to the decoder inside the ensemble."""
        done = asyncio.Event()

        async def requests():
            yield {"model_name": self.model, "inputs": job.inputs(), "request_id": request_id,
                   "parameters": {"triton_enable_empty_final_response": True}}
            await done.wait()  # keep our half of the stream open until the last response

        call = self.client.stream_infer(requests())
        finished = False
        errored = False  # Triton answered an error: the request is over there
        reader = ResponseReader(self.url, self.model, running=True)
        try:
            async for result, error in call:
                errored = error is not None
                try:
                    chunk = reader.read(result, error)
                except AF3ConnectionError as e:
                    raise APIError(503, str(e), code="triton_unavailable") from None
                except AF3Error as e:
                    raise APIError(400 if CLIENT_ERRORS.search(str(e)) else 500, str(e)) from None
                if chunk is not None:
                    yield Piece(text=chunk.text, ids=chunk.token_ids, notices=chunk.notices,
                                prompt_tokens=chunk.prompt_tokens)
                if reader.final:
                    finished = True
                    return
            raise APIError(500, "Triton closed the stream before the final response")
        except grpc.aio.AioRpcError as e:
            if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise _unavailable(self.url, e.details()) from None
            raise APIError(500, f"gRPC error from Triton: {e.code().name}: {e.details()}") from None
        finally:
            done.set()
            if not finished:  # the client went away, a stop string matched, or an error: end it in Triton
                log.info("request %s: cancelling it in Triton", request_id)
                call.cancel()
                if not errored:
                    task = asyncio.ensure_future(send_cancel_async(self.client, request_id))
                    self._cancels.add(task)
                    task.add_done_callback(self._cancels.discard)


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


# ------------------------------------------------------------------------------------------------ OpenAI schema


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")  # an unsupported parameter is an error, never silently dropped


class TextPart(_Model):
    type: Literal["text"]
    text: str


class InputAudio(_Model):
    data: str  # base64
    format: str


class AudioPart(_Model):
    type: Literal["input_audio"]
    input_audio: InputAudio


class Message(_Model):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart | AudioPart]
    name: str | None = None


class StreamOptions(_Model):
    include_usage: bool = False


class ChatRequest(_Model):
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = Field(default=None, ge=0, lt=2**64)
    stop: str | list[str] | None = None
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None


def decode_audio_part(part: AudioPart, index: int, max_seconds: float) -> bytes:
    """The clip's bytes, after the checks that give a precise 400 before any work: base64, format, duration."""
    where = f"messages: input_audio {index}"
    if part.input_audio.format not in AUDIO_FORMATS:
        raise APIError(400, f"{where}: format {part.input_audio.format!r} is not one of {', '.join(AUDIO_FORMATS)}",
                       param="input_audio.format")
    try:
        data = base64.b64decode(part.input_audio.data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise APIError(400, f"{where}: data is not valid base64 ({e})", param="input_audio.data") from None
    check_audio(data, where, max_seconds)
    return data


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


def build_job(req: ChatRequest, info: EnsembleInfo) -> Job:
    """OpenAI messages → the ensemble's request.

    The conversation goes to the ensemble's `messages` input as it is: roles (OpenAI's "developer" is a system
    message), text parts, and each input_audio part as {"type": "audio", "audio_index": k}, k counting the clips
    of the `audio` input in order. The ensemble renders it with the checkpoint's chat template and checks it (role
    order, empty content). A repository built before `messages` existed takes one user turn after an optional system
    message, sent as its text_input + system_prompt shorthand.
    """
    if req.n not in (None, 1):
        raise APIError(400, f"n={req.n}: this server returns one choice per request (n=1)", param="n")
    if req.max_tokens is not None and req.max_completion_tokens is not None and \
            req.max_tokens != req.max_completion_tokens:
        raise APIError(400, "max_tokens and max_completion_tokens differ; give one", param="max_completion_tokens")
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if max_tokens is None:
        max_tokens = info.default_max_tokens or None
    clips: list[bytes] = []
    turns: list[dict] = []
    for m in req.messages:
        role = "system" if m.role == "developer" else m.role
        if isinstance(m.content, str):
            turns.append({"role": role, "content": m.content})
            continue
        parts = []
        for p in m.content:
            if isinstance(p, TextPart):
                parts.append({"type": "text", "text": p.text})
            else:
                parts.append({"type": "audio", "audio_index": len(clips)})
                clips.append(decode_audio_part(p, len(clips), info.max_audio_seconds))
        turns.append({"role": role, "content": parts})
    job = Job(audio=clips, max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, seed=req.seed,
              stream=req.stream)
    if "messages" in info.inputs:
        job.messages = turns
        return job
    roles = [t["role"] for t in turns]
    if roles not in (["user"], ["system", "user"]):
        raise APIError(400, "this model repository takes one user message (after an optional system message); "
                            "multi-turn conversations need a repository whose ensemble has the `messages` input "
                            "(rebuild it with this version of af3trt)", param="messages")

    def text(content) -> str:
        return content if isinstance(content, str) else "".join(p.get("text", "") for p in content)

    job.prompt = text(turns[-1]["content"])
    job.system_prompt = text(turns[0]["content"]) if len(turns) == 2 else None
    return job


def _stops(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > 4 or any(not s for s in stops):
        raise APIError(400, "stop takes up to 4 non-empty strings", param="stop")
    return stops


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


# ------------------------------------------------------------------------------------------------ HTTP side


@dataclass
class Settings:
    triton_url: str = "127.0.0.1:8001"
    model: str = ENSEMBLE  # the Triton ensemble
    served_model_name: str | None = None  # the id clients see (default: the ensemble's name)
    api_key: str | None = None
    max_upload_bytes: int = 64 * 2**20

    @property
    def model_id(self) -> str:
        return self.served_model_name or self.model


class BodyLimit:
    """ASGI middleware: a request body over the limit gets 413 (OpenAI's error body). The body is read and thrown
    away up to a bound first, so the client sees the answer instead of a connection reset mid-upload."""

    DRAIN = 256 * 2**20  # past limit + this, stop reading and let the connection close

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        too_big = declared is not None and declared.isdigit() and int(declared) > self.limit
        seen = 0
        buffered: list[dict] = []
        if not too_big:  # count what arrives (chunked uploads declare no length)
            while True:
                msg = await receive()
                buffered.append(msg)
                if msg["type"] != "http.request":
                    break
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    too_big = True
                    break
                if not msg.get("more_body"):
                    break
        if too_big:
            more = buffered[-1].get("more_body", False) if buffered else True
            while more and seen <= self.limit + self.DRAIN:
                msg = await receive()
                seen += len(msg.get("body", b""))
                more = msg["type"] == "http.request" and msg.get("more_body", False)
            err = APIError(413, f"request body larger than this server's limit of {self.limit} bytes",
                           code="request_too_large")
            return await JSONResponse(err.body(), status_code=413, headers={"connection": "close"})(
                scope, receive, send)

        async def replay():
            return buffered.pop(0) if buffered else await receive()

        return await self.app(scope, replay, send)


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def create_app(settings: Settings) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.triton = Triton(settings.triton_url, settings.model)
        try:
            yield
        finally:
            await app.state.triton.close()

    app = FastAPI(title="af3trt OpenAI-compatible API", lifespan=lifespan, responses=ERROR_RESPONSES)

    @app.exception_handler(APIError)
    async def api_error(_, e: APIError):
        if e.status >= 500:
            log.warning("%d: %s", e.status, e.message)
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def bad_request(_, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        param = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
        msg = "; ".join(f"{'.'.join(str(x) for x in err.get('loc', ())[1:])}: {err.get('msg')}" for err in e.errors())
        return JSONResponse(APIError(400, msg or "invalid request", param=param).body(), status_code=400)

    @app.middleware("http")
    async def auth(request: Request, call_next):
        if settings.api_key and request.url.path != "/health":
            given = request.headers.get("authorization", "")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
                err = APIError(401, "missing or invalid API key (Authorization: Bearer …)", code="invalid_api_key")
                return JSONResponse(err.body(), status_code=401)
        return await call_next(request)

    def triton(request: Request) -> Triton:
        return request.app.state.triton

    def check_model(model: str | None) -> None:
        if model is not None and model != settings.model_id:
            raise APIError(404, f"model {model!r} does not exist; this server serves {settings.model_id!r}",
                           param="model", code="model_not_found")

    @app.get("/health")
    async def health(request: Request):
        ok, why = await triton(request).ready()
        return JSONResponse({"status": "ok" if ok else "unavailable", "detail": why}, status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models(request: Request):
        await triton(request).info()
        return {"object": "list", "data": [{"id": settings.model_id, "object": "model", "created": 0,
                                            "owned_by": "af3trt"}]}

    async def first_and_rest(gen: AsyncIterator[Piece]) -> tuple[Piece | None, AsyncIterator[Piece]]:
        """Await the first response before answering, so that errors the ensemble finds in the request (bad
        audio, over-long prompt) become HTTP errors with their status even for streamed requests."""
        try:
            first = await gen.__anext__()
        except StopAsyncIteration:
            first = None
        except BaseException:
            await gen.aclose()
            raise
        return first, gen

    async def watch_disconnect(request: Request, task: asyncio.Task) -> None:
        """Non-streamed requests: cancel the work (and so the Triton request) when the client goes away."""
        while not task.done():
            if await request.is_disconnected():
                task.cancel()
                return
            await asyncio.sleep(0.1)

    async def run_whole(request: Request, coro):
        task = asyncio.ensure_future(coro)
        watcher = asyncio.ensure_future(watch_disconnect(request, task))
        try:
            return await task
        finally:
            watcher.cancel()

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        check_model(body.model)
        tr = triton(request)
        info = await tr.info()
        stops = _stops(body.stop)
        job = build_job(body, info)
        rid = uuid.uuid4().hex
        cid, created = f"chatcmpl-{rid}", int(time.time())

        def finish_reason(n_ids: int, stopped: bool) -> str:
            return "stop" if stopped or job.max_tokens is None or n_ids < job.max_tokens else "length"

        if not body.stream:
            async def whole():
                scan, text, ids, prompt = StopScanner(stops), "", [], -1
                gen = tr.generate(job, rid)
                try:
                    async for piece in gen:
                        ids += piece.ids
                        prompt = piece.prompt_tokens if piece.prompt_tokens >= 0 else prompt
                        text += scan.feed(piece.text)
                        if scan.stopped:
                            break
                finally:
                    await gen.aclose()
                text += "" if scan.stopped else scan.flush()
                return {"id": cid, "object": "chat.completion", "created": created, "model": settings.model_id,
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                     "finish_reason": finish_reason(len(ids), scan.stopped), "logprobs": None}],
                        "usage": _usage(prompt, len(ids))}
            return await run_whole(request, whole())

        first, rest = await first_and_rest(tr.generate(job, rid))
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def events():
            scan, n_ids, prompt = StopScanner(stops), 0, -1

            def chunk(delta: dict, reason: str | None = None) -> str:
                return _sse({"id": cid, "object": "chat.completion.chunk", "created": created,
                             "model": settings.model_id, "choices": [{"index": 0, "delta": delta,
                                                                      "finish_reason": reason, "logprobs": None}]})
            try:
                yield chunk({"role": "assistant", "content": ""})
                pieces = _prepend(first, rest)
                async for piece in pieces:
                    n_ids += len(piece.ids)
                    prompt = piece.prompt_tokens if piece.prompt_tokens >= 0 else prompt
                    text = scan.feed(piece.text)
                    if text:
                        yield chunk({"content": text})
                    if scan.stopped:
                        break
                tail = "" if scan.stopped else scan.flush()
                if tail:
                    yield chunk({"content": tail})
                yield chunk({}, finish_reason(n_ids, scan.stopped))
                if include_usage:
                    yield _sse({"id": cid, "object": "chat.completion.chunk", "created": created,
                                "model": settings.model_id, "choices": [], "usage": _usage(prompt, n_ids)})
            except APIError as e:  # after the first byte the status is sent: the error travels as an event
                yield _sse(e.body())
            finally:
                await rest.aclose()
            yield _sse("[DONE]")

        return ClosingStreamingResponse(events(), media_type="text/event-stream",
                                        headers={"cache-control": "no-cache"})

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(request: Request):
        tr = triton(request)
        info = await tr.info()
        form = await request.form()  # the body's size is capped by BodyLimit
        # AF3 takes no language hint and gives no timestamps: such fields are refused, not ignored.
        allowed = {"file", "model", "response_format", "stream", "prompt", "temperature"}
        unknown = sorted(set(form.keys()) - allowed)
        if unknown:
            raise APIError(400, f"unsupported parameter(s): {', '.join(unknown)}", param=unknown[0])
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise APIError(400, "file is required (multipart upload)", param="file")
        check_model(form.get("model") or None)
        fmt = form.get("response_format") or "json"
        if fmt not in ("json", "text"):
            raise APIError(400, f"response_format {fmt!r}: this server gives 'json' or 'text'", param="response_format")
        stream = str(form.get("stream") or "false").lower() == "true"
        temperature = _form_float(form.get("temperature"), "temperature")
        data = await upload.read()
        check_audio(data, "file", info.max_audio_seconds)
        # A prompt (OpenAI: context for the transcription) replaces AF3's default transcription instruction.
        job = Job(prompt=str(form.get("prompt") or TRANSCRIPTION_PROMPT), audio=[data],
                  temperature=temperature, max_tokens=info.max_output_len or None, stream=stream, strip_prefix=True)
        rid = uuid.uuid4().hex

        if not stream:
            async def whole():
                text, ids = "", []
                gen = tr.generate(job, rid)
                try:
                    async for piece in gen:
                        text += piece.text
                        ids += piece.ids
                finally:
                    await gen.aclose()
                return text, ids
            text, _ = await run_whole(request, whole())
            return PlainTextResponse(text) if fmt == "text" else {"text": text}

        first, rest = await first_and_rest(tr.generate(job, rid))

        async def events():
            text = ""
            try:
                async for piece in _prepend(first, rest):
                    if piece.text:
                        text += piece.text
                        yield _sse({"type": "transcript.text.delta", "delta": piece.text})
                yield _sse({"type": "transcript.text.done", "text": text})
            except APIError as e:
                yield _sse(e.body())
            finally:
                await rest.aclose()

        return ClosingStreamingResponse(events(), media_type="text/event-stream",
                                        headers={"cache-control": "no-cache"})

    return app


async def _prepend(first: Piece | None, rest: AsyncIterator[Piece]) -> AsyncIterator[Piece]:
    if first is not None:
        yield first
    async for p in rest:
        yield p


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    if prompt_tokens < 0:
        raise APIError(500, "the ensemble did not report the prompt length (prompt_tokens output missing: rebuild "
                            "the model repository)")
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _form_float(value: Any, name: str) -> float | None:
    if value in (None, ""):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise APIError(400, f"{name} must be a number, got {value!r}", param=name) from None


# ------------------------------------------------------------------------------------------------ command line


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--max-upload-bytes", type=int, default=Settings.max_upload_bytes,
                    help="largest request body (JSON with base64 audio, or a multipart upload); larger gets 413")
    ap.add_argument("--api-key-env", default=None, metavar="VAR",
                    help="require `Authorization: Bearer <key>` with the key read from this environment variable")
    ap.add_argument("--served-model-name", default=None, help="model id clients use (default: the ensemble name)")


def settings_from(args, triton_url: str) -> Settings:
    key = None
    if args.api_key_env:
        key = os.environ.get(args.api_key_env)
        if not key:
            raise SystemExit(f"--api-key-env {args.api_key_env}: that environment variable is empty or unset")
    return Settings(triton_url=triton_url, model=getattr(args, "model", ENSEMBLE), api_key=key,
                    served_model_name=args.served_model_name, max_upload_bytes=args.max_upload_bytes)


def command(args, triton_url: str, host: str, port: int) -> list[str]:
    """`af3trt openai` as a command line with the options add_arguments() parsed into args (for `af3trt serve
    --openai-port`). The API key stays in the environment the child inherits, never on its command line."""
    cmd = [sys.executable, "-m", "af3trt.runtime.openai_server", "--triton", triton_url, "--host", host,
           "--port", str(port), "--max-upload-bytes", str(args.max_upload_bytes)]
    if args.api_key_env:
        cmd += ["--api-key-env", args.api_key_env]
    if args.served_model_name:
        cmd += ["--served-model-name", args.served_model_name]
    return cmd


def serve(settings: Settings, host: str, port: int) -> None:
    import uvicorn

    app = BodyLimit(create_app(settings), settings.max_upload_bytes)
    log.info("OpenAI-compatible API on http://%s:%d/v1 → Triton %s (model %s)%s", host, port, settings.triton_url,
             settings.model_id, ", API key required" if settings.api_key else "")
    uvicorn.run(app, host=host, port=port, log_level="info", access_log=False)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="af3trt openai", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--triton", default="127.0.0.1:8001", help="gRPC address of tritonserver")
    ap.add_argument("--model", default=ENSEMBLE, help="the ensemble's name in Triton")
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    ap.add_argument("--port", type=int, default=9000)
    add_arguments(ap)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    serve(settings_from(args, args.triton), args.host, args.port)


if __name__ == "__main__":
    main()
