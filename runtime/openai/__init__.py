"""The OpenAI-compatible HTTP front (app.py builds the app and runs it): one FastAPI router per
endpoint over shared helpers.

    common.py          errors (OpenAI's body, from runtime/stages/errors.py codes), settings, the answer loop: whole
                       (collect) or streamed as server-sent events (stream)
    triton.py          the af3 ensemble over Triton's gRPC streaming API: readiness, limits, generation
    chat.py            POST /v1/chat/completions
    transcriptions.py  POST /v1/audio/transcriptions
    realtime.py        WS /v1/realtime (the socket) over realtime_events.py (OpenAI's Realtime events, parsed and
                       written) and realtime_session.py (a session: conversation, turns, answers, windows sent ahead)
    models.py          GET /v1/models
    health.py          GET /health

Adding an endpoint: a module with its router here, and its name in app.ROUTERS.
"""
