"""The tensors of the af3 ensemble, as plain data: the one place each tensor name is written.

Every model's interface is declared here once: the ensemble's request inputs and response outputs (its contract with
clients), and each step's inputs and outputs. triton_repo/configs.py builds the Triton model configs (protobuf) and
the ensemble's input/output maps from these records; the Triton adapters (triton_repo/*/model.py) read and write
tensors by the names below; runtime/client/library.py builds its request inputs from REQUEST_INPUTS; perf reads the stage
names. Nothing here imports Triton or numpy (the GPU encoder's engine build and the serving container import it too).
It plays the part of vLLM's TensorSchema records and tensorrtllm_backend's BLS request/response records.

    client ─ REQUEST_INPUTS ─▶ ENSEMBLE (STEPS: preprocess → encoder → fusion → decoder → postprocess)
           ◀ RESPONSE_OUTPUTS ─ (one response per streamed token, or one with the whole answer)
    client ─ CANCEL_INPUT ─▶ CANCEL ─▶ CANCEL_OUTPUT (not a step: stops a running af3 request by its id)

A tensor a step reads comes from the latest earlier step that writes a tensor of that name, else from the request
input of that name (configs.ensemble_config wires them so; tests/test_contract.py checks that every step input the
ensemble must feed has a producer).

Datatypes are Triton's wire names (the `datatype` of a KServe v2 tensor, what tritonclient's InferInput takes):
BYTES, BOOL, INT32, UINT64, FP32; TABLE stands for the decoder's dtype (FP32, FP16 or BF16: the prompt table crosses
in it). A config.pbtxt spells them TYPE_STRING for BYTES and TYPE_<name> otherwise (triton-inference-server/common
protobuf/model_config.proto, DataType; tritonclient utils triton_to_np_dtype). Dims exclude the batch dimension of
a model with max_batch_size > 0 (encoder, decoder); H stands for the text hidden size (from the checkpoint).
"""

from __future__ import annotations

from dataclasses import dataclass

from af3trt.runtime.stages.lengths import N_MELS

ENSEMBLE = "af3"
CANCEL = "cancel"  # not a step: the side channel that cancels a running af3 request (triton_repo/cancel)
# The GPU target's decoder step: a python model in front of the tensorrtllm decoder (triton_repo/decoder_front) that
# coalesces its streams, owns request ids and sends think/'s adapter; it has the decoder's interface.
DECODER_FRONT = "decoder_front"
PREPROCESS, ENCODER, FUSION, DECODER, POSTPROCESS = "preprocess", "encoder", "fusion", "decoder", "postprocess"
STAGES = (PREPROCESS, ENCODER, FUSION, DECODER, POSTPROCESS)  # the ensemble's steps, in order
# DECODER is the stage TensorRT-LLM's `tensorrtllm` backend runs on the GPU target.

H = "H"  # a dim: the text hidden size
TABLE = "TABLE"  # a datatype: the decoder's dtype

