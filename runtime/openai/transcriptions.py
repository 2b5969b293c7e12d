"""POST /v1/audio/transcriptions: a multipart upload → AF3's transcription request, its answer prefix stripped by
the ensemble; the text (json or text), or transcript.text.delta events (stream)."""

from __future__ import annotations

import uuid
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse
from starlette.datastructures import UploadFile

from af3trt.runtime.client import Request as Job
from af3trt.runtime.openai.common import APIError, Answer, Piece, check_audio, check_model, collect, deltas, stream

# AF3's transcription request, as AudioFlamingo3Processor.apply_transcription_request builds it
# (transformers models/audioflamingo3/processing_audioflamingo3.py, default_transcription_prompt); its answer
# "The spoken content of the audio is "…"." is unwrapped by the ensemble's strip_prefix.
TRANSCRIPTION_PROMPT = "Transcribe the input speech."
# AF3 takes no language hint and gives no timestamps: such fields are refused, not ignored.
FIELDS = {"file", "model", "response_format", "stream", "prompt", "temperature"}

router = APIRouter()


def _form_float(value: Any, name: str) -> float | None:
    if value in (None, ""):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise APIError(400, f"{name} must be a number, got {value!r}", param=name) from None


@router.post("/v1/audio/transcriptions")
async def transcriptions(request: Request):
    triton = request.app.state.triton
    info = await triton.info()
    form = await request.form()  # the body's size is capped by BodyLimit
    unknown = sorted(set(form.keys()) - FIELDS)
    if unknown:
        raise APIError(400, f"unsupported parameter(s): {', '.join(unknown)}", param=unknown[0])
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise APIError(400, "file is required (multipart upload)", param="file")
    check_model(request, form.get("model") or None)
    fmt = form.get("response_format") or "json"
    if fmt not in ("json", "text"):
        raise APIError(400, f"response_format {fmt!r}: this server gives 'json' or 'text'", param="response_format")
    streamed = str(form.get("stream") or "false").lower() == "true"
    temperature = _form_float(form.get("temperature"), "temperature")
    data = await upload.read()
    check_audio(data, "file", info.max_audio_seconds)
    # A prompt (OpenAI: context for the transcription) replaces AF3's default transcription instruction.
    job = Job(prompt=str(form.get("prompt") or TRANSCRIPTION_PROMPT), audio=[data], temperature=temperature,
              max_tokens=info.max_output_len or None, stream=streamed, strip_prefix=True)
    rid = uuid.uuid4().hex
    if not streamed:
        text = (await collect(request, triton.generate(job, rid))).text
        return PlainTextResponse(text) if fmt == "text" else {"text": text}

    async def events(pieces: AsyncIterator[Piece]):
        answer = Answer()
        async for text in deltas(pieces, answer):
            yield {"type": "transcript.text.delta", "delta": text}
        yield {"type": "transcript.text.done", "text": answer.text}

    return await stream(triton.generate(job, rid), events)
