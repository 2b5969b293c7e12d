"""POST /v1/audio/transcriptions: a multipart upload → AF3's transcription request, its answer prefix stripped by
the ensemble; the text (json, text or verbose_json), or transcript.text.delta events (stream).

With `chunking_strategy` ("auto", {"type": "server_vad", …} or this server's {"type": "fixed", "window_seconds"})
the upload may be far longer than AF3's window: it is read from the spooled upload a block at a time, cut into
pieces of at most one 30-s window (runtime/stages/longform.py), the pieces sent to the ensemble as separate requests,
`--transcription-concurrency` at a time, and joined in order; verbose_json gives one segment per piece with its
start and end. Past `--max-transcription-seconds` it is refused (400, audio_too_long). Without it: one request,
as before."""

from __future__ import annotations

import asyncio
import io
import uuid
import zlib
from typing import Any, AsyncIterator

import soundfile as sf
from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse
from starlette.datastructures import UploadFile

from af3trt.runtime.stages import longform
from af3trt.runtime.stages.audio import AudioError, iter_mono_16k, open_audio
from af3trt.runtime.client.library import Request as Job
from af3trt.runtime.stages.lengths import SAMPLE_RATE
from af3trt.runtime.stages.longform import TRANSCRIPTION_PROMPT
from af3trt.runtime.openai.common import (APIError, Answer, Piece, check_audio, check_model, collect, deltas,
                                          settings, stream, watch_disconnect)

# AF3 takes no language hint: such fields are refused, not ignored. Timestamps: per segment, with chunking.
# The openai package sends an object field as `chunking_strategy[type]`… and a list as `timestamp_granularities[]`.
FIELDS = {"file", "model", "response_format", "stream", "prompt", "temperature", "chunking_strategy",
          "timestamp_granularities", "timestamp_granularities[]"}
FORMATS = ("json", "text", "verbose_json")

router = APIRouter()

# The form this endpoint reads (it parses the multipart body itself, so FastAPI would publish no request body): declared
# in /openapi.json for clients and for `af3trt fuzz` (schemathesis generates its cases from it).
FORM_SCHEMA = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file"], "additionalProperties": False, "properties": {
        "file": {"type": "string", "format": "binary", "description": "the clip (wav, flac, ogg, mp3)"},
        "model": {"type": "string"},
        "response_format": {"type": "string", "enum": list(FORMATS)},
        "stream": {"type": "boolean"},
        "prompt": {"type": "string"},
        "temperature": {"type": "number"},
        "chunking_strategy": {"type": "string", "description": '"auto", or a JSON object: {"type": "server_vad", …} '
                                                               'or {"type": "fixed", "window_seconds": …}'},
        "timestamp_granularities": {"type": "array", "items": {"type": "string", "enum": ["segment"]}}}}}}}}


def _form_float(value: Any, name: str) -> float | None:
    if value in (None, ""):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise APIError(400, f"{name} must be a number, got {value!r}", param=name) from None


def _chunking(form) -> longform.Chunking | None:
    nested = {k[len("chunking_strategy["):-1]: v for k, v in form.multi_items()
              if k.startswith("chunking_strategy[") and k.endswith("]")}
    value = nested or form.get("chunking_strategy")
    if nested:
        for k in ("threshold", "silence_duration_ms", "prefix_padding_ms", "window_seconds"):
            if k in nested:
                nested[k] = _form_float(nested[k], f"chunking_strategy[{k}]")
    try:
        return longform.parse_chunking(value)
    except ValueError as e:
        raise APIError(400, str(e), param="chunking_strategy") from None


def _granularities(form, fmt: str) -> list[str]:
    given = [str(v) for k, v in form.multi_items() if k in ("timestamp_granularities", "timestamp_granularities[]")]
    for g in given:
        if g != "segment":
            raise APIError(400, f"timestamp_granularities: this server gives 'segment' timestamps, not {g!r}",
                           param="timestamp_granularities")
    if given and fmt != "verbose_json":
        raise APIError(400, "timestamp_granularities needs response_format 'verbose_json'",
                       param="timestamp_granularities")
    return given


@router.post("/v1/audio/transcriptions", openapi_extra=FORM_SCHEMA)
async def transcriptions(request: Request):
    triton = request.app.state.triton
    info = await triton.info()
    form = await request.form()  # the body's size is capped by BodyLimit
    unknown = sorted(k for k in set(form.keys()) - FIELDS if not k.startswith("chunking_strategy["))
    if unknown:
        raise APIError(400, f"unsupported parameter(s): {', '.join(unknown)}", param=unknown[0])
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise APIError(400, "file is required (multipart upload)", param="file")
    check_model(request, form.get("model") or None)
    fmt = form.get("response_format") or "json"
    if fmt not in FORMATS:
        raise APIError(400, f"response_format {fmt!r}: this server gives {', '.join(map(repr, FORMATS))}",
                       param="response_format")
    _granularities(form, fmt)
    chunking = _chunking(form)
    streamed = str(form.get("stream") or "false").lower() == "true"
    temperature = _form_float(form.get("temperature"), "temperature")
    # A prompt (OpenAI: context for the transcription) replaces AF3's default transcription instruction.
    prompt = str(form.get("prompt") or TRANSCRIPTION_PROMPT)
    if chunking is not None:
        return await _long_form(request, upload, chunking, fmt, streamed, prompt, temperature)
    data = await upload.read()
    check_audio(data, "file", info.max_audio_seconds)
    job = Job(prompt=prompt, audio=[data], temperature=temperature, max_tokens=info.max_output_len or None,
              stream=streamed, strip_prefix=True)
    rid = uuid.uuid4().hex
    if not streamed:
        answer = await collect(request, triton.generate(job, rid))
        if fmt == "verbose_json":  # one segment: the clip
            seconds = _seconds(data)
            return _verbose(answer.text, seconds, [_segment(0, 0.0, seconds, answer.text, [], temperature)])
        return PlainTextResponse(answer.text) if fmt == "text" else {"text": answer.text}

    async def events(pieces: AsyncIterator[Piece]):
        answer = Answer()
        async for text in deltas(pieces, answer):
            yield {"type": "transcript.text.delta", "delta": text}
        yield {"type": "transcript.text.done", "text": answer.text}

    return await stream(triton.generate(job, rid), events)


