"""WS /v1/realtime: OpenAI's Realtime API over a WebSocket — audio streams in, answers (or transcripts) stream out as
text. The `openai` package's `client.realtime.connect()` is a client (docs/realtime.md).

The socket, and nothing else, lives here: the API key, the session limit, the idle and total timeouts, reading and
parsing events (runtime/openai/realtime_events.py) and writing the session's events in order. What a session does
with them is runtime/openai/realtime_session.py. Each refusal is an `error` event; those that end the session
(key, model, limit, timeouts) are followed by a close (1008 policy; 1013 try again later for the session limit).
A client that goes away ends its session: what it had running is cancelled in Triton (the decoder stops).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time

from fastapi import APIRouter, WebSocket
from starlette.websockets import WebSocketDisconnect

from af3trt.runtime.openai.common import APIError, Settings
from af3trt.runtime.openai.realtime_events import EventError, parse_event
from af3trt.runtime.openai.realtime_session import RealtimeSession

log = logging.getLogger("af3trt.openai")

router = APIRouter()
KEY_PROTOCOL = "openai-insecure-api-key."  # browsers cannot set headers: the key travels as a subprotocol
WRITE_DRAIN_S = 5.0  # at the end, how long the last events may take to leave


def _key_ok(ws: WebSocket, key: str) -> bool:
    scheme, _, token = ws.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode()):
        return True
    return any(p.startswith(KEY_PROTOCOL) and hmac.compare_digest(p[len(KEY_PROTOCOL):].encode(), key.encode())
               for p in ws.scope.get("subprotocols", []))


def _refusal(ws: WebSocket, settings: Settings, sessions: set) -> tuple[EventError, int] | None:
    if settings.api_key and not _key_ok(ws, settings.api_key):
        return EventError("missing or invalid API key (Authorization: Bearer …)", code="invalid_api_key",
                          kind="authentication_error"), 1008
    model = ws.query_params.get("model")
    if model is not None and model != settings.model_id:
        return EventError(f"model {model!r} does not exist; this server serves {settings.model_id!r}",
                          code="model_not_found", param="model"), 1008
    if len(sessions) >= settings.realtime.max_sessions:
        return EventError(f"this server holds at most {settings.realtime.max_sessions} realtime sessions at once; "
                          "try again later", code="session_limit_reached", kind="server_error"), 1013
    return None


@router.websocket("/v1/realtime")
async def realtime(ws: WebSocket):
    settings: Settings = ws.app.state.settings
    opts = settings.realtime
    sessions = getattr(ws.app.state, "realtime_sessions", None)
    if sessions is None:
        sessions = ws.app.state.realtime_sessions = set()
    offered = [p for p in ws.scope.get("subprotocols", []) if p == "realtime"]
    await ws.accept(subprotocol=offered[0] if offered else None)

    async def refuse(err: EventError, code: int) -> None:
        await ws.send_text(json.dumps(err.event()))
        await ws.close(code=code, reason=err.code or "")

    refusal = _refusal(ws, settings, sessions)
    if refusal is not None:
        return await refuse(*refusal)
    try:
        info = await ws.app.state.triton.info()
    except APIError as e:
        return await refuse(EventError(e.message, code=e.code or "triton_unavailable", kind="server_error"), 1011)

    out: asyncio.Queue = asyncio.Queue()
    kind = "transcription" if ws.query_params.get("intent") == "transcription" else "realtime"
    session = RealtimeSession(generate=ws.app.state.triton.generate, info=info, model_id=settings.model_id,
                              send=out.put, limits=opts, kind=kind)
    sessions.add(session)

    async def write() -> None:
        while (ev := await out.get()) is not None:
            await ws.send_text(json.dumps(ev, ensure_ascii=False))

    writer = asyncio.ensure_future(write())
    close_code, deadline = 1000, time.monotonic() + opts.max_session_s
    log.info("realtime session %s opened (%d held)", session.id, len(sessions))
    try:
        await session.start()
        while True:
            left = deadline - time.monotonic()
            try:
                msg = await asyncio.wait_for(ws.receive(), min(opts.idle_timeout_s, max(left, 0.0)))
            except asyncio.TimeoutError:
                expired = time.monotonic() >= deadline
                await out.put(EventError(
                    f"the session reached this server's limit of {opts.max_session_s:g} s" if expired else
                    f"no event for {opts.idle_timeout_s:g} s: the session is closed",
                    code="session_expired" if expired else "idle_timeout").event())
                close_code = 1008
                break
            if msg["type"] == "websocket.disconnect":
                close_code = None
                break
            try:
                event_kind, eid, ev = parse_event(msg["text"] if msg.get("text") is not None else msg.get("bytes"))
            except EventError as e:
                await out.put(e.event())
                continue
            await session.handle(event_kind, eid, ev)
    except WebSocketDisconnect:
        close_code = None
    finally:
        sessions.discard(session)
        await session.close()  # a response still running is cancelled: its Triton request stops
        await out.put(None)
        try:
            await asyncio.wait_for(writer, WRITE_DRAIN_S)
        except (asyncio.TimeoutError, WebSocketDisconnect, RuntimeError, OSError):
            writer.cancel()
        if close_code is not None:
            try:
                await ws.close(code=close_code)
            except RuntimeError:  # already closed
                pass
        log.info("realtime session %s closed", session.id)
