"""The OpenAI Realtime API's events as this server speaks them: the client events it reads, checked, and the server
events it writes (OpenAI's GA shapes, as the `openai` package's realtime client sends and parses them). Plain data, no
I/O: the session (runtime/openai/realtime_session.py) acts on what is parsed here.

What AF3 can do is text out of audio and text in: the session's `output_modalities` is ["text"]; there are no tools,
no audio out, no voices. A field that would change what the server does and that it cannot honour is an error event
naming it, never silently dropped; `audio.output` (voice, format) is accepted and unused, there being no audio out.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field, replace

from af3trt.runtime.stages import live
from af3trt.runtime.stages.live import InputFormat, VadConfig

MAX_EVENT_BYTES = 16 * 2**20  # a WebSocket message; OpenAI's limit for an append is 15 MiB of base64
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high")
THINKING_EFFORTS = ("low", "medium", "high")  # as /v1/chat/completions' reasoning_effort (docs/thinking.md)
DEFAULT_FORMAT = InputFormat("pcm16", 24000)  # OpenAI's default input


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def event(kind: str, **fields) -> dict:
    """A server event: its type, a fresh event_id, its fields."""
    return {"type": kind, "event_id": new_id("event"), **fields}


class EventError(Exception):
    """What the client sent cannot be done: answered with an `error` event (the session goes on)."""

    def __init__(self, message: str, code: str | None = None, param: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.code, self.param, self.kind = message, code, param, kind
        self.client_event_id: str | None = None  # the client event it answers, when known

    def event(self, client_event_id: str | None = None) -> dict:
        """OpenAI's error event: {"type": "error", "error": {type, code, message, param, event_id}}; event_id there
        is the client event that caused it."""
        return event("error", error={"type": self.kind, "code": self.code, "message": self.message,
                                     "param": self.param, "event_id": client_event_id or self.client_event_id})


def _fields(value, allowed: set[str], where: str) -> dict:
    if not isinstance(value, dict):
        raise EventError(f"{where} must be an object, got {type(value).__name__}", param=where)
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise EventError(f"{where}: unsupported field(s) {', '.join(unknown)}", code="unknown_parameter",
                         param=f"{where}.{unknown[0]}")
    return value


def _typed(value, kind, where: str):
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise EventError(f"{where} must be {getattr(kind, '__name__', kind)}, got {value!r}", param=where)
    return value


# ---------------------------------------------------------------------------------------------- client events

CLIENT_EVENTS = ("session.update", "input_audio_buffer.append", "input_audio_buffer.commit",
                 "input_audio_buffer.clear", "conversation.item.create", "conversation.item.delete",
                 "conversation.item.retrieve", "response.create", "response.cancel")
EVENT_FIELDS = {"session.update": {"session"}, "input_audio_buffer.append": {"audio"},
                "input_audio_buffer.commit": set(), "input_audio_buffer.clear": set(),
                "conversation.item.create": {"item", "previous_item_id"}, "conversation.item.delete": {"item_id"},
                "conversation.item.retrieve": {"item_id"}, "response.create": {"response"},
                "response.cancel": {"response_id"}}
NOT_HERE = {"conversation.item.truncate": "truncates audio the server sent; this server sends none",
            "output_audio_buffer.clear": "clears audio output (WebRTC); this server sends none"}


def parse_event(message: str | bytes) -> tuple[str, str | None, dict]:
    """A client message → (type, its event_id, the event). EventError for what is not a client event this server
    takes (the error names the event's id when it could be read)."""
    if isinstance(message, bytes):
        raise EventError("binary WebSocket messages are not events: send each event as JSON text", code="invalid_event")
    try:
        ev = json.loads(message)
    except ValueError as e:
        raise EventError(f"the message is not valid JSON ({e})", code="invalid_json") from None
    if not isinstance(ev, dict) or not isinstance(ev.get("type"), str):
        raise EventError("an event is a JSON object with a string `type`", code="invalid_event", param="type")
    kind, eid = ev["type"], ev.get("event_id")
    eid = eid if isinstance(eid, str) else None
    try:
        if kind in NOT_HERE:
            raise EventError(f"{kind}: {NOT_HERE[kind]}", code="unsupported_event", param="type")
        if kind not in CLIENT_EVENTS:
            raise EventError(f"unknown event type {kind!r}; this server takes {', '.join(CLIENT_EVENTS)}",
                             code="invalid_event", param="type")
        _fields(ev, EVENT_FIELDS[kind] | {"type", "event_id"}, kind)
    except EventError as e:
        e.client_event_id = eid
        raise
    return kind, eid, ev


# ---------------------------------------------------------------------------------------------- the session


@dataclass(frozen=True)
class SessionConfig:
    """A session as session.update left it: "realtime" (answers) or "transcription" (a transcript per turn)."""

    kind: str = "realtime"
    model: str = ""
    instructions: str = ""
    fmt: InputFormat = DEFAULT_FORMAT
    vad: VadConfig | None = field(default_factory=VadConfig)
    max_output_tokens: int | None = None  # None: "inf", the build's max_output_len
    reasoning: str | None = None  # OpenAI's reasoning.effort
    transcription_prompt: str | None = None  # transcription: replaces AF3's transcription instruction
    metadata: dict | None = None

    @property
    def thinking(self) -> bool:
        return self.reasoning in THINKING_EFFORTS

    def describe(self, session_id: str) -> dict:
        """OpenAI's session object."""
        vad = None if self.vad is None else {
            "type": "server_vad", "threshold": self.vad.threshold, "prefix_padding_ms": self.vad.prefix_padding_ms,
            "silence_duration_ms": self.vad.silence_duration_ms, "create_response": self.vad.create_response,
            "interrupt_response": self.vad.interrupt_response, "idle_timeout_ms": None}
        audio_in = {"format": self.fmt.describe(), "turn_detection": vad, "noise_reduction": None}
        if self.kind == "transcription":
            audio_in["transcription"] = {"model": self.model, "prompt": self.transcription_prompt}
            return {"type": "transcription", "id": session_id, "object": "realtime.transcription_session",
                    "audio": {"input": audio_in}, "include": None}
        audio_in["transcription"] = None
        return {"type": "realtime", "id": session_id, "object": "realtime.session", "model": self.model,
                "output_modalities": ["text"], "instructions": self.instructions, "tools": [],
                "tool_choice": "auto", "max_output_tokens": "inf" if self.max_output_tokens is None
                else self.max_output_tokens, "audio": {"input": audio_in}, "tracing": None, "truncation": "disabled",
                "reasoning": None if self.reasoning is None else {"effort": self.reasoning}}


def _turn_detection(value) -> VadConfig | None:
    if value is None:
        return None
    where = "session.audio.input.turn_detection"
    v = _fields(value, {"type", "threshold", "prefix_padding_ms", "silence_duration_ms", "create_response",
                        "interrupt_response", "idle_timeout_ms", "eagerness"}, where)
    if v.get("type") != "server_vad":
        raise EventError(f"{where}.type {v.get('type')!r}: this server detects turns by voice activity "
                         "('server_vad') or not at all (turn_detection null)", param=f"{where}.type")
    if v.get("idle_timeout_ms") is not None:
        raise EventError(f"{where}.idle_timeout_ms: not supported (a turn is committed by speech or by the client)",
                         param=f"{where}.idle_timeout_ms")
    if "eagerness" in v:
        raise EventError(f"{where}.eagerness belongs to semantic_vad", param=f"{where}.eagerness")
    d = VadConfig()
    cfg = VadConfig(threshold=float(_typed(v.get("threshold", d.threshold), (int, float), f"{where}.threshold")),
                    prefix_padding_ms=_typed(v.get("prefix_padding_ms", d.prefix_padding_ms), int,
                                             f"{where}.prefix_padding_ms"),
                    silence_duration_ms=_typed(v.get("silence_duration_ms", d.silence_duration_ms), int,
                                               f"{where}.silence_duration_ms"),
                    create_response=_typed(v.get("create_response", d.create_response), bool,
                                           f"{where}.create_response"),
                    interrupt_response=_typed(v.get("interrupt_response", d.interrupt_response), bool,
                                              f"{where}.interrupt_response"))
    if not 0.0 <= cfg.threshold <= 1.0 or cfg.prefix_padding_ms < 0 or not 0 < cfg.silence_duration_ms <= 10_000:
        raise EventError(f"{where}: threshold is 0..1, prefix_padding_ms >= 0, silence_duration_ms 1..10000",
                         param=where)
    return cfg


def _audio_input(cfg: SessionConfig, value, transcription: bool) -> SessionConfig:
    where = "session.audio.input"
    v = _fields(value, {"format", "turn_detection", "transcription", "noise_reduction"}, where)
    if v.get("noise_reduction") is not None:
        raise EventError(f"{where}.noise_reduction: not supported (AF3 hears the audio as sent)",
                         param=f"{where}.noise_reduction")
    if "format" in v:
        try:
            cfg = replace(cfg, fmt=live.parse_format(v["format"]))
        except ValueError as e:
            raise EventError(str(e), code="invalid_audio_format", param=f"{where}.format") from None
    if "turn_detection" in v:
        cfg = replace(cfg, vad=_turn_detection(v["turn_detection"]))
    t = v.get("transcription")
    if t is not None:
        if not transcription:
            raise EventError(f"{where}.transcription: input transcription in a realtime session is not supported; "
                             "open a transcription session (session.type 'transcription')",
                             param=f"{where}.transcription")
        t = _fields(t, {"model", "prompt", "language", "languages", "keywords", "delay"}, f"{where}.transcription")
        for name in ("language", "languages", "keywords", "delay"):
            if t.get(name) not in (None, [], ""):
                raise EventError(f"{where}.transcription.{name}: AF3 takes no {name} hint",
                                 param=f"{where}.transcription.{name}")
        if t.get("prompt") is not None:
            cfg = replace(cfg, transcription_prompt=_typed(t["prompt"], str, f"{where}.transcription.prompt") or None)
        if t.get("model") is not None:
            cfg = replace(cfg, model=_typed(t["model"], str, f"{where}.transcription.model"))
    return cfg


def max_tokens_of(value, where: str) -> int | None:
    """OpenAI's max_output_tokens: an integer 1..4096 or "inf" (None: the build's max_output_len)."""
    if value == "inf" or value is None:
        return None
    _typed(value, int, where)
    if not 1 <= value <= 4096:
        raise EventError(f"{where} must be in 1..4096 or 'inf', got {value}", param=where)
    return value


def reasoning_of(value, where: str) -> str | None:
    if value is None:
        return None
    v = _fields(value, {"effort"}, where)
    effort = v.get("effort")
    if effort not in REASONING_EFFORTS:
        raise EventError(f"{where}.effort must be one of {', '.join(REASONING_EFFORTS)}", param=f"{where}.effort")
    return effort


def update_session(cfg: SessionConfig, session, served_model: str, fresh: bool = False) -> SessionConfig:
    """session.update's `session` applied to cfg. EventError for what this server cannot do. The session's type is
    set by the first update (fresh: nothing heard or added yet), and cannot change after."""
    s = _fields(session, {"type", "model", "instructions", "output_modalities", "audio", "max_output_tokens",
                          "tools", "tool_choice", "reasoning", "tracing", "truncation", "include", "prompt",
                          "parallel_tool_calls", "metadata"}, "session")
    kind = s.get("type", cfg.kind)
    if kind not in ("realtime", "transcription"):
        raise EventError(f"session.type {kind!r}: 'realtime' or 'transcription'", param="session.type")
    if kind != cfg.kind and fresh:
        cfg = SessionConfig(kind=kind, model=cfg.model)
    if kind != cfg.kind:
        raise EventError(f"session.type is {cfg.kind!r}; a session's type cannot change (open another session)",
                         param="session.type")
    model = s.get("model")
    if model is not None and model != served_model:
        raise EventError(f"model {model!r} does not exist; this server serves {served_model!r}", code="model_not_found",
                         param="session.model")
    transcription = kind == "transcription"
    for name in sorted(set(s) - {"type", "audio", "include"} if transcription else ()):
        raise EventError(f"session.{name}: not a field of a {kind} session", param=f"session.{name}")
    if s.get("output_modalities") not in (None, ["text"]):
        raise EventError("session.output_modalities: this server answers in text (['text']): AF3 has no audio out",
                         param="session.output_modalities")
    if s.get("tools") not in (None, []) or s.get("tool_choice") not in (None, "auto", "none"):
        raise EventError("session.tools: not supported (AF3 calls no tools)", param="session.tools")
    for name in ("tracing", "prompt", "include"):
        if s.get(name) not in (None, []):
            raise EventError(f"session.{name}: not supported by this server", param=f"session.{name}")
    if s.get("truncation") not in (None, "disabled"):
        raise EventError("session.truncation: this server does not truncate conversations ('disabled'); a "
                         "conversation holds at most the build's audio", param="session.truncation")
    if "instructions" in s:
        cfg = replace(cfg, instructions=_typed(s["instructions"] or "", str, "session.instructions"))
    if "max_output_tokens" in s:
        cfg = replace(cfg, max_output_tokens=max_tokens_of(s["max_output_tokens"], "session.max_output_tokens"))
    if "reasoning" in s:
        cfg = replace(cfg, reasoning=reasoning_of(s["reasoning"], "session.reasoning"))
    if "metadata" in s:
        cfg = replace(cfg, metadata=s["metadata"])
    audio = s.get("audio")
    if audio is not None:
        a = _fields(audio, {"input"} if transcription else {"input", "output"}, "session.audio")
        if a.get("input") is not None:
            cfg = _audio_input(cfg, a["input"], transcription)
    return cfg


# ---------------------------------------------------------------------------------------------- conversation items


@dataclass
class Part:
    """One content part of an item: text, or a clip (the client's audio as a WAV) with its length."""

    text: str | None = None
    clip: bytes | None = None
    seconds: float = 0.0
    windows: int = 0  # 30-s windows of the clip (what it costs the request)
    transcript: str | None = None


@dataclass
class Item:
    """A conversation item: a message of a role with its parts."""

    id: str
    role: str  # user | assistant | system
    parts: list[Part]
    status: str = "completed"

    def describe(self) -> dict:
        """OpenAI's item object (audio is not echoed back)."""
        content = []
        for p in self.parts:
            if p.clip is not None:
                content.append({"type": "input_audio", "transcript": p.transcript})
            elif self.role == "assistant":
                content.append({"type": "output_text", "text": p.text})
            else:
                content.append({"type": "input_text", "text": p.text})
        return {"id": self.id, "object": "realtime.item", "type": "message", "status": self.status, "role": self.role,
                "content": content}


def parse_item(value, audio_part) -> Item:
    """conversation.item.create's item → an Item. audio_part(base64 str, where) → a Part holding the clip (the
    session decodes it in its input format)."""
    where = "item"
    v = _fields(value, {"id", "type", "object", "status", "role", "content"}, where)
    if v.get("type") != "message":
        raise EventError(f"item.type {v.get('type')!r}: this server takes message items (it calls no functions)",
                         param="item.type")
    role = v.get("role")
    if role not in ("user", "assistant", "system"):
        raise EventError(f"item.role {role!r}: user, assistant or system", param="item.role")
    content = v.get("content")
    if not isinstance(content, list) or not content:
        raise EventError("item.content must be a non-empty list of parts", param="item.content")
    text_type = {"user": ("input_text",), "system": ("input_text",), "assistant": ("output_text", "text")}[role]
    parts = []
    for i, c in enumerate(content):
        w = f"item.content[{i}]"
        c = _fields(c, {"type", "text", "audio", "transcript"}, w)
        if c.get("type") in text_type:
            parts.append(Part(text=_typed(c.get("text", ""), str, f"{w}.text")))
        elif c.get("type") == "input_audio" and role == "user":
            parts.append(audio_part(_typed(c.get("audio"), str, f"{w}.audio"), f"{w}.audio"))
        else:
            raise EventError(f"{w}.type {c.get('type')!r}: a {role} item takes {' or '.join(text_type)}"
                             + (" or input_audio" if role == "user" else ""), param=f"{w}.type")
    item_id = v.get("id") or new_id("item")
    return Item(_typed(item_id, str, "item.id"), role, parts)


@dataclass(frozen=True)
class ResponseParams:
    """response.create's `response`: what this answer overrides of the session."""

    instructions: str | None = None
    max_output_tokens: int | None | str = "session"  # "session": the session's
    reasoning: str | None | bool = False  # False: the session's
    metadata: dict | None = None


def parse_response(value) -> ResponseParams:
    if value is None:
        return ResponseParams()
    v = _fields(value, {"instructions", "max_output_tokens", "output_modalities", "conversation", "input", "metadata",
                        "reasoning", "tools", "tool_choice", "audio", "prompt", "parallel_tool_calls"}, "response")
    if v.get("output_modalities") not in (None, ["text"]):
        raise EventError("response.output_modalities: this server answers in text (['text'])",
                         param="response.output_modalities")
    if v.get("conversation") not in (None, "auto"):
        raise EventError("response.conversation: this server answers in the session's conversation ('auto')",
                         param="response.conversation")
    for name in ("input", "tools", "prompt"):
        if v.get(name) not in (None, []):
            raise EventError(f"response.{name}: not supported by this server", param=f"response.{name}")
    return ResponseParams(
        instructions=None if v.get("instructions") is None else _typed(v["instructions"], str, "response.instructions"),
        max_output_tokens=max_tokens_of(v["max_output_tokens"], "response.max_output_tokens")
        if "max_output_tokens" in v else "session",
        reasoning=reasoning_of(v["reasoning"], "response.reasoning") if "reasoning" in v else False,
        metadata=v.get("metadata"))
