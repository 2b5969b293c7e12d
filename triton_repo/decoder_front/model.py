"""Triton adapter: the GPU target's decoder step, in front of the tensorrtllm decoder (af3trt.runtime.triton.decoder_front
says why and how: streams coalesced, request ids owned, think/'s adapter sent in the engine's dtype).

Decoupled: execute() hands each request to a thread of its own that calls the decoder by BLS and answers through
the request's response sender (python_backend r26.04 README, "Decoupled mode" and "Business Logic Scripting":
InferenceRequest(...).exec(decoupled=True) iterates the decoder's responses)."""

import triton_python_backend_utils as pb

from af3trt.runtime.stages.params import DecoderFrontParams
from af3trt.runtime.triton import triton_io as io
from af3trt.runtime.triton.context import RunningRequests
from af3trt.runtime.triton.decoder_front import Adapter, Front


class TritonPythonModel:
    def initialize(self, args):
        p = DecoderFrontParams.parse(io.params(args))
        adapter = None
        if p.lora_dir is not None:  # think/'s adapter (build/think.py gpu_spec)
            adapter = Adapter.load(io.resolve(args, p.lora_dir), p.lora_task, p.lora_dtype, held=p.lora_preloaded)
        self.front = Front(pb, p.decoder_model, interval_s=p.stream_interval_ms / 1000, adapter=adapter,
                           running=RunningRequests(args["model_name"]))

    def execute(self, requests):
        for r in requests:
            self.front.submit(r)
        return None
