"""The facts af3trt relies on, once: what can be built (one record per decoder and encoder precision: the
TensorRT-LLM strings and modelopt recipes it maps to, the GPUs it runs on, its size and accuracy bounds; the KV
caches), which GPU runs what, how checkpoints spell dtypes and rope, and the published AF3 sizes.

Every other module imports these; none repeats them. This module imports nothing of af3trt, so any layer may use
it (tests/test_architecture.py). Each fact names where it was read.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

# ---------------------------------------------------------------------------------------------- the GPU stack

# What the GPU half is written against: the serving container nvcr.io/nvidia/tritonserver:26.04-trtllm-python-py3
# (tensorrtllm_backend r26.04) ships TensorRT-LLM 1.2.1 and TensorRT 10.14.
TRTLLM_LINE = "1.2"
TENSORRT_LINE = "10.14"
SERVING_CONTAINER = "nvcr.io/nvidia/tritonserver:26.04-trtllm-python-py3"

# ---------------------------------------------------------------------------------------------- GPUs

# TensorRT-LLM 1.2 builder.py / the TensorRT 10.14 support matrix:
FP8_MIN_SM = 89  # FP8 weights or KV cache: Ada (8.9), Hopper (9.0), Blackwell; not A100 (8.0) or A10 (8.6)
BF16_MIN_SM = 80  # bf16 tensor cores: Ampere and newer
NO_INT8_SMS = range(100, 120)  # builder.py: "INT8/INT4 quantization is not supported on SM>=100" (and < 120)
TURING_SM = 75  # the oldest GPU of the TensorRT 10.14 support matrix: fp32, fp16, int8

# ---------------------------------------------------------------------------------------------- precisions

# Bytes of one [out, in] linear layer and its scales in a TensorRT-LLM checkpoint / engine of a precision:
# (out, in, engine dtype bytes, AWQ group) -> bytes (the tensors export/trtllm_checkpoint.py validates).
def _half_bytes(o: int, i: int, d: int, g: int) -> int:  # bf16/fp16 weights
    return o * i * d


def _fp8_bytes(o: int, i: int, d: int, g: int) -> int:  # fp8 weights, f32 weight and activation scales
    return o * i + 8


def _int8_sq_bytes(o: int, i: int, d: int, g: int) -> int:  # int8, f32 per-channel scales, smoothing, act. scale
    return o * i + 4 * o + d * i + 4


def _int8_wo_bytes(o: int, i: int, d: int, g: int) -> int:  # int8 weights, per-channel scales in the engine dtype
    return o * i + d * o


def _int4_awq_bytes(o: int, i: int, d: int, g: int) -> int:  # packed int4, per-group scales, smoothing factors
    return o * i // 2 + d * o * -(-i // g) + d * i


@dataclass(frozen=True)
class DecoderPrecision:
    """Everything af3trt decides by a decoder precision of the GPU target, in one record: the build, sizing,
    quantization, accuracy checks and the `--precision` choices look it up in DECODER_PRECISIONS and branch on
    nothing else. Adding a precision is adding a record (and, for a quant_algo new to af3trt, its tensors in
    export/trtllm_checkpoint.py's validator)."""

    name: str
    # config.json `quantization.quant_algo` of its TensorRT-LLM 1.2 checkpoint (tensorrt_llm/quantization/mode.py
    # QuantAlgo, as modelopt's export_tensorrt_llm_checkpoint writes it for `modelopt_cfg`)
    quant_algo: str | None
    # the nvidia-modelopt 0.47 preset (modelopt.torch.quantization) calibrated before export; None: the weights are
    # exported unquantized, in the engine dtype (trtllm-build quantizes them when quant_algo names a scheme)
    modelopt_cfg: str | None
    simulate_cfg: str | None  # the preset the CPU accuracy report fakes the precision with (build/trtllm_engine.py)
    linear_bytes: Callable[[int, int, int, int], int]  # see above; build/sizing.py reads it
    min_sm: int  # the oldest GPU (SM) that runs it
    # `af3trt gpu-check` (build/gpu_check.py): the share of golden token positions a GPU answer must agree on, and
    # how many leading tokens must match exactly
    min_agreement: float
    exact_prefix: int = 1
    dtype: str | None = None  # the engine dtype it fixes; None: the checkpoint's half dtype, else bfloat16
    weight_only: bool = False  # activations stay in the engine dtype; trtllm-build pads the layers (gpu_build.py)
    integer: bool = False  # INT8/INT4 weights: TensorRT-LLM 1.2 refuses them on NO_INT8_SMS
    # FP8 weights take TensorRT-LLM 1.2's FP8 workflow (builder.py): FP8 context FMHA and the FP8 GEMM plugin, and
    # paged context FMHA stays on with an FP8 KV cache (under other weights an FP8 KV cache turns it off)
    fp8_workflow: bool = False
    # AWQ: per-group int4 scales, the group size picked from the layer widths (export/quantize.awq_block_size_for);
    # calibration capped at max_calib_size samples, as TensorRT-LLM's quantize.py does (AWQ's search is slow)
    awq: bool = False
    max_calib_size: int | None = None

    @property
    def builder_quantizes(self) -> bool:
        """Exported unquantized and quantized by trtllm-build (TensorRT-LLM 1.2 quantize.py's int8_wo)."""
        return self.quant_algo is not None and self.modelopt_cfg is None


# The decoder precisions of the GPU target (TensorRT-LLM 1.2 checkpoints written by export/quantize.py). Presets and
# quant_algo strings: platform.md (modelopt 0.47, seen on CPU) and trtllm-1.2-contracts.md; int8_wo follows
# TensorRT-LLM 1.2's quantize.py, unquantized weights with quant_algo W8A16 (export/quantize.py's docstring says why).
# gpu-check: bf16/fp16 differ from the reference by rounding only; quantization moves greedy tokens.
DECODER_PRECISIONS: dict[str, DecoderPrecision] = {p.name: p for p in (
    DecoderPrecision("bf16", None, None, None, _half_bytes, BF16_MIN_SM, 0.75, exact_prefix=4, dtype="bfloat16"),
    DecoderPrecision("fp16", None, None, None, _half_bytes, TURING_SM, 0.75, exact_prefix=4, dtype="float16"),
    DecoderPrecision("fp8", "FP8", "FP8_DEFAULT_CFG", "FP8_DEFAULT_CFG", _fp8_bytes, FP8_MIN_SM, 0.5,
                     fp8_workflow=True),
    DecoderPrecision("int8_sq", "W8A8_SQ_PER_CHANNEL", "INT8_SMOOTHQUANT_CFG", "INT8_SMOOTHQUANT_CFG", _int8_sq_bytes,
                     BF16_MIN_SM, 0.5, integer=True),
    DecoderPrecision("int8_wo", "W8A16", None, "INT8_WEIGHT_ONLY_CFG", _int8_wo_bytes, BF16_MIN_SM, 0.5,
                     weight_only=True, integer=True),
    DecoderPrecision("int4_awq", "W4A16_AWQ", "INT4_AWQ_CFG", "INT4_AWQ_CFG", _int4_awq_bytes, BF16_MIN_SM, 0.25,
                     weight_only=True, integer=True, awq=True, max_calib_size=32),
)}
KV_CACHES = ("auto", "fp8", "int8")  # auto: the engine dtype
KV_CACHE_QUANT_ALGO = {"auto": None, "fp8": "FP8", "int8": "INT8"}


def decoder_precision(name: str, error: type[Exception] = ValueError) -> DecoderPrecision:
    """The record of a decoder precision (`error` naming the known ones when there is none)."""
    if name not in DECODER_PRECISIONS:
        raise error(f"precision must be one of {', '.join(DECODER_PRECISIONS)}, got {name!r}")
    return DECODER_PRECISIONS[name]


@dataclass(frozen=True)
class EncoderPrecision:
    """A precision of the TensorRT encoder engine (build/trt_encoder.py), prepared by export/onnx_quant.py."""

    name: str
    min_sm: int  # lowest SM whose tensor cores TensorRT uses for it (TensorRT 10.14 support matrix)
    qdq: bool = False  # explicit Q/DQ from modelopt ONNX PTQ, calibrated on real audio features
    # acceptance on held-out real-audio windows: cosine vs fp32 (None: fp32 is the reference). fp16/bf16 lose only
    # rounding; Q/DQ loses more, and FP8 (3 mantissa bits, attention BMMs quantized too) more than per-channel INT8
    min_cosine: float | None = None
    activation_bytes: int = 2  # per activation element in the engine (Q/DQ graphs keep their activations 16-bit)


GPU_ENCODER_PRECISIONS: dict[str, EncoderPrecision] = {p.name: p for p in (
    EncoderPrecision("fp16", TURING_SM, min_cosine=0.999),
    EncoderPrecision("bf16", BF16_MIN_SM, min_cosine=0.995),
    EncoderPrecision("fp32", TURING_SM, activation_bytes=4),
    EncoderPrecision("int8", TURING_SM, qdq=True, min_cosine=0.99),
    EncoderPrecision("fp8", FP8_MIN_SM, qdq=True, min_cosine=0.97),
)}
CPU_ENCODER_PRECISIONS = ("fp32", "int8")  # ONNX Runtime; int8 = dynamic quantization


@dataclass(frozen=True)
class CpuDecoderPrecision:
    """A precision of the CPU target's decoder (transformers' Qwen2ForCausalLM on torch, runtime/engines/decoder.py): the
    dtype its weights are written in at build time (export/extract_lm.py) and run in, and the accuracy gate it must
    pass against transformers' fp32 AF3 on the same prompts (tests/test_cpu_precision.py). The build, the
    repository (the prompt table's dtype) and `--cpu-decoder-precision` look it up here and branch on nothing else.

    The gate, teacher-forced on the fp32 reference's greedy answer (so one early divergence does not decide every
    later position): at least `min_agreement` of the answer positions pick the same token, the first `exact_prefix`
    tokens of a free-running answer equal the reference's, and every logit is within `max_logit_error` x the spread
    (standard deviation) of the reference's logits at that position. A precision that only changes the dtype answers,
    token for token, as transformers' AF3 with its language model in that dtype (the encoder fp32, as af3trt's ONNX
    encoder): tested for bf16."""

    name: str
    dtype: str | None  # torch dtype name of the weights; None: the checkpoint's own (no cast)
    # linear layers' weights int8 per output channel, quantized when the decoder loads, activations quantized per
    # step (torch dynamic quantization, fbgemm: AVX-512 VNNI / AVX2); the artifact stays in `dtype`
    int8_linear: bool = False
    min_agreement: float = 1.0
    exact_prefix: int = 24
    max_logit_error: float = 1e-4


# auto keeps the checkpoint's dtype: fp32 for the synthetic presets (so the token-exact parity tests compare fp32
# with fp32), bf16 for the real AF3 (its 7.6 B parameters are 15 GB in bf16, 30 GB in fp32). bf16 rounds the weights
# and every activation to 8 mantissa bits: answers drift from fp32's after some tokens; int8_dyn (8-bit weights per
# channel, 8-bit activations per tensor) moves many more greedy tokens on the synthetic presets' random weights.
# Bounds measured on the tiny and af3 presets (teacher-forced agreement bf16 0.98 / 0.94, int8_dyn 0.75 / 0.64; logit
# error bf16 0.27 / 0.20, int8_dyn 1.14 / 1.48 x std): tests/test_cpu_precision.py, docs/performance-engine.md.
CPU_DECODER_PRECISIONS: dict[str, CpuDecoderPrecision] = {p.name: p for p in (
    CpuDecoderPrecision("auto", None),
    CpuDecoderPrecision("fp32", "float32"),
    CpuDecoderPrecision("bf16", "bfloat16", min_agreement=0.9, exact_prefix=0, max_logit_error=0.35),
    CpuDecoderPrecision("int8_dyn", "float32", int8_linear=True, min_agreement=0.6, exact_prefix=0,
                        max_logit_error=1.6),
)}


def cpu_decoder_precision(name: str, error: type[Exception] = ValueError) -> CpuDecoderPrecision:
    """The record of a CPU decoder precision (`error` naming the known ones when there is none)."""
    if name not in CPU_DECODER_PRECISIONS:
        raise error(f"CPU decoder precision must be one of {', '.join(CPU_DECODER_PRECISIONS)}, got {name!r}")
    return CPU_DECODER_PRECISIONS[name]



@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: tuple[int, int]
    memory_mib: int  # nvidia-smi memory.total
    declared: bool = False  # True when named by the user rather than detected
    hbm_bytes_per_s: float | None = None  # datasheet peaks, for projections only (perf/projection.py)
    bf16_flops: float | None = None  # dense

    @property
    def sm(self) -> int:
        return self.compute_capability[0] * 10 + self.compute_capability[1]

    @property
    def memory_bytes(self) -> int:
        return self.memory_mib * 1024 * 1024

    def as_dict(self) -> dict:
        d = asdict(self)
        d["sm"] = self.sm
        return d


# Targets one can declare (`--gpu`); memory as nvidia-smi reports it for the common SKU; bandwidth and dense bf16
# peaks from NVIDIA's H100 and A100 datasheets (SXM).
KNOWN_GPUS = {
    "h100": GpuInfo("NVIDIA H100 80GB HBM3", (9, 0), 81559, True, 3.35e12, 989e12),
    "h200": GpuInfo("NVIDIA H200", (9, 0), 143771, True),
    "b200": GpuInfo("NVIDIA B200", (10, 0), 183359, True),
    "a100": GpuInfo("NVIDIA A100-SXM4-80GB", (8, 0), 81920, True, 2.0e12, 312e12),
    "a100-40gb": GpuInfo("NVIDIA A100-SXM4-40GB", (8, 0), 40960, True),
    "a10": GpuInfo("NVIDIA A10", (8, 6), 23028, True),
    "l40s": GpuInfo("NVIDIA L40S", (8, 9), 46068, True),
    "l4": GpuInfo("NVIDIA L4", (8, 9), 23034, True),
    "t4": GpuInfo("Tesla T4", (7, 5), 15360, True),
}


class PrecisionError(ValueError):
    """The precision cannot run on the target GPU."""


def supports_fp8(sm: int) -> bool:
    return sm >= FP8_MIN_SM


def check_precision_names(precision: str, kv_cache: str, error: type[Exception] = ValueError) -> DecoderPrecision:
    """The precision's record; `error` unless both name a decoder precision and a KV cache af3trt builds."""
    p = decoder_precision(precision, error)
    if kv_cache not in KV_CACHES:
        raise error(f"kv_cache must be one of {KV_CACHES}, got {kv_cache!r}")
    return p


def check_precision(precision: str, kv_cache: str = "auto", gpu: GpuInfo | None = None) -> list[str]:
    """Raise PrecisionError when `gpu` cannot run this decoder precision / KV cache; return notes (e.g. when nothing
    could be checked)."""
    p = check_precision_names(precision, kv_cache)
    if gpu is None:
        return ["no GPU detected and none declared (--gpu): precision support was not checked"]
    problems = []
    fp8_parts = [what for what, on in (("FP8 weights", p.fp8_workflow), ("an FP8 KV cache", kv_cache == "fp8")) if on]
    if fp8_parts and not supports_fp8(gpu.sm):
        instead = [q.name for q in DECODER_PRECISIONS.values() if q.integer and q.min_sm <= max(gpu.sm, BF16_MIN_SM)]
        problems.append(f"{' and '.join(fp8_parts)} need an SM 8.9+ GPU (Ada L4/L40S, Hopper H100/H200, Blackwell); "
                        f"{gpu.name} is SM {gpu.compute_capability[0]}.{gpu.compute_capability[1]}. "
                        f"Use {', '.join(instead[:-1])} or {instead[-1]} weights and an int8 or auto KV cache there.")
    if gpu.sm < BF16_MIN_SM <= p.min_sm:
        problems.append(f"{gpu.name} (SM {gpu.sm}) has no bf16 tensor cores; build with --precision fp16")
    elif gpu.sm < p.min_sm and not p.fp8_workflow:
        problems.append(f"{precision} weights need an SM {p.min_sm / 10:.1f}+ GPU; {gpu.name} is SM {gpu.sm / 10:.1f}")
    int8_parts = [what for what, on in (("INT8/INT4 weights", p.integer), ("an INT8 KV cache", kv_cache == "int8"))
                  if on]
    if int8_parts and gpu.sm in NO_INT8_SMS:
        problems.append(f"{' and '.join(int8_parts)}: TensorRT-LLM 1.2 refuses INT8/INT4 quantization on SM "
                        f"{gpu.sm} ({gpu.name}); use fp8 (or bf16) with an fp8 KV cache")
    if problems:
        raise PrecisionError(f"precision {precision} with KV cache {kv_cache} on {gpu.name}: " + " ".join(problems))
    return []


def check_encoder_precision(precision: str, sm: int | None) -> EncoderPrecision:
    """The encoder precision's record; ValueError when a GPU of compute capability `sm` (e.g. 80 for A100) cannot run
    the encoder in `precision`. None (GPU unknown) checks nothing."""
    if precision not in GPU_ENCODER_PRECISIONS:
        raise ValueError(f"encoder precision must be one of {sorted(GPU_ENCODER_PRECISIONS)}, got {precision!r}")
    p = GPU_ENCODER_PRECISIONS[precision]
    if sm is not None and sm < p.min_sm:
        fallback = [q.name for q in GPU_ENCODER_PRECISIONS.values() if q.qdq and q.min_sm <= sm]
        raise ValueError(f"a {precision} encoder needs an SM {p.min_sm / 10:.1f}+ GPU, this one is SM {sm / 10:.1f}"
                         + (f": use {' or '.join(fallback)} or fp16" if p.qdq and fallback else ""))
    return p


# ---------------------------------------------------------------------------------------------- checkpoints

# safetensors header dtype codes → (torch dtype name, bytes per element) (safetensors' format spec).
SAFETENSORS_DTYPES = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1), "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
}
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


