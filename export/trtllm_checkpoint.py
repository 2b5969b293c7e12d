"""Validate a TensorRT-LLM 1.2 checkpoint directory for a Qwen2 decoder before it is sent to `trtllm-build`.

trtllm-build reads `config.json` into `PretrainedConfig`/`QWenConfig` (missing fields take defaults, some of them
silently wrong for Qwen2) and `rank{r}.safetensors` into the model built from that config (missing tensors fail late,
on the GPU machine; mis-shaped ones fail there too, or load silently when square). This module checks, on any
machine, what that code path reads — as found in TensorRT-LLM 1.2's models/modeling_utils.py (PretrainedConfig,
QuantConfig, preprocess_weights, load), models/qwen/{config,model}.py and quantization/{mode,layers,quantize}.py:

  config     architecture, dtype, sizes, hidden_act silu, rope_gpt_neox, norm_epsilon, rotary_base (QWenConfig's
             default is 10000.0: a missing value builds a wrong-rope engine without any error), qwen_type "qwen2"
             (the model reads it; "qwen" would halve intermediate_size), mapping, and `quantization`, whose keys
             must be QuantConfig fields (it is built with QuantConfig(**dict)) and whose algorithms must be 1.2 names
  tensors    per rank: every parameter the quantized QWenForCausalLM requires, with the dtype and per-rank shape it
             declares (fp8 weights + per-tensor scales, SmoothQuant int8 + per-channel scales + smoothing, weight-only,
             AWQ int4 packs + group scales, KV cache scales)

Extra config keys (modelopt's `producer`, `decoder`, ...) and extra tensors are tolerated, as TensorRT-LLM does.
Every problem is collected; `CheckpointError` lists them all.

    af3trt check-checkpoint CKPT_DIR [--hf-model LM_DIR]
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import struct
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from af3trt.registry import SAFETENSORS_DTYPES, rope_theta, text_config

# tensorrt_llm/quantization/mode.py (1.2): QuantAlgo; weights may use any but INT8, KV cache FP8/INT8/NVFP4.
QUANT_ALGOS = ("W8A16", "W4A16", "W4A16_AWQ", "W4A8_AWQ", "W8A16_GPTQ", "W4A16_GPTQ", "W8A8_SQ_PER_CHANNEL",
               "W8A8_SQ_PER_TENSOR_PLUGIN", "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN",
               "W8A8_SQ_PER_CHANNEL_PER_TENSOR_PLUGIN", "W8A8_SQ_PER_TENSOR_PER_TOKEN_PLUGIN",
               "W4A8_QSERVE_PER_GROUP", "W4A8_QSERVE_PER_CHANNEL", "FP8", "FP8_PER_CHANNEL_PER_TOKEN",
               "FP8_BLOCK_SCALES", "MIXED_PRECISION", "NVFP4", "W4A8_NVFP4_FP8", "W4A8_MXFP4_FP8",
               "W4A8_MXFP4_MXFP8", "W4A16_MXFP4", "NO_QUANT")
KV_CACHE_QUANT_ALGOS = ("FP8", "INT8", "NVFP4")
# What this validator knows the tensors of (what af3trt.export.quantize writes, plus plain W4A16).
CHECKED_QUANT_ALGOS = (None, "FP8", "W8A8_SQ_PER_CHANNEL", "W8A16", "W4A16", "W4A16_AWQ")
CHECKED_KV_CACHE_QUANT_ALGOS = (None, "FP8", "INT8")
# models/modeling_utils.py QuantConfig fields: an unknown key makes QuantConfig(**quantization) raise.
QUANT_CONFIG_KEYS = ("quant_algo", "kv_cache_quant_algo", "group_size", "smoothquant_val", "clamp_val",
                     "use_meta_recipe", "has_zero_point", "pre_quant_scale", "exclude_modules",
                     "mamba_ssm_cache_dtype")
# quantization/quantize.py quantize_layers: what is left unquantized when exclude_modules is None.
DEFAULT_EXCLUDE_MODULES = ("*lm_head", "*router", "*vocab_embedding", "*position_embedding", "*block_embedding",
                           "*shared_expert_gate")
ARCHITECTURES = ("Qwen2ForCausalLM", "QWenForCausalLM")  # both map to QWenForCausalLM in 1.2's MODEL_MAP
DTYPES = ("float16", "bfloat16", "float32")
ROTARY_SCALING_TYPES = ("linear", "dynamic", "yarn", "llama3", "longrope", "su", "mrope")
AWQ_GROUP_SIZES = (64, 128)


class CheckpointError(ValueError):
    """The checkpoint does not meet what trtllm-build 1.2 reads; `problems` lists every finding."""

    def __init__(self, ckpt_dir: Path, problems: list[str]):
        self.ckpt_dir = Path(ckpt_dir)
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{ckpt_dir}: {len(self.problems)} problem(s) for trtllm-build 1.2:\n{lines}")


@dataclass
class CheckpointReport:
    ckpt_dir: str
    architecture: str
    dtype: str
    quant_algo: str | None
    kv_cache_quant_algo: str | None
    world_size: int
    tp_size: int
    qwen_type: str
    rotary_base: float
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_size: int
    intermediate_size: int
    group_size: int | None
    n_tensors: list[int] = field(default_factory=list)
    bytes_per_rank: list[int] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def read_safetensors_header(path: Path) -> dict[str, tuple[str, tuple[int, ...], int]]:
    """{name: (dtype, shape, nbytes)} from a safetensors header, without reading tensor data."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path} is not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100_000_000:
            raise ValueError(f"{path} is not a safetensors file (header length {n})")
        header = json.loads(f.read(n))
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        out[name] = (SAFETENSORS_DTYPES.get(info["dtype"], (info["dtype"],))[0], tuple(info["shape"]), end - begin)
    return out


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# ---------------------------------------------------------------------------------------------- config checks

