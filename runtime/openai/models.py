"""GET /v1/models: the ensemble, under its Triton name or --served-model-name."""

from __future__ import annotations

from fastapi import APIRouter, Request

from af3trt.runtime.openai.common import settings

router = APIRouter()


@router.get("/v1/models")
async def models(request: Request):
    await request.app.state.triton.info()
    return {"object": "list", "data": [{"id": settings(request).model_id, "object": "model", "created": 0,
                                        "owned_by": "af3trt"}]}
