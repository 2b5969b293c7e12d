"""A stand-in for Triton's `triton_python_backend_utils`, enough to run our model.py adapters without a server.

The names and conventions are those of triton-inference-server/python_backend (src/resources/
triton_python_backend_utils.py and src/pb_stub.cc bindings; version in the search index, commit 28aaeb7b, not
pinned to the r24.08 that tritonserver 2.51 ships): Tensor(name, array) / from_dlpack / as_numpy /
to_dlpack, InferenceResponse(output_tensors, error), TritonError(msg).message(), get_input_tensor_by_name,
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
    def __init__(self, msg):
        super().__init__(msg)
        self._msg = msg

    def message(self):
        return self._msg


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

    def to_dlpack(self):
        import torch
        from torch.utils.dlpack import to_dlpack

        t = self._array if isinstance(self._array, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(self._array))
        return to_dlpack(t)


class Logger:
    """pb_utils.Logger: what the models log into the server log (kept here for assertions)."""

    messages: list[str] = []

    @classmethod
    def log_info(cls, msg):
        cls.messages.append(msg)


class InferenceResponse:
    def __init__(self, output_tensors=(), error=None):
        self.outputs = {t.name(): t for t in output_tensors}
        self.error = error

    def has_error(self):
        return self.error is not None


class Sender:
    def __init__(self):
        self.sent = []
        self.cancelled = False  # set by a test to play a client that went away

    def send(self, response=None, flags=0):
        self.sent.append((response, flags))

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


def get_input_tensor_by_name(request, name):
    return request.inputs.get(name)


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
