"""Triton model configurations of the AF3 ensemble, built as `model_config_pb2.ModelConfig` messages.

One function per model; each takes the typed `RepoSpec` that build_engines.py derives from the checkpoint and
the serving limits. Nothing here is text substitution: `render()` prints the protobuf, and `parse()` reads a
config.pbtxt back (both in runtime/triton/model_config.py, which the serving side uses too). Every model's inputs and
outputs, and so the ensemble's input/output maps, come from runtime/stages/contract.py (built from, not copied); what this
module adds is per repository: the hidden size and decoder dtype, the tensors a repository leaves out, scheduling,
instances, and each python stage's parameters as its typed record (runtime/stages/params.py), which the stage parses
back when it loads.

    client ─▶ af3 (ensemble): preprocess → encoder → fusion → decoder (TensorRT-LLM's tensor contract) → postprocess

Triton allows the steps after a decoupled model to read only that model's outputs, so everything postprocess
needs about the request travels in the request context (runtime/triton/context.py), keyed by the request id.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tritonclient.grpc import model_config_pb2 as mc

from af3trt.runtime.stages import contract, lengths
from af3trt.runtime.stages.contract import CANCEL, ENSEMBLE, STAGES  # noqa: F401 - the model names, also read from here
from af3trt.runtime.stages.params import (CancelParams, DecoderFrontParams, DecoderParams, FusionParams,
                                          PostprocessParams, StageParams, record_of)
from af3trt.runtime.triton.model_config import parse, render  # noqa: F401 - config.pbtxt text, read from here by the build

T = mc.DataType
DTYPES = {"float32": T.TYPE_FP32, "float16": T.TYPE_FP16, "bfloat16": T.TYPE_BF16}

# Whether Triton's dynamic batcher gives the encoder the windows of several requests (of one frame bucket) in one
# execution, per target, when the build does not say (`af3trt build --encoder-batching / --no-encoder-batching`).
# CPU: off. Every CPU run since windows were cropped to their frame bucket measured it slower on (2 shared cores):
#   perf/results/latest/report.md (run 20261129T072252Z, fp32, docs/benchmarks.md): burst of 8 1.33 req/s on
#   against 2.23 off, steady c=8 1.23 against 2.17;
#   perf/results/latest/engine.md (run 20261202T001534Z, bf16, docs/performance-engine.md): burst 3.35 against
#   4.15 req/s, sustained 4.49 against 4.97, CPU 0.26/0.22 against 0.23/0.20 s per request, encoder 214 against
#   64 ms per request: with two cores a batch only makes requests wait for each other's windows.
# GPU: on. A TensorRT plan runs a batch of windows in one execution (its profile's max windows is encoder_max_batch,
# build/gpu_repo.py), the point of batching on a device; not measured here (no GPU on these machines).
ENCODER_BATCHING = {"cpu": False, "gpu": True}


@dataclass
class RepoSpec:
    """Everything the model configurations depend on: read from the checkpoint, or chosen as serving limits."""

    target: str  # "cpu" | "gpu"
    hidden_size: int  # text hidden size H (rows of the prompt table)
    decoder_dtype: str  # "float32" | "float16" | "bfloat16": the prompt table carries it end to end
    vocab_size: int  # first fake id of the prompt table (engine vocab, never the tokenizer size)
    end_id: int
    pad_id: int
    max_batch_size: int = 8  # concurrent sequences in the decoder
    max_audio_windows: int = lengths.MAX_WINDOWS  # per request (20 = 10 min)
    max_input_len: int = 4096  # text + audio tokens per request
    max_output_len: int = 512
    default_max_tokens: int = 128
    encoder_max_batch: int = 64  # windows per encoder execution
    encoder_queue_delay_us: int = 2000
    # False: the encoder runs one request per execution (Triton batches none); None: the target's ENCODER_BATCHING
    encoder_batching: bool | None = None
    preprocess_instances: int = 1
    encoder_instances: int = 1
    fusion_instances: int = 1
    decoder_instances: int = 1
    # fusion also sends prompt_table_extra_ids (one uint64 per input token: 0 for text, a hash of the request's
    # prompt table for its audio rows). TensorRT-LLM 1.2 rejects a request with a prompt table and no extra ids when
    # enable_kv_cache_reuse is on, and without them would reuse KV blocks across different audio (same fake ids).
    prompt_table_extra_ids: bool = False
    # Overload: preprocess, encoder (but a GPU one built unbatched), fusion and decoder each hold at most
    # max_queue_size requests waiting and reject more at once (Triton: "Exceeds maximum queue size", UNAVAILABLE); a
    # request that waited queue_timeout_ms is rejected ("Request timeout expired"). The CPU decoder bounds its own
    # waiting list the same way ("server busy: ..."). 0 = unbounded / no timeout. Postprocess is never bounded: every
    # streamed token is a request to it.
    max_queue_size: int = 32
    queue_timeout_ms: int = 120000  # a backstop: max_queue_size is what fails fast; CPU requests take seconds
    # Each python stage's own parameters, by field of its record (runtime/stages/params.py: typed values, checked
    # when the record is made), besides those derived from the fields above: e.g. encoder_params={"onnx_path": ...}.
    # On the GPU target decoder_params are the tensorrtllm backend's, by upstream's names, as strings.
    decoder_params: dict[str, object] = field(default_factory=dict)
    encoder_params: dict[str, object] = field(default_factory=dict)
    fusion_params: dict[str, object] = field(default_factory=dict)
    postprocess_params: dict[str, object] = field(default_factory=dict)
    preprocess_params: dict[str, object] = field(default_factory=dict)
    # the checkpoint's end ids after end_id: fusion sends them as stop_words_list, postprocess trims them
    # (runtime/stages/stop_words.py); empty when the checkpoint names one end id
    stop_ids: list[int] = field(default_factory=list)
    # GPU preprocessing kernels (af3trt.kernels): preprocess computes the log-mel on the device and fusion builds the
    # prompt table there (and keeps its inputs where Triton has them). None: on for target "gpu", off for "cpu".
    gpu_kernels: bool | None = None
    # The ensemble's decoder step is the decoder front (triton_repo/decoder_front) calling the decoder by BLS: it
    # coalesces streams (the tensorrtllm backend sends one response per token), gives every request an id of its own
    # and refuses a duplicate in flight, and sends think/'s adapter. None: on for target "gpu", off for "cpu" (whose
    # decoder does all of it itself); on for a CPU repository it plays the GPU's ensemble shape (the stand-in bench).
    decoder_front: bool | None = None
    decoder_front_params: dict[str, object] = field(default_factory=dict)  # its DecoderFrontParams fields

    @property
    def batches_encoder(self) -> bool:
        """The encoder gets a dynamic batcher: the build's choice, else its target's default (ENCODER_BATCHING)."""
        return ENCODER_BATCHING[self.target] if self.encoder_batching is None else self.encoder_batching


def gpu_kernels(spec: RepoSpec) -> bool:
    """Whether preprocess and fusion take the device path (their records' gpu_kernels, af3trt.kernels.device_of)."""
    return spec.target == "gpu" if spec.gpu_kernels is None else spec.gpu_kernels


# The python backend copies every input to the CPU before execute() unless FORCE_CPU_ONLY_INPUT_TENSORS is "no"; with
# "no" it hands over tensors where they were last used, e.g. the TensorRT encoder's output on the GPU
# (triton-inference-server/python_backend README, "Input Tensor Device Placement"; src/python_be.cc defaults
# force_cpu_only_input_tensors_ to true). A backend parameter, not a stage's: set beside the record.
INPUTS_WHERE_THEY_ARE = {"FORCE_CPU_ONLY_INPUT_TENSORS": "no"}


def triton_type(datatype: str) -> int:
    """A contract datatype (Triton's wire name) as config.pbtxt's DataType: BYTES is TYPE_STRING."""
    return T.TYPE_STRING if datatype == "BYTES" else T.Value(f"TYPE_{datatype}")


def _typed(t: contract.TensorSpec, spec: RepoSpec) -> dict:
    """A contract tensor's data_type and dims for this repository (TABLE: the decoder dtype, H: the hidden size)."""
    dtype = DTYPES[spec.decoder_dtype] if t.datatype == contract.TABLE else triton_type(t.datatype)
    return dict(name=t.name, data_type=dtype, dims=[spec.hidden_size if d == contract.H else d for d in t.dims])


def _input(t: contract.TensorSpec, spec: RepoSpec) -> mc.ModelInput:
    i = mc.ModelInput(**_typed(t, spec), optional=t.optional, allow_ragged_batch=t.ragged)
    if t.reshape is not None:
        i.reshape.SetInParent()
        i.reshape.shape.extend(t.reshape)
    return i


def _output(t: contract.TensorSpec, spec: RepoSpec) -> mc.ModelOutput:
    return mc.ModelOutput(**_typed(t, spec))


def omitted(spec: RepoSpec) -> set[str]:
    """Tensors this repository leaves out of fusion's outputs (and so of the decoder's feed)."""
    return {n for n, on in ((contract.PROMPT_TABLE_EXTRA_IDS, spec.prompt_table_extra_ids),
                            (contract.STOP_WORDS_LIST, bool(spec.stop_ids)),
                            # think/'s LoRA task id: only a repository built with the adapter has it (build/think.py);
                            # fusion then sends it with thinking requests only
                            (contract.LORA_TASK_ID, spec.fusion_params.get("think_lora_task_id") is not None))
            if not on}


def front(spec: RepoSpec) -> bool:
    """Whether the ensemble's decoder step is the decoder front (RepoSpec.decoder_front)."""
    return spec.target == "gpu" if spec.decoder_front is None else spec.decoder_front


def _interface(cfg: mc.ModelConfig, spec: RepoSpec, window_axis: bool = False, skip: tuple[str, ...] = ()) -> None:
    """A model's inputs and outputs, as the contract declares them (less the inputs in `skip`). window_axis: the
    contract declares them per window (a batching model's batch axis) but this model takes whole requests
    (max_batch_size 0): the window axis comes first in each."""
    stage = contract.MODELS[cfg.name]
    cfg.input.extend(_input(t, spec) for t in stage.inputs if t.name not in skip)
    cfg.output.extend(_output(t, spec) for t in stage.outputs if t.name not in omitted(spec))
    if window_axis:
        for t in (*cfg.input, *cfg.output):
            t.dims.insert(0, -1)


def _params(cfg: mc.ModelConfig, params: dict[str, str]) -> None:
    for k, v in sorted(params.items()):
        cfg.parameters[k].string_value = str(v)


def stage_params(spec: RepoSpec, model: str, own: dict[str, object], **derived) -> StageParams:
    """The model's parameter record on this target: `derived` from the spec, then the stage's `own` (RepoSpec
    <model>_params). A name the record does not have, or a value of the wrong type, is an error here, at build time."""
    record = record_of(model, spec.target)
    try:
        return record(**derived, **own)
    except TypeError as e:
        raise ValueError(f"{model} ({record.__name__}, runtime/stages/params.py): {e}") from None


def _bound_queue(cfg: mc.ModelConfig, spec: RepoSpec) -> None:
    """Triton's queue policy on a model's scheduler: REJECT past max_queue_size or queue_timeout_ms (a client may
    ask for a shorter timeout). A max_batch_size 0 model gets a dynamic batcher of single requests for it."""
    if not (spec.max_queue_size or spec.queue_timeout_ms):
        return
    policy = cfg.dynamic_batching.default_queue_policy
    policy.timeout_action = mc.ModelQueuePolicy.REJECT
    policy.max_queue_size = spec.max_queue_size
    policy.default_timeout_microseconds = spec.queue_timeout_ms * 1000
    policy.allow_timeout_override = True


def _python(name: str, max_batch_size: int, instances: int) -> mc.ModelConfig:
    cfg = mc.ModelConfig(name=name, backend="python", max_batch_size=max_batch_size)
    cfg.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=instances)
    return cfg


