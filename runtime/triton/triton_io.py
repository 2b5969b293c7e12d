"""Small helpers for the Triton python models (the adapters in triton_repo/*/model.py).

`pb` is the `triton_python_backend_utils` module, passed in so that unit tests can give a fake one.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from af3trt.runtime.stages import errors
from af3trt.runtime.stages.errors import InvalidRequest

log = logging.getLogger("af3trt")


class RequestError(InvalidRequest):
    """A bad request: answered with an error for that request only."""


def params(args: dict) -> dict[str, str]:
    """The model's config.pbtxt parameters as text (its record in runtime/stages/params.py parses them). An empty
    string_value may be left out of the config's JSON (protobuf's JSON form omits default values)."""
    cfg = json.loads(args["model_config"])
    return {k: v.get("string_value", "") for k, v in cfg.get("parameters", {}).items()}


def resolve(args: dict, value: str) -> Path:
    """A path parameter: absolute, or relative to the model repository's parent (the build output)."""
    p = Path(value)
    return p if p.is_absolute() else (Path(args["model_repository"]).parent.parent / p).resolve()


def tensor(pb, request, name: str) -> np.ndarray | None:
    t = pb.get_input_tensor_by_name(request, name)
    return None if t is None else t.as_numpy()


def scalar(pb, request, name: str, kind=None):
    """The single value of an optional [1] (or [1,1]) input, or None when absent."""
    a = tensor(pb, request, name)
    if a is None:
        return None
    if a.size != 1:
        raise RequestError(f"{name} must hold one value, got shape {list(a.shape)}")
    v = a.reshape(-1)[0]
    return kind(v) if kind else v


def text(pb, request, name: str) -> str | None:
    v = scalar(pb, request, name)
    if v is None:
        return None
    if isinstance(v, (bytes, np.bytes_)):
        try:
            return bytes(v).decode("utf-8")
        except UnicodeDecodeError as e:
            raise RequestError(f"{name} is not valid UTF-8 ({e})") from None
    return str(v)


def error_response(pb, exc: BaseException):
    """A per-request error: Triton's status for the exception's code, and the code tagged in the message
    (runtime/stages/errors.py). Unexpected exceptions are logged with their traceback."""
    code = errors.code_of(exc)
    if code is errors.ErrorCode.INTERNAL:
        log.exception("internal error", exc_info=exc)
    status = getattr(pb.TritonError, code.value.triton, None)  # python backend >= 23.12 takes a status code
    error = pb.TritonError(errors.tagged(exc)) if status is None else pb.TritonError(errors.tagged(exc), status)
    return pb.InferenceResponse(output_tensors=[], error=error)


def per_request(pb, requests, run) -> list:
    """`run(request)` for each request; any exception becomes that request's error response only."""
    out = []
    for r in requests:
        try:
            out.append(run(r))
        except Exception as e:  # noqa: BLE001 - every failure is answered, never raised into Triton
            out.append(error_response(pb, e))
    return out


def bytes_tensor(pb, name: str, values: list[bytes]):
    return pb.Tensor(name, np.array(values, dtype=np.object_))


def device_tensor(pb, request, name: str):
    """An input as a torch tensor where Triton placed it (GPU or CPU), through DLPack; None when absent.

    With the python-backend parameter FORCE_CPU_ONLY_INPUT_TENSORS "no", Triton hands a python model its inputs in
    CPU or GPU memory depending on where they were last used, and `pb.Tensor.is_cpu()` tells which
    (triton-inference-server/python_backend README, "Input Tensor Device Placement"); `as_numpy()` works only on CPU
    tensors, `to_dlpack()` on both.
    """
    import torch

    t = pb.get_input_tensor_by_name(request, name)
    return None if t is None else torch.from_dlpack(t.to_dlpack())


def host_array(pb, request, name: str) -> np.ndarray | None:
    """An input as a numpy array wherever Triton placed it; None when absent. `as_numpy()` on a GPU tensor raises
    "Tensor is stored in GPU and cannot be converted to NumPy." (python_backend r26.04 src/pb_tensor.cc,
    PbTensor::AsNumpy), which a model with FORCE_CPU_ONLY_INPUT_TENSORS "no" can be handed: a GPU tensor is
    copied to the host through DLPack instead."""
    t = pb.get_input_tensor_by_name(request, name)
    if t is None:
        return None
    if t.is_cpu():
        return t.as_numpy()
    import torch

    return torch.from_dlpack(t.to_dlpack()).cpu().numpy()


def output_tensor(pb, name: str, value):
    """A numpy array, or a torch tensor on any device (passed through DLPack without a copy), as an output."""
    if isinstance(value, np.ndarray):
        return pb.Tensor(name, value)
    from torch.utils.dlpack import to_dlpack

    return pb.Tensor.from_dlpack(name, to_dlpack(value.contiguous()))
