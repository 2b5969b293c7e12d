"""Triton adapter: the cancellation side channel of the af3 ensemble (input request_id → output cancelled).

Triton 2.51 checks a cancelled ensemble request only between its steps, so a client that closes its af3 stream
does not reach the decoder that is generating for it (response_sender.is_cancelled() stays False there; see
triton_repo/decoder/model.py `_cancelled`). AF3Client and the OpenAI front therefore send the request id here after
closing a stream early; this model marks it in the request context (runtime/context.py, a file named by a hash of
the id) and the CPU decoder, which polls the mark at most every CANCEL_CHECK_S, stops that request.

GPU decoder (TensorRT-LLM's `tensorrtllm` backend): the mark is not read there. That backend has its own way to
stop a request: a request to the tensorrtllm model with the optional BOOL input `stop` set true and the Triton
request id of the running request cancels it in the executor (tensorrtllm_backend
inflight_batcher_llm/src/model_instance_state.cc, ModelInstanceState::handleStopRequest → Executor::cancelRequest;
input `stop` in all_models/inflight_batcher_llm/tensorrt_llm/config.pbtxt). Our decoder config does not declare
`stop`, and this model does not forward to it: on GPU a cancelled request still ends at its deadline or max_tokens.
"""

import numpy as np
import triton_python_backend_utils as pb

from af3trt.runtime import triton_io as io
from af3trt.runtime.context import RequestContext
from af3trt.runtime.contract import CANCELLED, REQUEST_ID

MAX_ID_BYTES = 256  # a request id is a short token (the clients send uuid4 hex); longer is a client error


class TritonPythonModel:
    def initialize(self, args):
        self.ctx = RequestContext()

    def execute(self, requests):
        return io.per_request(pb, requests, self.run)

    def run(self, r):
        rid = io.text(pb, r, REQUEST_ID)
        if not rid:
            raise io.RequestError(f"{REQUEST_ID} is required: the id of the af3 request to cancel")
        if len(rid.encode()) > MAX_ID_BYTES:
            raise io.RequestError(f"{REQUEST_ID} is longer than {MAX_ID_BYTES} bytes")
        self.ctx.cancel(rid)
        return pb.InferenceResponse([pb.Tensor(CANCELLED, np.array([True]))])
