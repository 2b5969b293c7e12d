"""Conversations: the `messages` request input, parsed and checked, ready for the checkpoint's chat template.

A request is either the one-turn shorthand (`text_input`, optional `system_prompt`, its clips placed before the
text) or a conversation in `messages`, UTF-8 JSON:

    [{"role": "system",    "content": "You are terse."},
     {"role": "user",      "content": [{"type": "audio", "audio_index": 0}, {"type": "text", "text": "What is it?"}]},
     {"role": "assistant", "content": "A dog barking."},
     {"role": "user",      "content": "Why do you think so?"}]

Audio parts name clips of the request's `audio` input by position. Every clip must be referenced (a clip sent and
never used is a client mistake we report, not one we hide); a clip may be referenced more than once. The template
receives the messages as AudioFlamingo3Processor.apply_chat_template gives them to it (roles, string or part-list
contents, audio parts as {"type": "audio", ...}), so the rendered text is the processor's. Errors are
PromptError with the message and part they concern; they become that request's error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from af3trt.runtime.stages.errors import InvalidRequest

AUDIO_TOKEN = "<sound>"
ROLES = ("system", "user", "assistant")


class PromptError(InvalidRequest):
    """A request that cannot become a decoder prompt (over-long, bad parameters, a malformed conversation, …)."""


@dataclass(frozen=True)
class Audio:
    """An audio part: the clip at this position of the request's `audio` input."""

    index: int


Part = str | Audio


@dataclass(frozen=True)
class Message:
    role: str  # system | user | assistant
    content: str | tuple[Part, ...]  # a string, or parts in order (text strings and audio references)

    def audio(self) -> list[int]:
        return [] if isinstance(self.content, str) else [p.index for p in self.content if isinstance(p, Audio)]


@dataclass(frozen=True)
class Conversation:
    messages: tuple[Message, ...]

    def audio_order(self) -> list[int]:
        """Clip indices in the order their audio parts appear."""
        return [k for m in self.messages for k in m.audio()]

    def audio_per_message(self) -> list[int]:
        """Number of audio parts of each message that has any, in order."""
        return [len(m.audio()) for m in self.messages if m.audio()]

    def template_messages(self) -> list[dict]:
        """The messages as the chat template sees them from AudioFlamingo3Processor.apply_chat_template."""
        out = []
        for m in self.messages:
            if isinstance(m.content, str):
                out.append({"role": m.role, "content": m.content})
            else:
                out.append({"role": m.role, "content": [
                    {"type": "audio", "audio": f"clip {p.index}", "audio_index": p.index} if isinstance(p, Audio)
                    else {"type": "text", "text": p} for p in m.content]})
        return out


def shorthand(prompt: str, system_prompt: str | None, n_clips: int) -> Conversation:
    """text_input + system_prompt: one user turn, its clips before the text (AF3's single-turn layout)."""
    _no_placeholder(prompt, "text_input")
    if system_prompt:
        _no_placeholder(system_prompt, "system_prompt")
    user = Message("user", tuple(Audio(k) for k in range(n_clips)) + (prompt,)) if n_clips else Message("user", prompt)
    return Conversation(((Message("system", system_prompt),) if system_prompt else ()) + (user,))


def parse(data: str | bytes, n_clips: int) -> Conversation:
    """`messages` JSON → a checked Conversation whose audio parts cover clips 0..n_clips-1."""
    try:
        raw = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise PromptError(f"messages is not valid JSON: {e}") from None
    if not isinstance(raw, list) or not raw:
        raise PromptError("messages must be a non-empty JSON list of {role, content} objects")
    messages = tuple(_message(i, m, n_clips) for i, m in enumerate(raw))
    _check_order(messages)
    conv = Conversation(messages)
    unused = sorted(set(range(n_clips)) - set(conv.audio_order()))
    if unused:
        raise PromptError(f"audio clip{'s' if len(unused) > 1 else ''} {', '.join(map(str, unused))} of {n_clips} "
                          f"{'are' if len(unused) > 1 else 'is'} never referenced by an audio part of messages")
    return conv


