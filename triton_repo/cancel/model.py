"""Triton adapter: the cancellation side channel of the af3 ensemble (input request_id → output cancelled).

Triton 2.51 checks a cancelled ensemble request only between its steps, so a client that closes its af3 stream
does not reach the decoder that is generating for it (response_sender.is_cancelled() stays False there; see
triton_repo/decoder/model.py `_cancelled`). AF3Client and the OpenAI front therefore send the request id here after
closing a stream early; this model marks it in the request context (runtime/triton/context.py, a file named by a hash of
the id) and the CPU decoder, which polls the mark at most every CANCEL_CHECK_S, stops that request.

GPU decoder (TensorRT-LLM's `tensorrtllm` backend): the mark is not read there, so on the GPU target (parameter
`stop_model`, set by triton_repo/configs.py cancel_config) this model also sends that model a request with `stop`
= true and the same request id, which the backend turns into Executor::cancelRequest for the running request
(runtime/triton/trtllm_stop.py has the upstream facts). A request the client cancelled before its decoder step was
dispatched reaches the decoder already cancelled (core r26.04 ensemble_scheduler.cc propagates the ensemble's
cancellation to the next step), and the backend drops cancelled requests every cancellation_check_period_ms
(tensorrtllm_backend r26.04 docs/model_config.md).
"""

import numpy as np
import triton_python_backend_utils as pb

from af3trt.runtime.triton import triton_io as io
from af3trt.runtime.triton import trtllm_stop
from af3trt.runtime.triton.context import RequestContext
from af3trt.runtime.stages.params import CancelParams
from af3trt.runtime.stages.contract import CANCELLED, REQUEST_ID

MAX_ID_BYTES = 256  # a request id is a short token (the clients send uuid4 hex); longer is a client error


class TritonPythonModel:
    def initialize(self, args):
        self.ctx = RequestContext()
        self.stop_model = CancelParams.parse(io.params(args)).stop_model  # the tensorrtllm decoder (GPU), else None

    def execute(self, requests):
        return io.per_request(pb, requests, self.run)

    def run(self, r):
        rid = io.text(pb, r, REQUEST_ID)
        if not rid:
            raise io.RequestError(f"{REQUEST_ID} is required: the id of the af3 request to cancel")
        if len(rid.encode()) > MAX_ID_BYTES:
            raise io.RequestError(f"{REQUEST_ID} is longer than {MAX_ID_BYTES} bytes")
        self.ctx.cancel(rid)
        if self.stop_model:
            try:
                trtllm_stop.send_stop(pb, rid, self.stop_model)
            except trtllm_stop.StopError as e:
                raise io.RequestError(str(e)) from None
        return pb.InferenceResponse([pb.Tensor(CANCELLED, np.array([True]))])