def _seconds(data: bytes) -> float:
    try:
        return float(sf.info(io.BytesIO(data)).duration)
    except (sf.SoundFileError, RuntimeError):
        return 0.0


def _segment(i: int, start: float, end: float, text: str, ids: list[int], temperature: float | None) -> dict:
    """A verbose_json segment. AF3's ensemble returns no log-probabilities, so avg_logprob and no_speech_prob,
    which OpenAI's segments carry, are left out rather than made up; compression_ratio is Whisper's (text bytes
    over their zlib size)."""
    raw = text.encode()
    return {"id": i, "seek": round(start * 100), "start": round(start, 3), "end": round(end, 3), "text": text,
            "tokens": ids, "temperature": temperature or 0.0,
            "compression_ratio": round(len(raw) / len(zlib.compress(raw)), 3) if raw else 0.0}


def _verbose(text: str, seconds: float, segments: list[dict]) -> dict:
    # language "und" (ISO 639-2: undetermined): AF3 neither takes nor reports a language.
    return {"task": "transcribe", "language": "und", "duration": round(seconds, 3), "text": text,
            "segments": segments, "usage": {"type": "duration", "seconds": round(seconds, 3)}}


async def _long_form(request: Request, upload: UploadFile, chunking: longform.Chunking, fmt: str, streamed: bool,
                     prompt: str, temperature: float | None):
    triton, conf = request.app.state.triton, settings(request)
    info = await triton.info()
    limit = conf.max_transcription_seconds
    try:  # the header's length is checked here; a stream that runs past it is stopped while reading
        upload.file.seek(0)
        audio = open_audio(upload.file, limit)
    except AudioError as e:
        code = "audio_too_long" if "limit" in str(e) else None
        raise APIError(400, f"file: {e} (this server's --max-transcription-seconds is {limit:g})"
                       if code else f"file: {e}", param="file", code=code) from None
    seconds = audio.frames / audio.samplerate

    async def run(span: longform.Span) -> AsyncIterator[Piece]:
        job = Job(prompt=prompt, audio=[longform.wav_bytes(span.wave)], temperature=temperature,
                  max_tokens=info.max_output_len or None, stream=streamed, strip_prefix=True)
        async for piece in triton.generate(job, uuid.uuid4().hex):
            yield piece

    async def events() -> AsyncIterator[tuple[str, Any]]:
        """("delta", text) as it may be sent, ("segment", segment) as each piece ends."""
        joiner, ids, current = longform.Joiner(), [], None
        spans = longform.aiter_thread(longform.split(iter_mono_16k(audio, limit), chunking))
        try:
            async for span, piece in longform.ordered(spans, run, conf.transcription_concurrency):
                if span is not current:
                    current, ids, mark = span, [], len(joiner.text)
                    joiner.next_piece()
                if piece is None:  # the span is over
                    yield "segment", _segment(span.index, span.start / SAMPLE_RATE, span.end / SAMPLE_RATE,
                                              joiner.text[mark:].strip(), ids, temperature)
                    continue
                ids += piece.ids
                if out := joiner.feed(piece.text):
                    yield "delta", out
        except AudioError as e:
            raise APIError(400, f"file: {e}", param="file",
                           code="audio_too_long" if "limit" in str(e) else None) from None
        finally:
            audio.close()
        yield "done", joiner.text

    if streamed:
        async def sse(evs):
            async for kind, value in evs:
                if kind == "delta":
                    yield {"type": "transcript.text.delta", "delta": value}
                elif kind == "done":
                    yield {"type": "transcript.text.done", "text": value}

        return await stream(events(), sse)

    async def whole() -> tuple[str, list[dict]]:
        segments, text = [], ""
        async for kind, value in events():
            if kind == "segment":
                segments.append(value)
            elif kind == "done":
                text = value
        return text, segments

    task = asyncio.ensure_future(whole())
    watcher = asyncio.ensure_future(watch_disconnect(request, task))
    try:
        text, segments = await task
    finally:
        watcher.cancel()
    if fmt == "verbose_json":
        return _verbose(text, seconds, segments)
    return PlainTextResponse(text) if fmt == "text" else {"text": text}