def preprocess_config(spec: RepoSpec) -> mc.ModelConfig:
    cfg = _python(contract.PREPROCESS, 0, spec.preprocess_instances)
    _interface(cfg, spec)
    _params(cfg, stage_params(spec, contract.PREPROCESS, spec.preprocess_params,
                              max_audio_windows=spec.max_audio_windows, gpu_kernels=gpu_kernels(spec)).render())
    _bound_queue(cfg, spec)
    return cfg


def encoder_config(spec: RepoSpec) -> mc.ModelConfig:
    # The frame axis T is dynamic (each request's frame bucket). These inputs are not allow_ragged_batch, so Triton's
    # dynamic batcher merges only requests of the same [128, T] (triton-inference-server/core src/backend_model.cc:
    # variable-size inputs without allow_ragged_batch go into enforce_equal_shape_tensors): batching is per frame
    # bucket, and a 1-s window is never padded to 30 s by a neighbour.
    if spec.target == "gpu":
        # The TensorRT engine (build/trt_encoder.py) is encoder/1/model.plan, run by a python-backend model
        # (triton_repo/encoder_trt/model.py): the serving container has no Triton TensorRT backend (tensorrtllm_backend
        # r26.04 docs/build.md; server issue #7346). Its profile's max windows must equal encoder_max_batch
        # (build/gpu_repo.py sets both from one number). Inputs are taken wherever Triton holds them (python_backend
        # r26.04 README, FORCE_CPU_ONLY_INPUT_TENSORS).
        cfg = mc.ModelConfig(name=contract.ENCODER, backend="python", max_batch_size=spec.encoder_max_batch)
        # gpus [0]: without it Triton places `count` instances on every visible GPU ("By default, a single
        # execution instance of the model is created for each GPU available in the system": server r26.04
        # docs/user_guide/model_configuration.md, Instance Groups), memory the plan does not count under TP 2 or
        # `--gpus all`. GPU 0 is the ensemble's: preprocess/fusion kernels use cuda:0, the plan's pool is on 0.
        cfg.instance_group.add(kind=mc.ModelInstanceGroup.KIND_GPU, count=spec.encoder_instances, gpus=[0])
        _params(cfg, INPUTS_WHERE_THEY_ARE)
    else:
        # Without batching a request (all its windows) is one execution: max_batch_size 0, so that the dynamic
        # batcher holding the queue policy (_bound_queue, as for preprocess) has nothing to batch along and the
        # encoder's queue stays bounded (Triton's queue policy exists only on the dynamic batcher:
        # model_config.proto, ModelDynamicBatching.default_queue_policy).
        cfg = _python(contract.ENCODER, spec.encoder_max_batch if spec.batches_encoder else 0, spec.encoder_instances)
    _interface(cfg, spec, window_axis=cfg.max_batch_size == 0)
    if spec.batches_encoder:
        cfg.dynamic_batching.max_queue_delay_microseconds = spec.encoder_queue_delay_us
    if spec.batches_encoder or cfg.max_batch_size == 0:
        _bound_queue(cfg, spec)
    _params(cfg, stage_params(spec, contract.ENCODER, spec.encoder_params).render())
    return cfg