def _message(i: int, m, n_clips: int) -> Message:
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise PromptError(f"{where} must be an object with role and content, got {type(m).__name__}")
    extra = sorted(set(m) - {"role", "content"})
    if extra:
        raise PromptError(f"{where} has unknown keys {extra} (only role and content)")
    role = m.get("role")
    if role not in ROLES:
        raise PromptError(f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}")
    content = m.get("content")
    if isinstance(content, str):
        if not content.strip():
            raise PromptError(f"{where} ({role}) has empty content")
        _no_placeholder(content, f"{where}.content")
        return Message(role, content)
    if not isinstance(content, list):
        raise PromptError(f"{where}.content must be a string or a list of parts, got "
                          f"{'nothing' if content is None else type(content).__name__}")
    parts = tuple(_part(f"{where}.content[{j}]", p, n_clips) for j, p in enumerate(content))
    if not any(isinstance(p, Audio) or p.strip() for p in parts):
        raise PromptError(f"{where} ({role}) has empty content")
    if role != "user" and any(isinstance(p, Audio) for p in parts):
        raise PromptError(f"{where}: audio parts are allowed in user messages only, not {role}")
    return Message(role, parts)


def _part(where: str, p, n_clips: int) -> Part:
    if not isinstance(p, dict):
        raise PromptError(f"{where} must be an object, got {type(p).__name__}")
    kind = p.get("type")
    if kind == "text":
        if set(p) != {"type", "text"} or not isinstance(p["text"], str):
            raise PromptError(f'{where}: a text part is {{"type": "text", "text": string}}')
        _no_placeholder(p["text"], where)
        return p["text"]
    if kind == "audio":
        k = p.get("audio_index")
        if set(p) != {"type", "audio_index"} or not isinstance(k, int) or isinstance(k, bool):
            raise PromptError(f'{where}: an audio part is {{"type": "audio", "audio_index": integer}}')
        if not 0 <= k < n_clips:
            raise PromptError(f"{where}: audio_index {k} is out of range: the request has {n_clips} audio clip"
                              f"{'' if n_clips == 1 else 's'}")
        return Audio(k)
    raise PromptError(f'{where}.type must be "text" or "audio", got {kind!r}')


def _check_order(messages: tuple[Message, ...]) -> None:
    """An optional system message first, then user and assistant alternating, ending with the user."""
    turns = messages[1:] if messages[0].role == "system" else messages
    for i, m in enumerate(turns):
        n = i + len(messages) - len(turns)
        want = "user" if i % 2 == 0 else "assistant"
        if m.role != want:
            what = "only the first message may be a system message" if m.role == "system" else \
                f"expected a {want} message (user and assistant alternate, starting with user)"
            raise PromptError(f"messages[{n}]: role {m.role} out of order: {what}")
    if not turns:
        raise PromptError("messages has no user message")
    if turns[-1].role != "user":
        raise PromptError("the last message must be from the user (the answer is the assistant's next turn)")


def _no_placeholder(text: str, where: str) -> None:
    if AUDIO_TOKEN in text:
        raise PromptError(f"{where} may not contain {AUDIO_TOKEN}: send audio as clips and audio parts")


# NVIDIA audio-flamingo README, stage 3.5 (--think-mode): a prompt asks AF3 to think by ending with this sentence,
# after a space ("What are the two people doing in the audio? Please think and reason about the input audio before
# you respond.").
THINK_SUFFIX = "Please think and reason about the input audio before you respond."


def with_think_suffix(conv: Conversation) -> Conversation:
    """The conversation of a thinking request: THINK_SUFFIX ends the text of the LAST user message (the turn being
    answered), after a space when that text does not already end in whitespace; earlier turns are unchanged. In a
    part list the suffix joins the last text part (AF3's template concatenates a message's text parts), or is added
    as a text part after the audio when the message has none."""
    last = max((i for i, m in enumerate(conv.messages) if m.role == "user"), default=None)
    if last is None:
        raise PromptError("a thinking request needs a user message")
    m = conv.messages[last]

    def sep(text: str) -> str:
        return " " if text and not text[-1].isspace() else ""

    if isinstance(m.content, str):
        content: str | tuple[Part, ...] = m.content + sep(m.content) + THINK_SUFFIX
    else:
        parts = list(m.content)
        texts = [i for i, p in enumerate(parts) if isinstance(p, str)]
        if texts:
            full = "".join(parts[i] for i in texts)  # what the template renders for this message
            parts[texts[-1]] += sep(full) + THINK_SUFFIX
        else:
            parts.append(THINK_SUFFIX)
        content = tuple(parts)
    return Conversation(conv.messages[:last] + (Message(m.role, content),) + conv.messages[last + 1:])
