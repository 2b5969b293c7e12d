"""OpenAI-compatible HTTP front end for the AF3 ensemble: what people reach with the `openai` package or curl.

    af3trt openai --triton 127.0.0.1:8001 [--port 9000] [--api-key-env AF3TRT_API_KEY]

A thin translation layer, no model logic: each HTTP request becomes one request to the `af3` ensemble over
Triton's gRPC streaming API (FastAPI + uvicorn for HTTP, Starlette's StreamingResponse for server-sent events,
tritonclient's asyncio client for gRPC). Prompt rendering, audio decoding, token counts and limits all stay in
the ensemble, so the HTTP answer is the gRPC answer: same token ids, same errors. One router per endpoint
(runtime/openai/), over shared helpers (runtime/openai/common.py); this module assembles the app and runs it.

    POST /v1/chat/completions      messages with text and input_audio parts (base64 wav/mp3/flac/ogg); stream
    POST /v1/audio/transcriptions  multipart upload; AF3's transcription prompt, its answer prefix stripped
    WS   /v1/realtime              OpenAI's Realtime API: live audio in, text (or transcripts) out (docs/realtime.md)
    GET  /v1/models                the ensemble, under its Triton name (or --served-model-name)
    GET  /health                   200 only while Triton reports the ensemble and every model it runs ready
    GET  /live                     200 while the front answers at all (its liveness, whatever Triton's state)

Errors use OpenAI's error body {"error": {"message", "type", "param", "code"}}: 400 for what the client can fix
(bad base64, audio the ensemble cannot decode or longer than it reads, parameters out of range, n > 1), 401
for a missing or wrong API key, 404 for an unknown model, 413 for a body over --max-upload-bytes, 503 when
Triton cannot be reached, the ensemble is not ready or a queue is full. An error a stage raises carries its code
(runtime/stages/errors.py) to here, which gives its HTTP status; the message is the stage's, without Triton's prefixes. A client that disconnects cancels its gRPC stream and sends
the request id to the repository's `cancel` model, which the CPU decoder polls: it stops generating. Binds
127.0.0.1 unless told otherwise; the API key is read from an environment variable and never logged.
"""

from __future__ import annotations

import argparse
import contextlib
import hmac
import importlib
import logging
import os
import sys

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from af3trt.runtime.stages.contract import ENSEMBLE
from af3trt.runtime.openai.common import ERROR_RESPONSES, APIError, RealtimeOptions, Settings
from af3trt.runtime.openai.triton import Triton

log = logging.getLogger("af3trt.openai")

# One router per endpoint (runtime/openai/<name>.py), imported when an app is made: the launcher (runtime/serve/server.py)
# imports this module for its flags only, and the transcription router's audio stack takes seconds to import.
ROUTERS = ("af3trt.runtime.openai.health", "af3trt.runtime.openai.models", "af3trt.runtime.openai.chat",
           "af3trt.runtime.openai.transcriptions", "af3trt.runtime.openai.realtime")


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


def validation_error(e: RequestValidationError) -> APIError:
    """FastAPI's validation errors as one 400: the first field as `param` (its path in the body), every error in the
    message; a body that is not JSON at all names no field."""
    errs = e.errors()
    if any(err.get("type") == "json_invalid" for err in errs):
        detail = next((err.get("ctx", {}).get("error") for err in errs if err.get("type") == "json_invalid"), None)
        return APIError(400, "the request body is not valid JSON" + (f" ({detail})" if detail else ""))

    def where(err) -> str:
        return ".".join(str(x) for x in err.get("loc", ())[1:])

    msg = "; ".join(f"{where(err)}: {err.get('msg')}" for err in errs)
    return APIError(400, msg or "invalid request", param=(where(errs[0]) if errs else "") or None)


def create_app(settings: Settings) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.triton = Triton(settings.triton_url, settings.model)
        try:
            yield
        finally:
            await app.state.triton.close()

    app = FastAPI(title="af3trt OpenAI-compatible API", lifespan=lifespan, responses=ERROR_RESPONSES)
    app.state.settings = settings
    for router in (importlib.import_module(name).router for name in ROUTERS):
        app.include_router(router)

    @app.exception_handler(APIError)
    async def api_error(_, e: APIError):
        if e.status >= 500:
            log.warning("%d: %s", e.status, e.message)
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def bad_request(_, e: RequestValidationError):
        return JSONResponse(validation_error(e).body(), status_code=400)

    @app.middleware("http")
    async def auth(request: Request, call_next):
        if settings.api_key and request.url.path not in ("/health", "/live"):
            given = request.headers.get("authorization", "")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
                err = APIError(401, "missing or invalid API key (Authorization: Bearer …)", code="invalid_api_key")
                return JSONResponse(err.body(), status_code=401)
        return await call_next(request)

    return app


# ------------------------------------------------------------------------------------------------ command line


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--max-upload-bytes", type=int, default=Settings.max_upload_bytes,
                    help="largest request body (JSON with base64 audio, or a multipart upload); larger gets 413")
    ap.add_argument("--api-key-env", default=None, metavar="VAR",
                    help="require `Authorization: Bearer <key>` with the key read from this environment variable")
    ap.add_argument("--served-model-name", default=None, help="model id clients use (default: the ensemble name)")
    ap.add_argument("--max-transcription-seconds", type=float, default=Settings.max_transcription_seconds,
                    help="longest audio /v1/audio/transcriptions accepts with chunking_strategy (longer gets 400)")
    ap.add_argument("--transcription-concurrency", type=int, default=Settings.transcription_concurrency,
                    help="pieces of one long-form transcription sent to the ensemble at once")
    RealtimeOptions.add_arguments(ap)


def settings_from(args, triton_url: str) -> Settings:
    key = None
    if args.api_key_env:
        key = os.environ.get(args.api_key_env)
        if not key:
            raise SystemExit(f"--api-key-env {args.api_key_env}: that environment variable is empty or unset")
    return Settings(triton_url=triton_url, model=getattr(args, "model", ENSEMBLE), api_key=key,
                    served_model_name=args.served_model_name, max_upload_bytes=args.max_upload_bytes,
                    max_transcription_seconds=args.max_transcription_seconds,
                    transcription_concurrency=args.transcription_concurrency,
                    realtime=RealtimeOptions.from_args(args))


def command(args, triton_url: str, host: str, port: int) -> list[str]:
    """`af3trt openai` as a command line with the options add_arguments() parsed into args (for `af3trt serve
    --openai-port`). The API key stays in the environment the child inherits, never on its command line."""
    cmd = [sys.executable, "-m", "af3trt.runtime.openai.app", "--triton", triton_url, "--host", host,
           "--port", str(port), "--max-upload-bytes", str(args.max_upload_bytes),
           "--max-transcription-seconds", str(args.max_transcription_seconds),
           "--transcription-concurrency", str(args.transcription_concurrency),
           *RealtimeOptions.from_args(args).command()]
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
    # WS /v1/realtime: uvicorn's sans-I/O implementation over the websockets library (its older one is deprecated)
    uvicorn.run(app, host=host, port=port, log_level="info", access_log=False, ws="websockets-sansio")


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
