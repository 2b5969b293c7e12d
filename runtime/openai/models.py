"""GET /v1/models (the ensemble, under its Triton name or --served-model-name) and GET /health (200 only while
Triton reports the ensemble and every model it runs ready)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from af3trt.runtime.openai.common import settings

router = APIRouter()


@router.get("/health")
async def health(request: Request):
    ok, why = await request.app.state.triton.ready()
    return JSONResponse({"status": "ok" if ok else "unavailable", "detail": why}, status_code=200 if ok else 503)


@router.get("/v1/models")
async def models(request: Request):
    await request.app.state.triton.info()
    return {"object": "list", "data": [{"id": settings(request).model_id, "object": "model", "created": 0,
                                        "owned_by": "af3trt"}]}