def fusion_config(spec: RepoSpec) -> mc.ModelConfig:
    cfg = _python(contract.FUSION, 0, spec.fusion_instances)
    _interface(cfg, spec)
    params: FusionParams = stage_params(
        spec, contract.FUSION, spec.fusion_params, vocab_size=spec.vocab_size, hidden_size=spec.hidden_size,
        dtype=spec.decoder_dtype, end_id=spec.end_id, pad_id=spec.pad_id, max_input_len=spec.max_input_len,
        max_output_len=spec.max_output_len, default_max_tokens=spec.default_max_tokens,
        prompt_table_extra_ids=spec.prompt_table_extra_ids, stop_ids=tuple(spec.stop_ids),
        gpu_kernels=gpu_kernels(spec))
    _params(cfg, {**params.render(), **(INPUTS_WHERE_THEY_ARE if params.gpu_kernels else {})})
    _bound_queue(cfg, spec)
    return cfg


def _true(value: str | None, default: bool) -> bool:
    """A boolean parameter as the tensorrtllm backend reads it (True/true/TRUE/1; absent → its default)."""
    return default if value is None else value in ("True", "true", "TRUE", "1")


def decoder_config(spec: RepoSpec) -> mc.ModelConfig:
    # The 1.2 backend turns KV-cache reuse ON when enable_kv_cache_reuse is absent, and then fails every request that
    # carries a prompt table (fusion always sends one) without prompt_table_extra_ids.
    if spec.target == "gpu" and _true(spec.decoder_params.get("enable_kv_cache_reuse"), True) \
            and not spec.prompt_table_extra_ids:
        raise ValueError("enable_kv_cache_reuse is on for the tensorrtllm decoder (also its default when unset): "
                         "set RepoSpec.prompt_table_extra_ids so that fusion sends prompt_table_extra_ids")
    if spec.target == "gpu":
        cfg = mc.ModelConfig(name=contract.DECODER, backend="tensorrtllm", max_batch_size=spec.max_batch_size)
        cfg.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=1)  # the backend places work on GPUs
    else:
        cfg = _python(contract.DECODER, spec.max_batch_size, spec.decoder_instances)
    cfg.model_transaction_policy.decoupled = True
    cfg.dynamic_batching.SetInParent()
    _bound_queue(cfg, spec)
    # all the inputs the backend takes that fusion or the front sends, a direct client may send; the CPU decoder reads
    # its adapter from lora_dir, never from a request
    _interface(cfg, spec, skip=(contract.LORA_WEIGHTS, contract.LORA_CONFIG) if spec.target == "cpu" else ())
    if spec.target == "gpu":  # the tensorrtllm backend's parameters, by upstream's names
        _params(cfg, {"max_input_len": spec.max_input_len, "max_output_len": spec.max_output_len,
                      "exclude_input_in_output": "true", **spec.decoder_params})
    else:  # the CPU engine bounds its own waiting list (the tensorrtllm backend has its own scheduler)
        params: DecoderParams = stage_params(
            spec, contract.DECODER, spec.decoder_params, max_batch_size=spec.max_batch_size,
            max_input_len=spec.max_input_len, max_output_len=spec.max_output_len, max_queue_size=spec.max_queue_size,
            queue_timeout_ms=spec.queue_timeout_ms)
        _params(cfg, params.render())
    return cfg