# ---------------------------------------------------------------------------------------------- tensor names
# request inputs
TEXT_INPUT, MESSAGES, SYSTEM_PROMPT, AUDIO = "text_input", "messages", "system_prompt", "audio"
MAX_TOKENS, TEMPERATURE, TOP_K, TOP_P = "max_tokens", "temperature", "top_k", "top_p"
REPETITION_PENALTY, SEED, STREAM, STRIP_PREFIX = "repetition_penalty", "seed", "stream", "strip_prefix"
THINKING = "thinking"  # AF3's thinking mode for this request (docs/thinking.md)
# fixed-length generation (what benchmark clients ask for: AIPerf's --extra-inputs ignore_eos:true / min_tokens:N).
# min_tokens is also the tensorrtllm backend's input of that name (tensorrtllm_backend r26.04 docs/model_config.md:
# "min_tokens [1] int32_t Sampling Config param: minTokens"); ignore_eos is resolved by fusion into end_id -1 (same
# table: "end_id ... If not specified, defaults to -1", an id no token has) and no stop_words_list.
MIN_TOKENS, IGNORE_EOS = "min_tokens", "ignore_eos"
# structured output (runtime/stages/guided.py): a guide's type (json, json_schema, regex, choice, grammar) and text
GUIDE_TYPE, GUIDE = "guide_type", "guide"
# response outputs (OUTPUT_IDS is also the decoder's output)
TEXT_OUTPUT, OUTPUT_IDS, NOTICE, PROMPT_TOKENS = "text_output", "output_ids", "notice", "prompt_tokens"
# preprocess → encoder → fusion
INPUT_FEATURES, INPUT_FEATURES_MASK, AUDIO_WINDOWS = "input_features", "input_features_mask", "audio_windows"
AUDIO_EMBEDS = "audio_embeds"
WINDOW_THINKING = "window_thinking"  # preprocess → encoder: per window, run the think encoder variant
AUDIO_DIGEST = "audio_digest"  # per window, a 128-bit key of the window's audio (runtime/stages/audio_cache.py)
# fusion → decoder: TensorRT-LLM's `tensorrtllm` backend names (TEMPERATURE, REPETITION_PENALTY, SEED as requested)
INPUT_IDS, INPUT_LENGTHS, REQUEST_OUTPUT_LEN = "input_ids", "input_lengths", "request_output_len"
END_ID, PAD_ID, STREAMING, RUNTIME_TOP_K, RUNTIME_TOP_P = "end_id", "pad_id", "streaming", "runtime_top_k", "runtime_top_p"
PROMPT_EMBEDDING_TABLE, PROMPT_TABLE_EXTRA_IDS = "prompt_embedding_table", "prompt_table_extra_ids"
PROMPT_VOCAB_SIZE, STOP_WORDS_LIST = "prompt_vocab_size", "stop_words_list"
# a direct client of the tensorrtllm backend (our cancel model): true stops the running request of the same id
# (TensorRT-LLM triton_backend inflight_batcher_llm/tensorrt_llm/config.pbtxt: `stop` TYPE_BOOL dims [1] reshape []
# optional; runtime/triton/trtllm_stop.py)
STOP = "stop"
LORA_TASK_ID = "lora_task_id"  # set only for thinking requests: the decoder applies the think/ adapter
# the tensorrtllm backend's guided decoding (sent only with a guide): TYPE_STRING dims [1] optional allow_ragged_batch
# (NVIDIA/TensorRT-LLM triton_backend/all_models/inflight_batcher_llm/tensorrt_llm/config.pbtxt at 0c8de69a); the
# backend reads each as one string (utils.cc getGuidedDecodingParamsFromTensors drops the 4-byte length prefix of
# its only element), the type one of runtime/stages/guided.py BACKEND_TYPES
GUIDED_DECODING_GUIDE_TYPE, GUIDED_DECODING_GUIDE = "guided_decoding_guide_type", "guided_decoding_guide"
# the adapter itself, sent by the GPU target's decoder front when the backend does not hold the task (not by fusion):
# [1, rows, width] in the engine's dtype and [1, rows, 3] int32, in host memory (runtime/triton/decoder_front.py)
LORA_WEIGHTS, LORA_CONFIG = "lora_weights", "lora_config"
# decoder → postprocess (with OUTPUT_IDS)
SEQUENCE_LENGTH = "sequence_length"
# the cancel model
REQUEST_ID, CANCELLED = "request_id", "cancelled"


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a model's interface (the one record for every tensor: request, step, decoder, response)."""

    name: str
    datatype: str  # Triton wire datatype: BYTES | BOOL | INT32 | UINT64 | FP32 | TABLE (the decoder's dtype)
    dims: tuple[int | str, ...]  # -1: variable; H: the text hidden size
    optional: bool = False
    reshape: tuple[int, ...] | None = None  # TensorRT-LLM's [1] → [] scalars
    ragged: bool = False  # allow_ragged_batch


