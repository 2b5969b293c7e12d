"""A fake of TensorRT-LLM's `tensorrtllm` Triton backend: only the request handling the GPU cancel path relies on,
with Triton core's input validation in front of it. Facts reproduced (no code copied):

Triton core (triton-inference-server/core r26.04):
  - an input the model config does not declare is refused: "unexpected inference input '<name>' for model"
    (src/model.cc GetInput; src/model_config_utils.cc);
  - a request lacking a non-optional input is refused: "... but missing required input(s) [...]"
    (src/infer_request.cc);
  - an ensemble's steps carry the ensemble's request id (src/ensemble_scheduler/ensemble_scheduler.cc,
    `irequest->SetId(request_id_)`), so the decoder sees the af3 request id.
The backend (NVIDIA/TensorRT-LLM triton_backend/inflight_batcher_llm/src/model_instance_state.cc, as indexed at
commit 0c8de69a), ModelInstanceState::enqueue → handleStopRequest:
  - a request whose BOOL input `stop` is true is not enqueued: with an empty request id it is answered with the
    error "Trying to stop a request but request ID is not provided"; else every executor request recorded under
    that Triton request id is cancelled (Executor::cancelRequest), an unknown id being no error ("the request to
    cancel may already be completed"), and it is answered with one empty final response;
  - any other request is enqueued and its executor ids recorded under its Triton request id (when not empty).
Guided decoding (same file, ModelInstanceState::getGuidedDecodingConfigFromParams, at 0c8de69a; utils.cc
getGuidedDecodingParamsFromTensors, indexed commit 19290813; batch_manager/trtGptModelInflightBatching.cpp creates the
GuidedDecoder only when the executor has a GuidedDecodingConfig):
  - at load, `guided_decoding_backend` and `xgrammar_tokenizer_info_path` empty (or the template's placeholders) turn
    it off; otherwise the file must exist ("Xgrammar's tokenizer info path at … does not exist."), is parsed as JSON
    and read for "encoded_vocab", "tokenizer_str", "stop_token_ids" (a missing key throws), and the backend must be
    "xgrammar" ("Guided decoding is currently supported with 'xgrammar' backend…"): the model does not load;
  - per request, each of `guided_decoding_guide_type` / `guided_decoding_guide` is read as the raw bytes of its BYTES
    tensor (Triton's serialization: a 4-byte length before each element) with the first 4 bytes dropped; a type
    other than json, json_schema, regex, ebnf_grammar leaves the request without a guide, silently; a guide on an
    executor without guided decoding is ignored, silently.
"""

from __future__ import annotations

import itertools
import json
import struct
from pathlib import Path

import numpy as np

from fakes import pb_utils as fake_pb


