"""POST /v1/chat/completions: OpenAI messages with text and input_audio parts (base64 wav/mp3/flac/ogg) → one
request to the af3 ensemble; the whole answer, or chat.completion.chunk events (stream)."""

from __future__ import annotations

import base64
import binascii
import json
import time
import uuid
from typing import AsyncIterator, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from af3trt.runtime.client.library import Request as Job
from af3trt.runtime.stages import guided
from af3trt.runtime.stages.contract import GUIDE_TYPE, IGNORE_EOS, MESSAGES, MIN_TOKENS, THINKING
from af3trt.runtime.openai.common import (APIError, Answer, Piece, check_audio, check_model, collect, deltas, settings,
                                          stream)
from af3trt.runtime.openai.triton import EnsembleInfo

AUDIO_FORMATS = ("wav", "mp3", "flac", "ogg")

router = APIRouter()


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


class ChatTemplateKwargs(_Model):
    enable_thinking: bool | None = None  # vLLM / SGLang's spelling for hybrid-thinking models (Qwen3)


class JsonSchemaFormat(_Model):
    """OpenAI's response_format.json_schema: the schema (a JSON schema object) under a name."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    schema_: dict | bool | None = Field(default=None, alias="schema")
    # OpenAI's strict: true makes the answer follow the schema exactly; here every schema is enforced (a grammar
    # over the whole answer: docs/structured-output.md), so strict false asks for no less
    strict: bool | None = None


class ResponseFormat(_Model):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(_Model):
    """vLLM's `structured_outputs` (one of json, regex, choice, grammar)."""

    json_: dict | bool | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None


# OpenAI's reasoning_effort values; AF3's thinking is on or off (docs/thinking.md): low/medium/high turn it on,
# none/minimal leave it off.
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high")
THINKING_EFFORTS = ("low", "medium", "high")


class ChatRequest(_Model):
    model: str
    messages: list[Message] = Field(min_length=1)
    # token counts travel to the ensemble as INT32 tensors: a larger one overflowed in the cast and answered 500
    # (found by af3trt fuzz, perf/fuzz.py); a negative one is refused downstream, here before any work
    max_tokens: int | None = Field(default=None, ge=0, lt=2**31)
    max_completion_tokens: int | None = Field(default=None, ge=0, lt=2**31)
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = Field(default=None, ge=0, lt=2**64)
    stop: str | list[str] | None = None
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # not OpenAI's, but what vLLM and TensorRT-LLM's servers take and AIPerf sends for fixed-length runs
    # (`--extra-inputs ignore_eos:true`, `min_tokens:N`): the ensemble's inputs of those names
    ignore_eos: bool | None = None
    min_tokens: int | None = Field(default=None, ge=0, lt=2**31)
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = None
    chat_template_kwargs: ChatTemplateKwargs | None = None
    # structured output: OpenAI's response_format, vLLM's structured_outputs, or vLLM's earlier guided_* extras
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict | bool | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None


def thinking_of(req: ChatRequest) -> bool:
    """AF3's thinking mode for a request: reasoning_effort (OpenAI's parameter) or chat_template_kwargs.
    enable_thinking (vLLM's); 400 when both are given and disagree."""
    by_effort = None if req.reasoning_effort is None else req.reasoning_effort in THINKING_EFFORTS
    by_kwargs = req.chat_template_kwargs.enable_thinking if req.chat_template_kwargs else None
    if by_effort is not None and by_kwargs is not None and by_effort != by_kwargs:
        raise APIError(400, f"reasoning_effort={req.reasoning_effort!r} and chat_template_kwargs.enable_thinking="
                            f"{str(by_kwargs).lower()} disagree; give one", param="reasoning_effort")
    return bool(by_effort or by_kwargs)


JSON_OBJECT = '{"type": "object"}'


