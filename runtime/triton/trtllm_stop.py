"""Stop a request that TensorRT-LLM's `tensorrtllm` backend is generating, from a python model (the GPU target's
cancel path: triton_repo/cancel).

Why a request of its own: Triton propagates an ensemble's cancellation only to steps it has not dispatched yet
(triton-inference-server/core r26.04 src/ensemble_scheduler/ensemble_scheduler.cc: "If the ensemble request is
cancelled, propagate the cancellation to the next request step" — checked when a step is scheduled), so a
decoder already generating never sees the client go away.

What the backend does with a stop request (NVIDIA/TensorRT-LLM triton_backend/inflight_batcher_llm/src/
model_instance_state.cc, as indexed at commit 0c8de69a, not pinned to the v1.2.1 tag):
  - enqueue() calls handleStopRequest() first for every request: when the BOOL input `stop` is true it looks up
    the request's Triton request id in mTritonRequestIdToRequestIds and calls Executor::cancelRequest for each
    executor request of that id, then answers with one empty final response (an error only when the id is
    empty: "Trying to stop a request but request ID is not provided"); an id it does not know (already finished)
    is not an error. The stop request itself never generates.
  - for a normal request, enqueue() records mTritonRequestIdToRequestIds[triton request id] = its executor ids.
The decoder step of our ensemble carries the ensemble's request id (core r26.04 ensemble_scheduler.cc:
`irequest->SetId(request_id_)`), so the af3 request id the client knows is the id the backend recorded.

Triton validates the stop request against the decoder's config before the backend sees it: every non-optional
input must be present (core r26.04 src/infer_request.cc, "missing required input(s)"): input_lengths and
request_output_len are required in the backend's config (TensorRT-LLM triton_backend/all_models/
inflight_batcher_llm/tensorrt_llm/config.pbtxt; `stop` is TYPE_BOOL dims [1] reshape [] optional), so they are
sent with placeholder values the backend never reads. The decoder batches (max_batch_size > 0): [1, 1] tensors.
The BLS call: pb.InferenceRequest(model_name, inputs, requested_output_names, request_id=…).exec(decoupled=True)
(python_backend r26.04 src/pb_stub.cc InferRequest binding; README "Business Logic Scripting", decoupled models).
"""

from __future__ import annotations

import numpy as np

from af3trt.runtime.stages.contract import DECODER_STAGE, STOP

STOP_INPUT = STOP
# non-optional in the decoder's config (input_lengths, request_output_len)
REQUIRED_PLACEHOLDERS = tuple(t.name for t in DECODER_STAGE.inputs if not t.optional)


class StopError(RuntimeError):
    """The decoder refused the stop request."""


def stop_request(pb, request_id: str, model: str):
    """The BLS request that stops af3 request `request_id` in the tensorrtllm model `model`."""
    inputs = [pb.Tensor(name, np.ones((1, 1), np.int32)) for name in REQUIRED_PLACEHOLDERS]
    inputs.append(pb.Tensor(STOP_INPUT, np.ones((1, 1), np.bool_)))
    return pb.InferenceRequest(model_name=model, inputs=inputs, requested_output_names=[], request_id=request_id)


def send_stop(pb, request_id: str, model: str) -> None:
    """Send the stop request and wait for the backend's answer (one empty final response)."""
    if not request_id:
        raise StopError("a stop request needs the id of the request to stop")
    for response in stop_request(pb, request_id, model).exec(decoupled=True):
        if response.has_error():
            raise StopError(f"{model} refused to stop {request_id!r}: {response.error().message()}")
