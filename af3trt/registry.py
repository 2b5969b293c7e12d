"""The facts af3trt relies on, once: what can be built (precisions, KV caches and the TensorRT-LLM strings they
map to), which GPU runs what, how checkpoints spell dtypes and rope, and the published AF3 sizes.

Every other module imports these; none repeats them. This module imports nothing of af3trt, so any layer may use
it (tests/test_architecture.py). Each fact names where it was read.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

# ---------------------------------------------------------------------------------------------- the GPU stack

# What the GPU half is written against: the serving container nvcr.io/nvidia/tritonserver:26.04-trtllm-python-py3
# (tensorrtllm_backend r26.04) ships TensorRT-LLM 1.2.1 and TensorRT 10.14.
TRTLLM_LINE = "1.2"
TENSORRT_LINE = "10.14"
SERVING_CONTAINER = "nvcr.io/nvidia/tritonserver:26.04-trtllm-python-py3"

# ---------------------------------------------------------------------------------------------- precisions

# Decoder weights/activations of the GPU target (TensorRT-LLM 1.2 checkpoints written by export/quantize.py).
DECODER_PRECISIONS = ("bf16", "fp16", "fp8", "int8_sq", "int8_wo", "int4_awq")
KV_CACHES = ("auto", "fp8", "int8")  # auto: the engine dtype
WEIGHT_ONLY_PRECISIONS = ("int8_wo", "int4_awq")
INTEGER_PRECISIONS = ("int8_sq", "int8_wo", "int4_awq")  # INT8/INT4 weights
# The TensorRT encoder engine (build/trt_encoder.py) and the CPU encoder (ONNX Runtime; int8 = dynamic quantization).
GPU_ENCODER_PRECISIONS = ("fp16", "bf16", "fp32", "int8", "fp8")
CPU_ENCODER_PRECISIONS = ("fp32", "int8")

# config.json `quantization` of a TensorRT-LLM 1.2 checkpoint per precision (tensorrt_llm/quantization/mode.py
# QuantAlgo; written by modelopt's export_tensorrt_llm_checkpoint for the matching modelopt config).
QUANT_ALGO = {"bf16": None, "fp16": None, "fp8": "FP8", "int8_sq": "W8A8_SQ_PER_CHANNEL", "int8_wo": "W8A16",
              "int4_awq": "W4A16_AWQ"}
KV_CACHE_QUANT_ALGO = {"auto": None, "fp8": "FP8", "int8": "INT8"}
# The engine dtype of the unquantized precisions (checkpoint config.json `dtype`).
PRECISION_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}

# ---------------------------------------------------------------------------------------------- GPUs

# TensorRT-LLM 1.2 builder.py / the TensorRT 10.14 support matrix:
FP8_MIN_SM = 89  # FP8 weights or KV cache: Ada (8.9), Hopper (9.0), Blackwell; not A100 (8.0) or A10 (8.6)
BF16_MIN_SM = 80  # bf16 tensor cores: Ampere and newer
NO_INT8_SMS = range(100, 120)  # builder.py: "INT8/INT4 quantization is not supported on SM>=100" (and < 120)
# Lowest SM whose tensor cores TensorRT uses for each encoder engine precision (TensorRT support matrix).
ENCODER_MIN_SM = {"fp32": 75, "fp16": 75, "int8": 75, "bf16": 80, "fp8": 89}


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


def check_precision_names(precision: str, kv_cache: str, error: type[Exception] = ValueError) -> None:
    """`error` unless both name a decoder precision and a KV cache af3trt builds."""
    if precision not in DECODER_PRECISIONS:
        raise error(f"precision must be one of {DECODER_PRECISIONS}, got {precision!r}")
    if kv_cache not in KV_CACHES:
        raise error(f"kv_cache must be one of {KV_CACHES}, got {kv_cache!r}")


def check_precision(precision: str, kv_cache: str = "auto", gpu: GpuInfo | None = None) -> list[str]:
    """Raise PrecisionError when `gpu` cannot run this decoder precision / KV cache; return notes (e.g. when nothing
    could be checked)."""
    check_precision_names(precision, kv_cache)
    if gpu is None:
        return ["no GPU detected and none declared (--gpu): precision support was not checked"]
    problems = []
    fp8_parts = [what for what, on in (("FP8 weights", precision == "fp8"), ("an FP8 KV cache", kv_cache == "fp8"))
                 if on]
    if fp8_parts and not supports_fp8(gpu.sm):
        problems.append(f"{' and '.join(fp8_parts)} need an SM 8.9+ GPU (Ada L4/L40S, Hopper H100/H200, Blackwell); "
                        f"{gpu.name} is SM {gpu.compute_capability[0]}.{gpu.compute_capability[1]}. "
                        f"Use int8_wo, int8_sq or int4_awq weights and an int8 or auto KV cache there.")
    if gpu.sm < BF16_MIN_SM and precision != "fp16":
        problems.append(f"{gpu.name} (SM {gpu.sm}) has no bf16 tensor cores; build with --precision fp16")
    int8_parts = [what for what, on in (("INT8/INT4 weights", precision in INTEGER_PRECISIONS),
                                        ("an INT8 KV cache", kv_cache == "int8")) if on]
    if int8_parts and gpu.sm in NO_INT8_SMS:
        problems.append(f"{' and '.join(int8_parts)}: TensorRT-LLM 1.2 refuses INT8/INT4 quantization on SM "
                        f"{gpu.sm} ({gpu.name}); use fp8 (or bf16) with an fp8 KV cache")
    if problems:
        raise PrecisionError(f"precision {precision} with KV cache {kv_cache} on {gpu.name}: " + " ".join(problems))
    return []


def check_encoder_precision(precision: str, sm: int | None) -> None:
    """ValueError when a GPU of compute capability `sm` (e.g. 80 for A100) cannot run the encoder in `precision`;
    None (GPU unknown) checks nothing."""
    if precision not in ENCODER_MIN_SM:
        raise ValueError(f"encoder precision must be one of {sorted(ENCODER_MIN_SM)}, got {precision!r}")
    if sm is not None and sm < ENCODER_MIN_SM[precision]:
        raise ValueError(f"a {precision} encoder needs an SM {ENCODER_MIN_SM[precision] / 10:.1f}+ GPU, this one is SM "
                         f"{sm / 10:.1f}" + (": use int8 or fp16" if precision == "fp8" else ""))


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