class FakeTrtllmDecoder:
    """The decoder model as Triton and the tensorrtllm backend treat a request; `generating(rid)` tells whether a
    request of that Triton id is still running in the executor."""

    STOP_WITHOUT_ID = "Trying to stop a request but request ID is not provided"

    GUIDE_TYPES = ("json", "json_schema", "regex", "ebnf_grammar")  # utils.cc guideTypeMapping

    def __init__(self, config):
        self.config = config
        self.guided_config = guided_decoding_config({k: v.string_value for k, v in config.parameters.items()})
        self.executor: dict[int, dict] = {}  # executor request id → {"triton_id": …, "cancelled": bool}
        self.by_triton_id: dict[str, set[int]] = {}  # mTritonRequestIdToRequestIds
        self.stop_requests = 0
        self._ids = itertools.count(1)

    def validate(self, inputs: dict) -> str | None:
        declared = {i.name: i for i in self.config.input}
        for name in inputs:
            if name not in declared:
                return f"unexpected inference input '{name}' for model '{self.config.name}'"
        missing = [n for n, i in declared.items() if not i.optional and n not in inputs]
        if missing:
            return f"missing required input(s) {missing}"
        if self.config.max_batch_size > 0 and any(np.asarray(v).ndim < 1 or np.asarray(v).shape[0] != 1
                                                  for v in inputs.values()):
            return "every input of a batching model takes the batch dimension first"
        return None

    def __call__(self, triton_id: str, inputs: dict) -> list:
        """One Triton request to the decoder → the responses the caller receives (a BLS iterator's items)."""
        error = self.validate(inputs)
        if error:
            return [fake_pb.BlsResponse(error=error)]
        if "stop" in inputs and bool(np.asarray(inputs["stop"]).reshape(-1)[0]):  # handleStopRequest
            self.stop_requests += 1
            if not triton_id:
                return [fake_pb.BlsResponse(error=self.STOP_WITHOUT_ID)]
            for eid in self.by_triton_id.get(triton_id, ()):
                self.executor[eid]["cancelled"] = True  # Executor::cancelRequest
            return [fake_pb.BlsResponse()]
        eid = next(self._ids)  # enqueueRequests
        guide = self.guide(inputs)
        self.executor[eid] = {"triton_id": triton_id, "cancelled": False,
                              "guide": guide if self.guided_config is not None else None}
        if triton_id:
            self.by_triton_id[triton_id] = {eid}
        return []  # streaming responses follow while it generates

    def guide(self, inputs: dict) -> tuple[str, str | None] | None:
        """The request's GuidedDecodingParams (type, guide) as the backend builds them, None without a guide."""
        if "guided_decoding_guide_type" not in inputs:
            return None
        kind = _backend_string(inputs["guided_decoding_guide_type"])
        if kind not in self.GUIDE_TYPES:
            return None
        text = _backend_string(inputs["guided_decoding_guide"]) if "guided_decoding_guide" in inputs else None
        return kind, text

    def generating(self, triton_id: str) -> bool:
        return any(not self.executor[e]["cancelled"] for e in self.by_triton_id.get(triton_id, ()))


class BackendLoadError(RuntimeError):
    """The model fails to load (a TLLM_CHECK / TLLM_THROW in the instance's constructor)."""


def guided_decoding_config(params: dict[str, str]) -> dict | None:
    """getGuidedDecodingConfigFromParams: the executor's GuidedDecodingConfig, or None (guided decoding off)."""
    missing = [k for k in ("tokenizer_dir", "xgrammar_tokenizer_info_path", "guided_decoding_backend")
               if k not in params]
    if missing:  # GetParameter without a default throws
        raise BackendLoadError(f"parameters {missing} not found")
    backend, path = params["guided_decoding_backend"], params["xgrammar_tokenizer_info_path"]
    if backend in ("", "${guided_decoding_backend}") or path in ("", "${xgrammar_tokenizer_info_path}"):
        return None
    if not Path(path).exists():
        raise BackendLoadError(f"Xgrammar's tokenizer info path at {path} does not exist.")
    info = json.loads(Path(path).read_text(encoding="utf-8"))
    try:
        config = {"encoded_vocab": [str(t) for t in info["encoded_vocab"]], "tokenizer_str": str(info["tokenizer_str"]),
                  "stop_token_ids": [int(i) for i in info["stop_token_ids"]]}
    except (KeyError, TypeError) as e:
        raise BackendLoadError(f"tokenizer info {path}: {e!r}") from None
    if backend != "xgrammar":
        raise BackendLoadError("Guided decoding is currently supported with 'xgrammar' backend. Invalid "
                               "guided_decoding_backend parameter provided.")
    return config


def _backend_string(value) -> str:
    """A BYTES tensor as the backend reads it: every element serialized (4-byte little-endian length, then the bytes),
    the whole buffer taken as one string, its first 4 bytes dropped."""
    raw = b"".join(struct.pack("<I", len(e)) + bytes(e) for e in np.asarray(value, dtype=object).reshape(-1))
    return raw[4:].decode("utf-8", errors="replace")
