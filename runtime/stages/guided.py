"""Structured output: a request's guide (JSON, a JSON schema, a regex, a choice list or a grammar) as the decoder's
guided-decoding inputs, checked once, with the same words wherever it enters (the OpenAI front, fusion, the decoder).

A client names a guide by type and text (the ensemble's `guide_type` and `guide` inputs; the OpenAI front fills them
from `response_format` and vLLM's extras):

    guide_type    guide                                       the answer
    json          (empty)                                     any JSON value
    json_schema   a JSON schema (JSON text)                   JSON that validates against the schema
    regex         a regular expression                        text the expression matches whole
    choice        a JSON list of strings                      exactly one of the strings
    grammar       an EBNF grammar (xgrammar's GBNF dialect)   text the grammar derives from `root`

`from_request` turns that into a `Guide` in the terms of TensorRT-LLM's `tensorrtllm` backend, which fusion sends to
the decoder as `guided_decoding_guide_type` / `guided_decoding_guide` on both targets. The backend knows four guide
types, "json", "json_schema", "regex" and "ebnf_grammar", and **silently ignores any other name** (the request is then
generated unconstrained): NVIDIA/TensorRT-LLM triton_backend/inflight_batcher_llm/src/utils.cc
getGuidedDecodingParamsFromTensors (indexed commit 19290813) maps only those four strings and leaves the request
without GuidedDecodingParams otherwise. So a choice list is sent as the EBNF grammar of its alternatives (`root ::=
"a" | "b"`), and `BACKEND_TYPES` is the only vocabulary the decoder ever sees.

What combines with a guide, decided here once (docs/structured-output.md):
- thinking: refused. AF3's thinking mode (AF-Think, docs/thinking.md) writes free-form reasoning before its answer,
  with no token or marker where the answer begins; a guide applies to the whole output from its first token, so it
  would constrain the reasoning itself (the reasoning is what the mode is for). Ask for thinking and a structured
  answer in two requests (the second with the first's answer in the conversation) instead.
- ignore_eos: refused. A guide ends the answer where its grammar is complete, by allowing only end ids there; an
  answer that may not end has no token left to choose.
- min_tokens > 0: refused, for the same reason (the end id is masked while the grammar allows nothing else).
- max_tokens: not checked against the guide. An answer cut by max_tokens before its grammar is complete is returned
  as it is, with finish_reason "length" (OpenAI's documented meaning: the JSON may be incomplete).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from af3trt.runtime.stages.errors import InvalidRequest

# The request's names (the ensemble's guide_type input) → the decoder's (TensorRT-LLM's guide types).
REQUEST_TYPES = ("json", "json_schema", "regex", "choice", "grammar")
JSON, JSON_SCHEMA, REGEX, EBNF = "json", "json_schema", "regex", "ebnf_grammar"
BACKEND_TYPES = (JSON, JSON_SCHEMA, REGEX, EBNF)  # utils.cc guideTypeMapping's keys, no others
MAX_GUIDE_BYTES = 1 << 20  # a larger guide is refused before any compilation


class GuideError(InvalidRequest):
    """A guide that cannot be used: unknown type, missing or malformed text, a schema, regex or grammar the grammar
    engine cannot compile or that admits no answer, or a combination this server refuses (module docstring)."""


@dataclass(frozen=True)
class Guide:
    """One request's guide in the decoder's terms: kind is one of BACKEND_TYPES; text is "" for json."""

    kind: str
    text: str = ""

    def __post_init__(self):
        if self.kind not in BACKEND_TYPES:
            raise GuideError(f"guided_decoding_guide_type must be one of {', '.join(BACKEND_TYPES)}, got {self.kind!r}")
        if self.kind == JSON and self.text:
            raise GuideError("a json guide takes no guide text (use json_schema for a schema)")
        if self.kind != JSON and not self.text.strip():
            raise GuideError(f"a {self.kind} guide needs its guide text")
        if len(self.text.encode()) > MAX_GUIDE_BYTES:
            raise GuideError(f"the guide is {len(self.text.encode())} bytes; at most {MAX_GUIDE_BYTES} are accepted")


def from_request(guide_type: str | None, guide: str | None) -> Guide | None:
    """The ensemble's guide_type + guide → the decoder's Guide (None: no guide). GuideError names what is wrong."""
    if guide_type is None or guide_type == "":
        if guide:
            raise GuideError("guide is given without guide_type (json, json_schema, regex, choice or grammar)")
        return None
    if guide_type not in REQUEST_TYPES:
        raise GuideError(f"guide_type must be one of {', '.join(REQUEST_TYPES)}, got {guide_type!r}")
    text = guide or ""
    if guide_type == "json":
        return Guide(JSON, text)
    if guide_type == "json_schema":
        return Guide(JSON_SCHEMA, schema_text(text))
    if guide_type == "regex":
        return Guide(REGEX, text)
    if guide_type == "grammar":
        return Guide(EBNF, text)
    return Guide(EBNF, choice_grammar(_choices(text)))


def schema_text(text: str) -> str:
    """A JSON schema given as text: parsed here (a clear error for bad JSON), passed on as the client wrote it."""
    try:
        schema = json.loads(text)
    except (json.JSONDecodeError, TypeError) as e:
        raise GuideError(f"the json_schema guide is not JSON: {e}") from None
    if not isinstance(schema, (dict, bool)):
        raise GuideError(f"a JSON schema is an object (or true/false), got {type(schema).__name__}")
    return text


def _choices(text: str) -> list[str]:
    try:
        choices = json.loads(text)
    except (json.JSONDecodeError, TypeError) as e:
        raise GuideError(f"a choice guide is a JSON list of strings: {e}") from None
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
        raise GuideError("a choice guide is a non-empty JSON list of non-empty strings")
    return choices


def choice_grammar(choices: list[str]) -> str:
    """The EBNF grammar whose `root` is exactly one of `choices` (xgrammar's GBNF string literals: every character
    that is not printable ASCII, and the quote and backslash, written as an escape)."""
    return "root ::= " + " | ".join(_literal(c) for c in dict.fromkeys(choices))


def _literal(s: str) -> str:
    out = []
    for ch in s:
        if ch in '"\\':
            out.append("\\" + ch)
        elif " " <= ch <= "~":
            out.append(ch)
        elif ord(ch) <= 0xFFFF:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(f"\\U{ord(ch):08x}")
    return '"' + "".join(out) + '"'


def check_combination(guide: Guide | None, *, thinking: bool = False, ignore_eos: bool = False,
                      min_tokens: int = 0) -> None:
    """Refuse what does not combine with a guide (module docstring)."""
    if guide is None:
        return
    if thinking:
        raise GuideError("a guide (response_format, guided_*) and thinking do not combine: AF3's thinking writes "
                         "free-form reasoning before its answer with no marker where the answer begins, so the guide "
                         "would constrain the reasoning; send the thinking request first, then ask for the structured "
                         "answer without thinking")
    if ignore_eos:
        raise GuideError("ignore_eos and a guide do not combine: a guide ends the answer where its grammar is "
                         "complete")
    if min_tokens:
        raise GuideError("min_tokens and a guide do not combine: the guide decides where the answer ends")