def guide_of(req: ChatRequest) -> tuple[str, str, str] | None:
    """The request's guide as the ensemble's (guide_type, guide), and the parameter it came from; None without one.
    400 when more than one is given, or one is malformed (the schema, regex or grammar itself is checked by the
    grammar engine, in fusion or the decoder)."""
    given = []  # (guide_type, guide, parameter)
    rf = req.response_format
    if rf is not None and rf.type == "json_object":  # OpenAI's "a valid JSON object": the schema of any object
        given.append(("json_schema", JSON_OBJECT, "response_format"))
    elif rf is not None and rf.type == "json_schema":
        if rf.json_schema is None or rf.json_schema.schema_ is None:
            raise APIError(400, "response_format json_schema needs json_schema.schema", param="response_format")
        given.append(("json_schema", json.dumps(rf.json_schema.schema_), "response_format"))
    so = req.structured_outputs or StructuredOutputs()
    for kind, name, new, old in (("json_schema", "json", so.json_, req.guided_json),
                                 ("regex", "regex", so.regex, req.guided_regex),
                                 ("choice", "choice", so.choice, req.guided_choice),
                                 ("grammar", "grammar", so.grammar, req.guided_grammar)):
        for param, value in ((f"structured_outputs.{name}", new), (f"guided_{name}", old)):
            if value is not None:
                text = value if isinstance(value, str) and kind != "choice" else json.dumps(value)
                given.append((kind, text, param))
    if len(given) > 1:
        raise APIError(400, f"give one guide, not {len(given)} ({', '.join(g[2] for g in given)})",
                       param=given[1][2])
    if not given:
        return None
    kind, text, param = given[0]
    try:
        guided.from_request(kind, text)
    except guided.GuideError as e:
        raise APIError(400, f"{param}: {e}", param=param) from None
    return given[0]


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
    for name in (IGNORE_EOS, MIN_TOKENS):
        if getattr(req, name) is not None and name not in info.inputs:
            raise APIError(400, f"{name}: this model repository predates it (rebuild it with this version of af3trt)",
                           param=name)
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
              stream=req.stream, min_tokens=req.min_tokens, ignore_eos=req.ignore_eos)
    guide = guide_of(req)
    if guide is not None:
        job.guide_type, job.guide, param = guide
        if GUIDE_TYPE not in info.inputs:
            raise APIError(400, f"{param}: this model repository predates structured output (rebuild it with this "
                                f"version of af3trt)", param=param)
        try:
            guided.check_combination(guided.from_request(job.guide_type, job.guide), thinking=thinking_of(req),
                                     ignore_eos=bool(req.ignore_eos), min_tokens=req.min_tokens or 0)
        except guided.GuideError as e:
            raise APIError(400, str(e), param=param) from None
    if thinking_of(req):
        if THINKING not in info.inputs:
            raise APIError(400, "this model repository has no thinking input (rebuild it with this version of "
                                "af3trt, from a checkpoint with think/)", param="reasoning_effort")
        job.thinking = True
    if MESSAGES in info.inputs:
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


def stops_of(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > 4 or any(not s for s in stops):
        raise APIError(400, "stop takes up to 4 non-empty strings", param="stop")
    return stops


def usage(answer: Answer) -> dict:
    if answer.prompt_tokens < 0:
        raise APIError(500, "the ensemble did not report the prompt length (prompt_tokens output missing: rebuild "
                            "the model repository)")
    return {"prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.n_ids,
            "total_tokens": answer.prompt_tokens + answer.n_ids}


@router.post("/v1/chat/completions")
async def chat(body: ChatRequest, request: Request):
    check_model(request, body.model)
    triton = request.app.state.triton
    info = await triton.info()
    stops = stops_of(body.stop)
    job = build_job(body, info)
    rid = uuid.uuid4().hex
    head = {"id": f"chatcmpl-{rid}", "created": int(time.time()), "model": settings(request).model_id}

    def finish_reason(answer: Answer) -> str:
        return "stop" if answer.stopped or job.max_tokens is None or answer.n_ids < job.max_tokens else "length"

    if not body.stream:
        answer = await collect(request, triton.generate(job, rid), stops)
        return {**head, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.text},
                             "finish_reason": finish_reason(answer), "logprobs": None}],
                "usage": usage(answer)}

    def chunk(delta: dict, reason: str | None = None) -> dict:
        return {**head, "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}]}

    async def events(pieces: AsyncIterator[Piece]):
        answer = Answer()
        yield chunk({"role": "assistant", "content": ""})
        async for text in deltas(pieces, answer, stops):
            yield chunk({"content": text})
        yield chunk({}, finish_reason(answer))
        if body.stream_options and body.stream_options.include_usage:
            yield {**head, "object": "chat.completion.chunk", "choices": [], "usage": usage(answer)}

    return await stream(triton.generate(job, rid), events, done="[DONE]")
