"""The af3 ensemble's tensor contract with its clients, as plain data: the one list both sides derive from.

triton_repo/configs.py builds the Triton model configs (protobuf) from it; runtime/client.py builds its request
inputs from it; perf reads the stage names. Nothing here imports Triton or numpy.

    client ─ REQUEST_INPUTS ─▶ ENSEMBLE (STAGES: preprocess → encoder → fusion → decoder → postprocess)
           ◀ RESPONSE_OUTPUTS ─ (one response per streamed token, or one with the whole answer)
    client ─ CANCEL_INPUT ─▶ CANCEL ─▶ CANCEL_OUTPUT (not a step: stops a running af3 request by its id)

Datatypes are Triton's wire names (the `datatype` of a KServe v2 tensor, what tritonclient's InferInput takes):
BYTES, BOOL, INT32, UINT64, FP32. A config.pbtxt spells them TYPE_STRING for BYTES and TYPE_<name> otherwise
(triton-inference-server/common protobuf/model_config.proto, DataType; tritonclient utils triton_to_np_dtype).
"""

from __future__ import annotations

from dataclasses import dataclass

ENSEMBLE = "af3"
STAGES = ("preprocess", "encoder", "fusion", "decoder", "postprocess")
CANCEL = "cancel"  # not a step: the side channel that cancels a running af3 request (triton_repo/cancel)
DECODER = "decoder"  # the stage TensorRT-LLM's `tensorrtllm` backend runs on the GPU target


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a model's interface; dims exclude a batch dimension (the ensemble's max_batch_size is 0)."""

    name: str
    datatype: str  # Triton wire datatype: BYTES | BOOL | INT32 | UINT64 | FP32
    dims: tuple[int, ...]
    optional: bool = False


# The ensemble's request inputs. text_input (+ system_prompt) or messages: one of the two is required (fusion says so).
REQUEST_INPUTS = (
    TensorSpec("text_input", "BYTES", (1,), optional=True),
    TensorSpec("messages", "BYTES", (1,), optional=True),  # a conversation, UTF-8 JSON (runtime/conversation.py)
    TensorSpec("system_prompt", "BYTES", (1,), optional=True),
    TensorSpec("audio", "BYTES", (-1,), optional=True),  # encoded audio files, one element each
    TensorSpec("max_tokens", "INT32", (1,), optional=True),
    TensorSpec("temperature", "FP32", (1,), optional=True),
    TensorSpec("top_k", "INT32", (1,), optional=True),
    TensorSpec("top_p", "FP32", (1,), optional=True),
    TensorSpec("repetition_penalty", "FP32", (1,), optional=True),
    TensorSpec("seed", "UINT64", (1,), optional=True),
    TensorSpec("stream", "BOOL", (1,), optional=True),
    TensorSpec("strip_prefix", "BOOL", (1,), optional=True),
)
# The request inputs fusion resolves into the decoder's sampling and length inputs (runtime/sampling.py).
SAMPLING_INPUTS = ("max_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed", "stream")
# What each response carries: this chunk's text (complete UTF-8 characters) and token ids, on a request's first
# response a JSON list of notices (e.g. audio truncated to 10 min), else "", and the prompt's length in tokens as
# fusion built it (text + audio rows; -1 when unknown, e.g. a request without an id).
RESPONSE_OUTPUTS = (
    TensorSpec("text_output", "BYTES", (1,)),
    TensorSpec("output_ids", "INT32", (-1,)),
    TensorSpec("notice", "BYTES", (1,)),
    TensorSpec("prompt_tokens", "INT32", (1,)),
)
CANCEL_INPUT = TensorSpec("request_id", "BYTES", (1,))  # the af3 request id to stop
CANCEL_OUTPUT = TensorSpec("cancelled", "BOOL", (1,))  # an acknowledgement


def request_input(name: str) -> TensorSpec:
    """The spec of one request input (KeyError naming the known ones for a name not in the contract)."""
    for spec in REQUEST_INPUTS:
        if spec.name == name:
            return spec
    raise KeyError(f"{name!r} is not a request input of {ENSEMBLE} ({', '.join(s.name for s in REQUEST_INPUTS)})")
