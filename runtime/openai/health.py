"""GET /health: 200 only while Triton reports the ensemble and every model it runs ready (no API key needed).
GET /live: 200 whenever the front's event loop answers, whatever Triton's state (the front's own liveness: the
launcher's watchdog and the Kubernetes liveness probe restart a front that stops answering it, never one whose Triton
is down)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

router = APIRouter()


@router.get("/health")
async def health(request: Request):
    ok, why = await request.app.state.triton.ready()
    return JSONResponse({"status": "ok" if ok else "unavailable", "detail": why}, status_code=200 if ok else 503)


@router.get("/live")
async def live():
    return {"status": "live"}