def check_config(config: dict, hf_config=None) -> tuple[list[str], list[str]]:
    """(problems, warnings) of a checkpoint config.json against TensorRT-LLM 1.2 and, if given, the HF config."""
    problems, warnings = [], []

    def need(key, ok, what):
        if key not in config:
            problems.append(f"config.json: `{key}` is missing ({what})")
            return False
        if not ok(config[key]):
            problems.append(f"config.json: `{key}` = {config[key]!r}, expected {what}")
            return False
        return True

    need("architecture", lambda v: v in ARCHITECTURES, f"one of {ARCHITECTURES}")
    need("dtype", lambda v: v in DTYPES, f"one of {DTYPES}")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size",
                "intermediate_size", "max_position_embeddings"):
        need(key, lambda v: _is_int(v) and v > 0, "a positive integer")
    need("hidden_act", lambda v: v == "silu", "'silu' (Qwen2's gated MLP; the default is 'gelu')")
    need("position_embedding_type", lambda v: v == "rope_gpt_neox",
         "'rope_gpt_neox' (the default is learned_absolute)")
    need("norm_epsilon", lambda v: _is_num(v) and v > 0, "a positive number (the default is 1e-5)")
    if "rotary_base" not in config:
        problems.append("config.json: `rotary_base` is missing: TensorRT-LLM's QWenConfig then uses 10000.0 and the "
                        "engine computes rope with the wrong base, answering wrongly without any error "
                        "(modelopt's export does not write it; TensorRT-LLM's quantize.py patches it for qwen2)")
    else:
        need("rotary_base", lambda v: _is_num(v) and v > 0, "a positive number")
    need("qwen_type", lambda v: v == "qwen2",
         "'qwen2' (QWenForCausalLM reads it; 'qwen' would halve intermediate_size)")
    if config.get("attn_bias") is False:
        problems.append("config.json: `attn_bias` is false, but Qwen2's qkv projection has a bias")
    if config.get("mlp_bias") is True:
        problems.append("config.json: `mlp_bias` is true, but Qwen2's MLP has no bias")
    if "logits_dtype" in config and config["logits_dtype"] not in ("float16", "float32"):
        problems.append(f"config.json: `logits_dtype` = {config['logits_dtype']!r}, expected float16 or float32")
    scaling = config.get("rotary_scaling")
    if scaling is not None:
        kind = scaling.get("type", scaling.get("rope_type")) if isinstance(scaling, dict) else None
        if kind not in ROTARY_SCALING_TYPES:
            problems.append(f"config.json: `rotary_scaling` = {scaling!r}: type must be one of "
                            f"{ROTARY_SCALING_TYPES} (plain rope is null)")
    if _is_num(config.get("rotary_pct", 1.0)) and config.get("rotary_pct", 1.0) != 1.0:
        problems.append(f"config.json: `rotary_pct` = {config['rotary_pct']}, Qwen2 rotates the whole head (1.0)")
    if all(_is_int(config.get(k)) and config.get(k, 0) > 0 for k in ("hidden_size", "num_attention_heads")):
        head = config["hidden_size"] // config["num_attention_heads"]
        if config.get("head_size", head) != head:
            problems.append(f"config.json: `head_size` = {config['head_size']}, expected hidden/heads = {head}")
        if _is_int(config.get("num_key_value_heads")) and config["num_attention_heads"] % config["num_key_value_heads"]:
            problems.append("config.json: num_attention_heads is not a multiple of num_key_value_heads")

    mapping = config.get("mapping")
    if not isinstance(mapping, dict):
        problems.append("config.json: `mapping` is missing or not an object ({world_size, tp_size, pp_size})")
    else:
        for key in ("world_size", "tp_size", "pp_size"):
            if not (_is_int(mapping.get(key)) and mapping[key] > 0):
                problems.append(f"config.json: mapping.{key} = {mapping.get(key)!r}, expected a positive integer")
        if all(_is_int(mapping.get(k)) for k in ("world_size", "tp_size", "pp_size")):
            cp = mapping.get("cp_size", 1)
            if mapping["world_size"] != mapping["tp_size"] * mapping["pp_size"] * cp:
                problems.append(f"config.json: mapping.world_size {mapping['world_size']} != tp_size "
                                f"{mapping['tp_size']} x pp_size {mapping['pp_size']} x cp_size {cp}")
            if mapping["pp_size"] != 1 or cp != 1:
                problems.append("config.json: pipeline/context parallelism is not supported by af3trt (tp only)")

    quant = config.get("quantization", {})
    if quant is None:
        quant = {}
    if not isinstance(quant, dict):
        problems.append("config.json: `quantization` must be an object")
        quant = {}
    unknown = sorted(set(quant) - set(QUANT_CONFIG_KEYS))
    if unknown:
        problems.append(f"config.json: quantization has keys {unknown} that TensorRT-LLM 1.2's QuantConfig does not "
                        f"accept (QuantConfig(**quantization) raises); allowed: {QUANT_CONFIG_KEYS}")
    algo, kv = quant.get("quant_algo"), quant.get("kv_cache_quant_algo")
    if algo is not None and algo not in QUANT_ALGOS:
        problems.append(f"config.json: quantization.quant_algo = {algo!r} is not a TensorRT-LLM 1.2 QuantAlgo "
                        f"(e.g. {', '.join(CHECKED_QUANT_ALGOS[1:])})")
    elif algo not in CHECKED_QUANT_ALGOS:
        problems.append(f"config.json: quantization.quant_algo = {algo!r} is valid for TensorRT-LLM but not a format "
                        f"af3trt produces or checks ({CHECKED_QUANT_ALGOS})")
    if kv is not None and kv not in KV_CACHE_QUANT_ALGOS:
        problems.append(f"config.json: quantization.kv_cache_quant_algo = {kv!r}, expected one of "
                        f"{KV_CACHE_QUANT_ALGOS} or null")
    elif kv not in CHECKED_KV_CACHE_QUANT_ALGOS:
        problems.append(f"config.json: kv_cache_quant_algo {kv!r} is not one af3trt produces or checks")
    excl = quant.get("exclude_modules")
    if excl is not None and not (isinstance(excl, list) and all(isinstance(e, str) for e in excl)):
        problems.append(f"config.json: quantization.exclude_modules = {excl!r}, expected a list of patterns or null")
    if algo == "W4A16_AWQ":
        gs = quant.get("group_size", 128)
        if gs not in AWQ_GROUP_SIZES:
            problems.append(f"config.json: quantization.group_size = {gs!r}, TensorRT-LLM's groupwise kernels take "
                            f"{AWQ_GROUP_SIZES}")
        if quant.get("pre_quant_scale") is not True:
            problems.append("config.json: W4A16_AWQ needs quantization.pre_quant_scale = true (AWQ smoothing)")
        if quant.get("has_zero_point", False):
            problems.append("config.json: quantization.has_zero_point = true is not what modelopt AWQ writes")

    if hf_config is not None:
        problems += _check_against_hf(config, text_config(hf_config))
    else:
        warnings.append("rotary_base was not compared with the Hugging Face rope theta (no hf_config given)")
    return problems, warnings


