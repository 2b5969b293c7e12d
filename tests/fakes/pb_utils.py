"""A stand-in for Triton's `triton_python_backend_utils`, enough to run our model.py adapters without a server.

The names and conventions are those of triton-inference-server/python_backend (src/resources/
triton_python_backend_utils.py and src/pb_stub.cc bindings; version in the search index, commit 28aaeb7b, not
pinned to the r24.08 that tritonserver 2.51 ships): Tensor(name, array) / from_dlpack / as_numpy /
to_dlpack, InferenceResponse(output_tensors, error), TritonError(msg, code).message() / .code(), get_input_tensor_by_name,
request.request_id(), request.get_response_sender().send(response, flags) with TRITONSERVER_RESPONSE_COMPLETE_FINAL,
sender.is_cancelled(), Logger.log_info.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np

TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1


class TritonError(Exception):
    # the status codes the 2.51 stub binds (strings of pytriton 0.7.0's triton_python_backend_stub: NOT_FOUND,
    # INVALID_ARG, UNAVAILABLE, UNSUPPORTED, ALREADY_EXISTS, CANCELLED; python_backend README "Error Handling");
    # TritonError(message, code=INTERNAL)
    UNKNOWN, INTERNAL, NOT_FOUND, INVALID_ARG, UNAVAILABLE, UNSUPPORTED, ALREADY_EXISTS, CANCELLED = range(8)

    def __init__(self, msg, code=INTERNAL):
        super().__init__(msg)
        self._msg, self._code = msg, code

    def message(self):
        return self._msg

    def code(self):
        return self._code


class Tensor:
    def __init__(self, name, array):
        self._name, self._array = name, array

    @classmethod
    def from_dlpack(cls, name, capsule):
        import torch

        return cls(name, torch.from_dlpack(capsule))

    def name(self):
        return self._name

    def as_numpy(self):
        import torch

        if isinstance(self._array, torch.Tensor):
            if self._array.dtype == torch.bfloat16:
                raise TypeError("bf16 has no numpy type")
            return self._array.numpy()
        return self._array

    def is_cpu(self):
        return True

    def to_dlpack(self):
        import torch
        from torch.utils.dlpack import to_dlpack

        t = self._array if isinstance(self._array, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(self._array))
        return to_dlpack(t)


class GpuTensor(Tensor):
    """An input Triton hands over in GPU memory (FORCE_CPU_ONLY_INPUT_TENSORS "no"): is_cpu() is False and
    as_numpy() raises as python_backend r26.04 src/pb_tensor.cc PbTensor::AsNumpy does; to_dlpack() works (here
    on a CPU torch tensor standing in for the device memory)."""

    def is_cpu(self):
        return False

    def as_numpy(self):
        raise TritonError("Tensor is stored in GPU and cannot be converted to NumPy.")


class Logger:
    """pb_utils.Logger: what the models log into the server log (kept here for assertions)."""

    messages: list[str] = []

    @classmethod
    def log_info(cls, msg):
        cls.messages.append(msg)

    @classmethod
    def log_warn(cls, msg):
        cls.messages.append(msg)


class InferenceResponse:
    def __init__(self, output_tensors=(), error=None):
        self.outputs = {t.name(): t for t in output_tensors}
        self.error = error

    def has_error(self):
        return self.error is not None


class Sender:
    def __init__(self):
        import threading

        self.sent = []
        self.cancelled = False  # set by a test to play a client that went away
        self.done = threading.Event()  # set by the final flag (a decoupled model answers from its own threads)

    def send(self, response=None, flags=0):
        if self.done.is_set():  # python_backend: nothing may follow the final flag
            raise TritonError("Unable to send response. Response sender has been closed.")
        self.sent.append((response, flags))
        if flags & TRITONSERVER_RESPONSE_COMPLETE_FINAL:
            self.done.set()

    def is_cancelled(self):
        return self.cancelled


class Request:
    def __init__(self, inputs: dict, request_id: str = ""):
        self.inputs = {k: Tensor(k, v) for k, v in inputs.items() if v is not None}
        self._id = request_id
        self.sender = Sender()

    def request_id(self):
        return self._id

    def get_response_sender(self):
        return self.sender


class BlsResponse:
    """What InferenceRequest.exec() yields (python_backend: InferenceResponse with has_error() and error())."""

    def __init__(self, outputs=(), error: str | None = None):
        self.outputs = {t.name(): t for t in outputs}
        self._error = None if error is None else TritonError(error)

    def has_error(self):
        return self._error is not None

    def error(self):
        return self._error


# BLS (python_backend README "Business Logic Scripting"; src/pb_stub.cc InferRequest binding: request_id,
# correlation_id, inputs, requested_output_names, model_name, model_version, flags, timeout, preferred_memory, trace,
# parameters): a test routes a model name to a callable(request_id, {input name: Tensor}) → list[BlsResponse] (the
# tensors as sent, so the callee sees their dtype and whether they are in host memory).
BLS_MODELS: dict = {}


class InferenceRequest:
    def __init__(self, *, inputs, requested_output_names, model_name, request_id="", correlation_id=0,
                 model_version=-1, flags=0, timeout=0, preferred_memory=None, trace=None, parameters=None):
        self.model_name, self.request_id = model_name, request_id
        self.inputs, self.requested_output_names = list(inputs), list(requested_output_names)

    def exec(self, decoupled=False):
        if self.model_name not in BLS_MODELS:
            responses = [BlsResponse(error=f"Request for unknown model: '{self.model_name}' is not found")]
        else:
            responses = BLS_MODELS[self.model_name](self.request_id, {t.name(): t for t in self.inputs})
        return iter(responses) if decoupled else responses[0]


def get_input_tensor_by_name(request, name):
    return request.inputs.get(name)


def get_output_tensor_by_name(response, name):
    return response.outputs.get(name)


def import_model(name: str):
    """The module triton_repo/<name>/model.py, imported with this module as triton_python_backend_utils."""
    import af3trt.triton_repo as tr

    sys.modules["triton_python_backend_utils"] = sys.modules[__name__]
    path = Path(tr.__file__).parent / name / "model.py"
    spec = importlib.util.spec_from_file_location(f"_af3trt_model_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load_model(name: str, config, args_extra: dict | None = None):
    """Import triton_repo/<name>/model.py with this module as triton_python_backend_utils and initialize it
    with `config` (a ModelConfig protobuf) as Triton would."""
    from google.protobuf import json_format

    model = import_model(name).TritonPythonModel()
    args = {"model_config": json.dumps(json_format.MessageToDict(config, preserving_proto_field_name=True)),
            "model_name": config.name or name, **(args_extra or {})}  # Triton passes the model's name
    model.initialize(args)
    return model