def decoder_front_config(spec: RepoSpec) -> mc.ModelConfig:
    """The ensemble's decoder step when `front(spec)`: a decoupled python model with the decoder's interface that
    calls the decoder by BLS (triton_repo/decoder_front). One instance: it keeps the ids in flight (a second instance
    would not see the first's). Inputs are taken where Triton has them (the prompt table stays on the GPU:
    FORCE_CPU_ONLY_INPUT_TENSORS "no", python_backend r26.04 README "Input Tensor Device Placement"); its CUDA
    context is in the memory plan (build/memory_plan.py CUDA_PROCESSES)."""
    cfg = mc.ModelConfig(name=contract.DECODER_FRONT, backend="python", max_batch_size=spec.max_batch_size)
    cfg.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=1)
    cfg.model_transaction_policy.decoupled = True
    cfg.dynamic_batching.SetInParent()
    _bound_queue(cfg, spec)
    _interface(cfg, spec)
    params: DecoderFrontParams = stage_params(spec, contract.DECODER_FRONT, spec.decoder_front_params)
    _params(cfg, {**params.render(), **INPUTS_WHERE_THEY_ARE})
    return cfg


def postprocess_config(spec: RepoSpec) -> mc.ModelConfig:
    # One instance: it keeps the incomplete UTF-8 tail of each streamed request between responses.
    cfg = _python(contract.POSTPROCESS, 0, 1)
    _interface(cfg, spec)
    params: PostprocessParams = stage_params(spec, contract.POSTPROCESS, spec.postprocess_params,
                                             stop_ids=tuple(spec.stop_ids))
    _params(cfg, params.render())
    return cfg