def _check_against_hf(config: dict, text: dict) -> list[str]:
    problems = []
    theta = rope_theta(text)
    if theta is None:
        problems.append("the Hugging Face config has no rope theta to compare rotary_base with")
    elif _is_num(config.get("rotary_base")) and not math.isclose(config["rotary_base"], theta, rel_tol=1e-6):
        problems.append(f"config.json: rotary_base = {config['rotary_base']} but the Hugging Face rope theta is "
                        f"{theta}: the engine would rotate with the wrong base")
    pairs = [("vocab_size", "vocab_size"), ("hidden_size", "hidden_size"), ("num_hidden_layers", "num_hidden_layers"),
             ("num_attention_heads", "num_attention_heads"), ("intermediate_size", "intermediate_size"),
             ("num_key_value_heads", "num_key_value_heads"), ("max_position_embeddings", "max_position_embeddings")]
    for ours, theirs in pairs:
        want = text.get(theirs, text.get("num_attention_heads") if theirs == "num_key_value_heads" else None)
        if want is None or ours not in config:
            continue
        if ours == "vocab_size" and config[ours] != want and config[ours] % 64 == 0 and config[ours] > want:
            continue  # AWQ export pads the vocabulary to a multiple of 64
        if config[ours] != want:
            problems.append(f"config.json: {ours} = {config[ours]} but the Hugging Face config says {want}")
    eps = text.get("rms_norm_eps")
    if eps is not None and _is_num(config.get("norm_epsilon")) and not math.isclose(config["norm_epsilon"], eps):
        problems.append(f"config.json: norm_epsilon = {config['norm_epsilon']} but rms_norm_eps is {eps}")
    if "qwen_type" in config and text.get("model_type") and config["qwen_type"] != text["model_type"]:
        problems.append(f"config.json: qwen_type = {config['qwen_type']!r} but the model_type is "
                        f"{text['model_type']!r}")
    return problems