@dataclass(frozen=True)
class StageSpec:
    """A model's inputs and outputs."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def input(self, name: str) -> TensorSpec:
        return _find(self.inputs, name, f"an input of {self.name}")

    def output(self, name: str) -> TensorSpec:
        return _find(self.outputs, name, f"an output of {self.name}")


def _find(specs: tuple[TensorSpec, ...], name: str, what: str) -> TensorSpec:
    for spec in specs:
        if spec.name == name:
            return spec
    raise KeyError(f"{name!r} is not {what} ({', '.join(s.name for s in specs)})")


# The ensemble's request inputs. text_input (+ system_prompt) or messages: one of the two is required (fusion says so).
REQUEST_INPUTS = (
    TensorSpec(TEXT_INPUT, "BYTES", (1,), optional=True),
    TensorSpec(MESSAGES, "BYTES", (1,), optional=True),  # a conversation, UTF-8 JSON (runtime/stages/conversation.py)
    TensorSpec(SYSTEM_PROMPT, "BYTES", (1,), optional=True),
    TensorSpec(AUDIO, "BYTES", (-1,), optional=True),  # encoded audio files, one element each
    TensorSpec(MAX_TOKENS, "INT32", (1,), optional=True),
    TensorSpec(TEMPERATURE, "FP32", (1,), optional=True),
    TensorSpec(TOP_K, "INT32", (1,), optional=True),
    TensorSpec(TOP_P, "FP32", (1,), optional=True),
    TensorSpec(REPETITION_PENALTY, "FP32", (1,), optional=True),
    TensorSpec(SEED, "UINT64", (1,), optional=True),
    TensorSpec(STREAM, "BOOL", (1,), optional=True),
    TensorSpec(STRIP_PREFIX, "BOOL", (1,), optional=True),
    TensorSpec(THINKING, "BOOL", (1,), optional=True),
    TensorSpec(MIN_TOKENS, "INT32", (1,), optional=True),  # the end id is not chosen before this many tokens
    TensorSpec(IGNORE_EOS, "BOOL", (1,), optional=True),  # generate max_tokens: end ids and stop ids do not end it
    TensorSpec(GUIDE_TYPE, "BYTES", (1,), optional=True),  # json | json_schema | regex | choice | grammar
    TensorSpec(GUIDE, "BYTES", (1,), optional=True),  # the schema, regex, JSON list of choices or EBNF grammar
)
GUIDE_INPUTS = (GUIDE_TYPE, GUIDE)
# The request inputs fusion resolves into the decoder's sampling and length inputs (runtime/stages/sampling.py).
SAMPLING_INPUTS = (MAX_TOKENS, TEMPERATURE, TOP_K, TOP_P, REPETITION_PENALTY, SEED, STREAM, MIN_TOKENS, IGNORE_EOS)
# What each response carries: this chunk's text (complete UTF-8 characters) and token ids, on a request's first
# response a JSON list of notices (e.g. audio truncated to 10 min), else "", and the prompt's length in tokens as
# fusion built it (text + audio rows; -1 when unknown, e.g. a request without an id).
RESPONSE_OUTPUTS = (
    TensorSpec(TEXT_OUTPUT, "BYTES", (1,)),
    TensorSpec(OUTPUT_IDS, "INT32", (-1,)),
    TensorSpec(NOTICE, "BYTES", (1,)),
    TensorSpec(PROMPT_TOKENS, "INT32", (1,)),
)
CANCEL_INPUT = TensorSpec(REQUEST_ID, "BYTES", (1,))  # the af3 request id to stop
CANCEL_OUTPUT = TensorSpec(CANCELLED, "BOOL", (1,))  # an acknowledgement


def request_input(name: str) -> TensorSpec:
    """The spec of one request input (KeyError naming the known ones for a name not in the contract)."""
    return _find(REQUEST_INPUTS, name, f"a request input of {ENSEMBLE}")


def _requested(*names: str) -> tuple[TensorSpec, ...]:
    """Request inputs a step reads as the client sent them (same type, dims, optional)."""
    return tuple(request_input(n) for n in names)


def _scalar(name: str, datatype: str) -> TensorSpec:
    """A [1] input of the tensorrtllm backend, reshaped to [] (optional unless the backend requires it)."""
    return TensorSpec(name, datatype, (1,), optional=name not in (INPUT_LENGTHS, REQUEST_OUTPUT_LEN), reshape=())


# encoded clips → log-mel windows, cropped to the request's frame bucket T (runtime/stages/lengths.py: 100…3000 frames)
PREPROCESS_STAGE = StageSpec(PREPROCESS, inputs=_requested(AUDIO, STRIP_PREFIX, STREAM, THINKING), outputs=(
    TensorSpec(INPUT_FEATURES, "FP32", (-1, N_MELS, -1)),  # [W, 128, T]
    TensorSpec(INPUT_FEATURES_MASK, "INT32", (-1, -1)),  # [W, T], 1 for valid frames
    TensorSpec(AUDIO_WINDOWS, "INT32", (-1,)),  # [clips]: windows per clip
    TensorSpec(WINDOW_THINKING, "BOOL", (-1, 1)),  # [W, 1]: the request's thinking, per window
    TensorSpec(AUDIO_DIGEST, "UINT64", (-1, 2)),  # [W, 2]: each window's key (its samples and T, hashed here)
))
# windows → projector output, batched over windows (the exported ONNX graph and the TensorRT plan have these names)
ENCODER_STAGE = StageSpec(ENCODER, inputs=(
    TensorSpec(INPUT_FEATURES, "FP32", (N_MELS, -1)),  # [128, T] per window
    TensorSpec(INPUT_FEATURES_MASK, "INT32", (-1,)),  # [T]
    TensorSpec(WINDOW_THINKING, "BOOL", (1,), optional=True),  # think/'s encoder variant for this window
    TensorSpec(AUDIO_DIGEST, "UINT64", (2,), optional=True),  # [2]: the window's key; absent: never cached
), outputs=(TensorSpec(AUDIO_EMBEDS, "FP32", (-1, H)),))  # [T/4, H]
# prompt + audio rows → the decoder's inputs. Outputs are [1, 1] but for the ragged ones; prompt_table_extra_ids is
# sent only when the decoder reuses KV blocks, stop_words_list only when the checkpoint names several end ids (and the
# request does not ignore them: Triton's ensemble takes a step output not sent as an optional input left unfed,
# triton-inference-server/core r24.10 src/ensemble_scheduler/ensemble_scheduler.cc, "not-provided output").
FUSION_STAGE = StageSpec(FUSION, inputs=(
    *_requested(TEXT_INPUT, SYSTEM_PROMPT, MESSAGES),
    TensorSpec(AUDIO_EMBEDS, "FP32", (-1, -1, H)),  # [W, T/4, H]
    TensorSpec(INPUT_FEATURES_MASK, "INT32", (-1, -1)),  # [W, T]
    TensorSpec(AUDIO_WINDOWS, "INT32", (-1,)),
    TensorSpec(AUDIO_DIGEST, "UINT64", (-1, 2), optional=True),  # [W, 2]: keys prompt_table_extra_ids
    *_requested(*SAMPLING_INPUTS),
    *_requested(THINKING),
    *_requested(*GUIDE_INPUTS),
), outputs=(
    TensorSpec(INPUT_IDS, "INT32", (1, -1)),  # [1, L]
    *(TensorSpec(n, t, (1, 1)) for n, t in (
        (INPUT_LENGTHS, "INT32"), (REQUEST_OUTPUT_LEN, "INT32"), (END_ID, "INT32"), (PAD_ID, "INT32"),
        (STREAMING, "BOOL"), (RUNTIME_TOP_K, "INT32"), (RUNTIME_TOP_P, "FP32"), (TEMPERATURE, "FP32"),
        (REPETITION_PENALTY, "FP32"), (SEED, "UINT64"), (PROMPT_VOCAB_SIZE, "INT32"), (MIN_TOKENS, "INT32"))),
    TensorSpec(PROMPT_EMBEDDING_TABLE, TABLE, (1, -1, H)),  # [1, N, H]
    TensorSpec(PROMPT_TABLE_EXTRA_IDS, "UINT64", (1, -1)),  # [1, L]
    TensorSpec(STOP_WORDS_LIST, "INT32", (1, 2, -1)),  # [1, 2, L]
    TensorSpec(LORA_TASK_ID, "UINT64", (1, 1)),  # thinking requests only (absent: the base model)
    TensorSpec(GUIDED_DECODING_GUIDE_TYPE, "BYTES", (1, 1)),  # guided requests only
    TensorSpec(GUIDED_DECODING_GUIDE, "BYTES", (1, 1)),
))
# fusion outputs sent only with the requests that need them (thinking; a guide): the decoder's optional input is then
# left unfed, as for an omitted output (ensemble_scheduler.cc, above)
FUSION_PER_REQUEST = (LORA_TASK_ID, GUIDED_DECODING_GUIDE_TYPE, GUIDED_DECODING_GUIDE)
# TensorRT-LLM 1.2 `inflight_batcher_llm/tensorrt_llm/config.pbtxt`: the subset the ensemble feeds, plus the optional
# inputs a direct client may use, with the same dims, reshape, optional and allow_ragged_batch flags as there.
DECODER_STAGE = StageSpec(DECODER, inputs=(
    TensorSpec(INPUT_IDS, "INT32", (-1,), optional=True, ragged=True),
    *(_scalar(n, t) for n, t in (
        (INPUT_LENGTHS, "INT32"), (REQUEST_OUTPUT_LEN, "INT32"), (END_ID, "INT32"), (PAD_ID, "INT32"),
        (STREAMING, "BOOL"), (RUNTIME_TOP_K, "INT32"), (RUNTIME_TOP_P, "FP32"), (TEMPERATURE, "FP32"),
        (REPETITION_PENALTY, "FP32"), (SEED, "UINT64"), (MIN_TOKENS, "INT32"))),
    TensorSpec(PROMPT_EMBEDDING_TABLE, TABLE, (-1, -1), optional=True, ragged=True),
    TensorSpec(PROMPT_TABLE_EXTRA_IDS, "UINT64", (-1,), optional=True, ragged=True),
    _scalar(PROMPT_VOCAB_SIZE, "INT32"),
    TensorSpec(STOP_WORDS_LIST, "INT32", (2, -1), optional=True, ragged=True),
    _scalar(STOP, "BOOL"),  # true: stop the running request of this id (cancel; never sent by the ensemble)
    _scalar(LORA_TASK_ID, "UINT64"),  # inflight_batcher_llm/tensorrt_llm/config.pbtxt: UINT64 [1] reshape [] optional
    TensorSpec(GUIDED_DECODING_GUIDE_TYPE, "BYTES", (1,), optional=True, ragged=True),
    TensorSpec(GUIDED_DECODING_GUIDE, "BYTES", (1,), optional=True, ragged=True),
    # the same config.pbtxt: lora_weights [-1, -1] optional ragged (TYPE_FP16 there: ours is the engine's dtype, which
    # TensorRT-LLM requires of request weights, runtime/loraUtils.cpp), lora_config INT32 [-1, 3] optional ragged
    TensorSpec(LORA_WEIGHTS, TABLE, (-1, -1), optional=True, ragged=True),
    TensorSpec(LORA_CONFIG, "INT32", (-1, 3), optional=True, ragged=True),
), outputs=(
    TensorSpec(OUTPUT_IDS, "INT32", (-1, -1)),  # [beam, T]
    TensorSpec(SEQUENCE_LENGTH, "INT32", (-1,)),  # [beam]
))
# token ids → text, incremental for streams
POSTPROCESS_STAGE = StageSpec(POSTPROCESS, inputs=(
    TensorSpec(OUTPUT_IDS, "INT32", (-1, -1, -1)),  # [1, beam, T]
    TensorSpec(SEQUENCE_LENGTH, "INT32", (-1, -1)),  # [1, beam]
), outputs=RESPONSE_OUTPUTS)
STEPS = (PREPROCESS_STAGE, ENCODER_STAGE, FUSION_STAGE, DECODER_STAGE, POSTPROCESS_STAGE)
CANCEL_STAGE = StageSpec(CANCEL, inputs=(CANCEL_INPUT,), outputs=(CANCEL_OUTPUT,))
ENSEMBLE_STAGE = StageSpec(ENSEMBLE, inputs=REQUEST_INPUTS, outputs=RESPONSE_OUTPUTS)
DECODER_FRONT_STAGE = StageSpec(DECODER_FRONT, inputs=DECODER_STAGE.inputs, outputs=DECODER_STAGE.outputs)
MODELS = {s.name: s for s in (*STEPS, ENSEMBLE_STAGE, CANCEL_STAGE, DECODER_FRONT_STAGE)}
