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
"""

from __future__ import annotations

import itertools

import numpy as np

from fakes import pb_utils as fake_pb


class FakeTrtllmDecoder:
    """The decoder model as Triton and the tensorrtllm backend treat a request; `generating(rid)` tells whether a
    request of that Triton id is still running in the executor."""

    STOP_WITHOUT_ID = "Trying to stop a request but request ID is not provided"

    def __init__(self, config):
        self.config = config
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
        self.executor[eid] = {"triton_id": triton_id, "cancelled": False}
        if triton_id:
            self.by_triton_id[triton_id] = {eid}
        return []  # streaming responses follow while it generates

    def generating(self, triton_id: str) -> bool:
        return any(not self.executor[e]["cancelled"] for e in self.by_triton_id.get(triton_id, ()))