def safetensors_dtype(code: str) -> str:
    """The torch dtype name of a safetensors header dtype code."""
    if code not in SAFETENSORS_DTYPES:
        raise ValueError(f"unknown safetensors dtype {code!r}")
    return SAFETENSORS_DTYPES[code][0]


def read_config(model_dir: Path | str) -> dict:
    """A model directory's config.json (FileNotFoundError naming the directory when it has none)."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {model_dir}")
    return json.loads(path.read_text(encoding="utf-8"))


def text_config(config: dict | Path | str) -> dict:
    """The decoder's config of an AF3 config (its text_config) or of a plain Qwen2 config; a dict or a directory."""
    cfg = config if isinstance(config, dict) else read_config(config)
    return dict(cfg.get("text_config") or cfg)


def rope_theta(text: dict) -> float | None:
    """RoPE base of a text config: transformers 5.x `rope_parameters.rope_theta`, else the 4.x `rope_theta`."""
    theta = (text.get("rope_parameters") or {}).get("rope_theta", text.get("rope_theta"))
    return None if theta is None else float(theta)


# ---------------------------------------------------------------------------------------------- AF3 as published

# The sizes of nvidia/audio-flamingo-3-hf (the config.json fields sizing reads), as package data: sizing, the
# memory plan and the projections are computed from it without the 16 GB download (`af3trt sizing --hf-model
# <this directory>`). Point --hf-model at a real checkpoint to size that instead.
AF3_REFERENCE_DIR = Path(__file__).resolve().parent / "reference"


def af3_reference_config() -> dict:
    return read_config(AF3_REFERENCE_DIR)
