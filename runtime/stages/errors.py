"""Typed errors: a code set where a stage raises, carried to the client that reads it.

A stage (preprocess, fusion, the decoder) raises an AF3StageError subclass; triton_io.error_response answers the
request with a Triton error whose status is the code's and whose message carries the code in a parseable tag:

    fusion raises PromptError("max_tokens must be in [1, 512], got 0")       code INVALID_ARGUMENT
    Triton's message   in ensemble 'af3', [af3:invalid_argument] max_tokens must be in [1, 512], got 0
    parse(message)     (ErrorCode.INVALID_ARGUMENT, "max_tokens must be in [1, 512], got 0")
    OpenAI front       400 {"error": {"message": "max_tokens must be in [1, 512], got 0",
                                      "type": "invalid_request_error", ...}}

The tag, not the exception's class name, is what crosses the layers: the client (runtime/client/library.py) and the OpenAI
front (runtime/openai/) map the code, and show the message without Triton's or Python's prefixes. Pure Python: the
Triton python-backend stubs import it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum


@dataclass(frozen=True)
class Code:
    tag: str  # in a Triton error message: [af3:<tag>]
    http: int  # HTTP status (grpc-gateway's mapping of the gRPC code, runtime/errors.go HTTPStatusFromCode)
    grpc: str  # grpc.StatusCode name
    triton: str  # triton_python_backend_utils.TritonError code (python_backend README, "Error Handling")
    openai: str  # the `type` of OpenAI's error body


class ErrorCode(Enum):
    INVALID_ARGUMENT = Code("invalid_argument", 400, "INVALID_ARGUMENT", "INVALID_ARG", "invalid_request_error")
    UNAVAILABLE = Code("unavailable", 503, "UNAVAILABLE", "UNAVAILABLE", "service_unavailable")  # busy: retry later
    CANCELLED = Code("cancelled", 499, "CANCELLED", "CANCELLED", "request_cancelled")  # the client's, or its deadline
    INTERNAL = Code("internal", 500, "INTERNAL", "INTERNAL", "server_error")
    # a valid request this deployment was built without (e.g. thinking without think/): not retryable here. HTTP 400,
    # not grpc-gateway's 501 for UNIMPLEMENTED: the client must change the request (OpenAI answers parameters a model
    # does not support with 400 invalid_request_error), and the front answers no 5xx but 503 (issue 19.3, perf/fuzz.py)
    UNSUPPORTED = Code("unsupported", 400, "UNIMPLEMENTED", "UNSUPPORTED", "invalid_request_error")


class AF3StageError(Exception):
    """An error a stage answers one request with; `code` says what kind."""

    code = ErrorCode.INTERNAL


class InvalidRequest(AF3StageError, ValueError):
    """Something the client can fix: a bad input, a value out of range, audio that cannot be decoded."""

    code = ErrorCode.INVALID_ARGUMENT


class Unavailable(AF3StageError):
    """Past capacity: a queue is full or the request waited too long. Retry later."""

    code = ErrorCode.UNAVAILABLE


class Unsupported(AF3StageError):
    """The request asks for something this deployment was built without (thinking on a build without think/)."""

    code = ErrorCode.UNSUPPORTED


class Cancelled(AF3StageError):
    """The client cancelled the request, or its deadline passed."""

    code = ErrorCode.CANCELLED


def code_of(exc: BaseException) -> ErrorCode:
    """A stage error's code; a ValueError from deeper code (json, numpy) is a bad request; anything else internal."""
    if isinstance(exc, AF3StageError):
        return exc.code
    return ErrorCode.INVALID_ARGUMENT if isinstance(exc, ValueError) else ErrorCode.INTERNAL


def tagged(exc: BaseException) -> str:
    """The message a Triton error carries for exc: its code's tag, then its text (the class name for an empty one)."""
    return f"[af3:{code_of(exc).value.tag}] {str(exc) or type(exc).__name__}"


_TAG = re.compile(r"\[af3:([a-z_]+)\] ")
_TAGS = {c.value.tag: c for c in ErrorCode}
_ENSEMBLE_PREFIX = re.compile(r"^in ensemble '[^']*', ")  # how Triton prefixes the error of an ensemble's step


def parse(message: str) -> tuple[ErrorCode | None, str]:
    """(code, the message for people) of a Triton error message: the text after our tag, or for an error Triton
    raised itself (no tag: None) its message without the ensemble prefix."""
    m = _TAG.search(message)
    if m is not None and m.group(1) in _TAGS:
        return _TAGS[m.group(1)], message[m.end():]
    return None, _ENSEMBLE_PREFIX.sub("", message)