# ---------------------------------------------------------------------------------------------- tensor checks

@dataclass(frozen=True)
class _Expect:
    dtypes: tuple[str, ...]
    shape: tuple[int, ...]
    why: str = ""


@dataclass
class _RankExpectation:
    required: dict[str, _Expect] = field(default_factory=dict)  # name -> dtype / shape
    one_of: list[tuple[str, ...]] = field(default_factory=list)  # alternatives, "a+b" = both a and b
    weight_only: list[tuple[str, int, int]] = field(default_factory=list)  # (module, out, in): float or packed int8
    problems: list[str] = field(default_factory=list)  # found from the config alone


def _excluded(module: str, exclude_modules) -> bool:
    patterns = DEFAULT_EXCLUDE_MODULES if exclude_modules is None else exclude_modules
    return any(fnmatch.fnmatchcase(module, p) for p in patterns)


def expected_tensors(config: dict) -> _RankExpectation:
    """What every rank must hold (tp ranks differ in values, not in names or shapes) for a well-formed config."""
    dt = config["dtype"]
    H, L, V, I = (config[k] for k in ("hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size"))
    nh, nkv = config["num_attention_heads"], config["num_key_value_heads"]
    hd = config.get("head_size") or H // nh
    tp = config["mapping"]["tp_size"]
    quant = config.get("quantization") or {}
    algo, kv = quant.get("quant_algo"), quant.get("kv_cache_quant_algo")
    excl = quant.get("exclude_modules")
    gs = quant.get("group_size", 128)
    rows = -(-V // tp)  # pad_vocab_size(V, tp) / tp
    exp = _RankExpectation()
    req = exp.required

    def linear(module: str, out_f: int, in_f: int, bias: bool = False, full_out: int = 0, full_in: int = 0):
        quantized = algo is not None and not _excluded(module, excl)
        if bias:
            req[f"{module}.bias"] = _Expect((dt,), (out_f,))
        if not quantized:
            req[f"{module}.weight"] = _Expect((dt,), (out_f, in_f))
        elif algo == "FP8":
            req[f"{module}.weight"] = _Expect(("float8_e4m3fn", "int8"), (out_f, in_f), "fp8 weights")
            req[f"{module}.weights_scaling_factor"] = _Expect(("float32",), (1,), "FP8 per-tensor weight scale")
            req[f"{module}.activation_scaling_factor"] = _Expect(("float32",), (1,), "FP8 static activation scale")
        elif algo == "W8A8_SQ_PER_CHANNEL":
            req[f"{module}.weight"] = _Expect(("int8",), (out_f, in_f), "SmoothQuant int8 weights")
            req[f"{module}.weights_scaling_factor"] = _Expect(("float32",), (out_f,), "per-channel weight scales")
            req[f"{module}.prequant_scaling_factor"] = _Expect((dt,), (in_f,), "SmoothQuant smoothing factors")
            req[f"{module}.activation_scaling_factor"] = _Expect(("float32",), (1,), "per-tensor activation scale")
        elif algo in ("W8A16", "W4A16"):
            multiple = 64 * tp
            if full_out % multiple or full_in % multiple:
                exp.problems.append(f"{module}: weight-only layers are padded to multiples of {multiple} (64 x tp) "
                                    f"by trtllm-build; [{full_out}, {full_in}] is not, so the shapes cannot load")
            exp.weight_only.append((module, out_f, in_f))
        elif algo == "W4A16_AWQ":
            multiple = max(64, gs) * tp
            if full_out % multiple or full_in % multiple:
                exp.problems.append(f"{module}: AWQ layers are padded to multiples of {multiple} by trtllm-build; "
                                    f"[{full_out}, {full_in}] is not, so the checkpoint shapes cannot load")
            req[f"{module}.weight"] = _Expect(("int8",), (out_f // 2, in_f), "int4 pairs packed in int8 [out/2, in]")
            req[f"{module}.weights_scaling_factor"] = _Expect((dt, "float32"), (out_f, max(in_f // gs, 1)),
                                                              f"per-group scales (group {gs})")
            req[f"{module}.prequant_scaling_factor"] = _Expect((dt, "float32"), (in_f,), "AWQ smoothing factors")

    q_rows = nh // tp * hd
    kv_rows = (nkv // tp if nkv >= tp else 1) * hd
    attn_bias = config.get("attn_bias", True)
    for i in range(L):
        p = f"transformer.layers.{i}"
        req[f"{p}.input_layernorm.weight"] = _Expect((dt,), (H,))
        req[f"{p}.post_layernorm.weight"] = _Expect((dt,), (H,))
        linear(f"{p}.attention.qkv", q_rows + 2 * kv_rows, H, bias=attn_bias, full_out=(nh + 2 * nkv) * hd, full_in=H)
        linear(f"{p}.attention.dense", H, nh * hd // tp, full_out=H, full_in=nh * hd)
        linear(f"{p}.mlp.fc", I // tp, H, full_out=I, full_in=H)
        linear(f"{p}.mlp.gate", I // tp, H, full_out=I, full_in=H)
        linear(f"{p}.mlp.proj", H, I // tp, full_out=H, full_in=I)
        if kv is not None:
            exp.one_of.append((f"{p}.attention.kv_cache_scaling_factor",
                           f"{p}.attention.k_cache_scaling_factor+{p}.attention.v_cache_scaling_factor"))
    req["transformer.ln_f.weight"] = _Expect((dt,), (H,))

    emb_rows, emb_cols = V, H
    if tp > 1 and config.get("use_parallel_embedding", False):
        if config.get("embedding_sharding_dim", 0) == 0:
            emb_rows = rows
        else:
            emb_cols = H // tp
    emb_quantized = algo in ("W8A16", "W4A16") and not _excluded("transformer.vocab_embedding", excl)
    req["transformer.vocab_embedding.weight"] = _Expect(("int8",) if emb_quantized else (dt,), (emb_rows, emb_cols))
    if emb_quantized:
        req["transformer.vocab_embedding.per_token_scale"] = _Expect(
            (dt,), (emb_rows,), "weight-only quantized embedding (vocab_embedding is not in exclude_modules)")
    tied = config.get("share_embedding_table") or config.get("tie_word_embeddings")
    if not tied:
        linear("lm_head", rows, H, full_out=rows * tp, full_in=H)
        if algo in ("W8A16", "W4A16") and not _excluded("lm_head", excl):
            exp.problems.append("lm_head: W8A16/W4A16 would quantize lm_head (not in exclude_modules) but "
                                "trtllm-build only quantizes qkv/dense/fc/gate/proj weights at load: exclude it")
    return exp


def _check_rank(names: dict, config: dict, rank: int) -> list[str]:
    problems = []
    exp = expected_tensors(config)
    algo = (config.get("quantization") or {}).get("quant_algo")
    where = f"rank{rank}.safetensors"
    missing = []
    for name, want in exp.required.items():
        if name not in names:
            missing.append(name if not want.why else f"{name} ({want.why})")
            continue
        dtype, shape, _ = names[name]
        if dtype not in want.dtypes:
            problems.append(f"{where}: {name} is {dtype}, expected {' or '.join(want.dtypes)}")
        if tuple(shape) != want.shape and not (want.shape == (1,) and tuple(shape) == ()):
            problems.append(f"{where}: {name} has shape {list(shape)}, expected {list(want.shape)}")
    for group in exp.one_of:
        if not any(all(n in names for n in option.split("+")) for option in group):
            missing.append(f"{group[0]} (KV cache scale, or the k/v pair)")
    dt = config["dtype"]
    if rank == 0:  # the same for every rank
        problems += [f"config.json + {where}: {p}" for p in exp.problems]
    for module, out_f, in_f in exp.weight_only:
        w = names.get(f"{module}.weight")
        if w is None:
            missing.append(f"{module}.weight")
            continue
        dtype, shape, _ = w
        if dtype == dt:  # float weights: trtllm-build quantizes them (TensorRT-LLM 1.2 quantize.py's int8_wo)
            if tuple(shape) != (out_f, in_f):
                problems.append(f"{where}: {module}.weight has shape {list(shape)}, expected {[out_f, in_f]}")
        elif dtype == "int8":
            packed = (in_f, out_f if algo == "W8A16" else out_f // 2)
            if f"{module}.per_channel_scale" not in names:
                problems.append(f"{where}: {module}.weight is int8 without per_channel_scale: that is modelopt's "
                                f"INT8_WEIGHT_ONLY export ([out, in] + weights_scaling_factor), which trtllm-build's "
                                f"{algo} loader does not convert; export {dt} weights and let trtllm-build quantize")
            elif tuple(shape) != packed:
                problems.append(f"{where}: {module}.weight int8 has shape {list(shape)}; {algo} needs the plugin's "
                                f"preprocessed layout {list(packed)}")
            elif names[f"{module}.per_channel_scale"][1] != (out_f,):
                problems.append(f"{where}: {module}.per_channel_scale has shape "
                                f"{list(names[f'{module}.per_channel_scale'][1])}, expected [{out_f}]")
        else:
            problems.append(f"{where}: {module}.weight is {dtype}, expected {dt} (quantized by trtllm-build) or int8")
    if missing:
        shown = missing[:12] + ([f"... and {len(missing) - 12} more"] if len(missing) > 12 else [])
        problems.append(f"{where}: missing {len(missing)} required tensor(s): " + "; ".join(shown))
    return problems


def _tensor_check_possible(config: dict) -> bool:
    """Whether the config is well-formed enough to derive the expected tensors from it."""
    mapping = config.get("mapping")
    quant = config.get("quantization") or {}
    return (config.get("dtype") in DTYPES and isinstance(mapping, dict) and _is_int(mapping.get("tp_size"))
            and mapping["tp_size"] > 0 and isinstance(quant, dict)
            and quant.get("quant_algo") in CHECKED_QUANT_ALGOS
            and quant.get("kv_cache_quant_algo") in CHECKED_KV_CACHE_QUANT_ALGOS
            and all(_is_int(config.get(k)) and config[k] > 0 for k in (
                "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size",
                "intermediate_size")))


# ---------------------------------------------------------------------------------------------- entry point

def validate_checkpoint(ckpt_dir: Path, *, hf_config=None) -> CheckpointReport:
    """Check `ckpt_dir` (config.json + rank*.safetensors); raise CheckpointError listing every problem.

    hf_config: the Hugging Face model directory (or its config dict) the checkpoint was made from; when given,
    rotary_base must equal its rope theta and the sizes must match.
    """
    ckpt_dir = Path(ckpt_dir)
    config_path = ckpt_dir / "config.json"
    if not config_path.exists():
        raise CheckpointError(ckpt_dir, ["config.json is missing"])
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(ckpt_dir, [f"config.json is not valid JSON: {e}"]) from e
    if not isinstance(config, dict):
        raise CheckpointError(ckpt_dir, ["config.json is not a JSON object"])

    problems, warnings = check_config(config, hf_config)
    mapping = config.get("mapping") if isinstance(config.get("mapping"), dict) else {}
    world = mapping.get("world_size") if _is_int(mapping.get("world_size")) else None
    present = sorted(ckpt_dir.glob("rank*.safetensors"))
    n_tensors, sizes = [], []
    if world is not None:
        expected_files = [ckpt_dir / f"rank{r}.safetensors" for r in range(world)]
        for path in expected_files:
            if not path.exists():
                problems.append(f"{path.name} is missing (mapping.world_size = {world} needs rank0..rank{world - 1})")
        extra = sorted(set(present) - set(expected_files))
        if extra:
            problems.append(f"rank files beyond world_size {world}: {[p.name for p in extra]} (tp mismatch?)")
        config_ok = _tensor_check_possible(config)
        for r, path in enumerate(expected_files):
            if not path.exists():
                continue
            try:
                names = read_safetensors_header(path)
            except (ValueError, OSError, KeyError) as e:
                problems.append(f"{path.name}: unreadable ({e})")
                continue
            n_tensors.append(len(names))
            sizes.append(sum(nbytes for *_, nbytes in names.values()))
            if config_ok:
                problems += _check_rank(names, config, r)
        if not config_ok:
            warnings.append("tensors were not checked because config.json has problems")
    if problems:
        raise CheckpointError(ckpt_dir, problems)

    quant = config.get("quantization") or {}
    return CheckpointReport(
        ckpt_dir=str(ckpt_dir), architecture=config["architecture"], dtype=config["dtype"],
        quant_algo=quant.get("quant_algo"), kv_cache_quant_algo=quant.get("kv_cache_quant_algo"),
        world_size=mapping["world_size"], tp_size=mapping["tp_size"], qwen_type=config["qwen_type"],
        rotary_base=float(config["rotary_base"]), vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
        num_hidden_layers=config["num_hidden_layers"], num_attention_heads=config["num_attention_heads"],
        num_key_value_heads=config["num_key_value_heads"],
        head_size=config.get("head_size") or config["hidden_size"] // config["num_attention_heads"],
        intermediate_size=config["intermediate_size"],
        group_size=quant.get("group_size") if quant.get("quant_algo") == "W4A16_AWQ" else None,
        n_tensors=n_tensors, bytes_per_rank=sizes, warnings=warnings,
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="af3trt check-checkpoint", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt_dir", type=Path)
    ap.add_argument("--hf-model", type=Path, help="the Hugging Face directory it was made from (rope theta check)")
    args = ap.parse_args(argv)
    try:
        report = validate_checkpoint(args.ckpt_dir, hf_config=args.hf_model)
    except CheckpointError as e:
        print(e, file=sys.stderr)
        return 1
    print(json.dumps(report.as_dict(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