def ensemble_maps(spec: RepoSpec) -> list[tuple[str, dict[str, str], dict[str, str]]]:
    """Each step's (model, input_map, output_map), derived from the contract: a step reads a tensor from the latest
    earlier step that writes it (the ensemble's internal tensor `_<name>`), else from the request input of that name;
    an input neither provides is left unfed (the decoder's optional inputs for direct clients). A step's output is a
    response output when no later step writes that name, else internal."""
    request = {t.name for t in contract.REQUEST_INPUTS}
    response = {t.name for t in contract.RESPONSE_OUTPUTS}
    written: set[str] = set()
    steps = []
    models = {contract.DECODER: contract.DECODER_FRONT} if front(spec) else {}  # the model that runs a step
    for i, stage in enumerate(contract.STEPS):
        inputs = {t.name: f"_{t.name}" if t.name in written else t.name for t in stage.inputs
                  if t.name in written or t.name in request}
        later = {t.name for s in contract.STEPS[i + 1:] for t in s.outputs}
        outs = [t.name for t in stage.outputs if t.name not in omitted(spec)]
        outputs = {n: n if n in response and n not in later else f"_{n}" for n in outs}
        written.update(outs)
        steps.append((models.get(stage.name, stage.name), inputs, outputs))
    return steps


def ensemble_config(spec: RepoSpec) -> mc.ModelConfig:
    cfg = mc.ModelConfig(name=ENSEMBLE, platform="ensemble", max_batch_size=0)
    _interface(cfg, spec)
    for model, inputs, outputs in ensemble_maps(spec):
        s = cfg.ensemble_scheduling.step.add(model_name=model, model_version=-1)
        s.input_map.update(inputs)
        s.output_map.update(outputs)
    return cfg


def cancel_config(spec: RepoSpec) -> mc.ModelConfig:
    """request_id (the af3 request to stop) → cancelled (an acknowledgement). Same model on both targets; no queue
    policy, so that a cancellation is never rejected as overload."""
    cfg = _python(CANCEL, 0, 1)
    _interface(cfg, spec)
    # the tensorrtllm decoder reads no mark: send it a stop request (runtime/triton/trtllm_stop.py)
    params: CancelParams = stage_params(spec, CANCEL, {}, stop_model=contract.DECODER if spec.target == "gpu" else None)
    _params(cfg, params.render())
    return cfg


def all_configs(spec: RepoSpec) -> dict[str, mc.ModelConfig]:
    return {
        "preprocess": preprocess_config(spec), "encoder": encoder_config(spec), "fusion": fusion_config(spec),
        "decoder": decoder_config(spec), "postprocess": postprocess_config(spec), ENSEMBLE: ensemble_config(spec),
        CANCEL: cancel_config(spec), **({contract.DECODER_FRONT: decoder_front_config(spec)} if front(spec) else {}),
    }

