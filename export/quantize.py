"""Quantize the extracted Qwen2 decoder with nvidia-modelopt and write a TensorRT-LLM 1.2 checkpoint.

This is the step TensorRT-LLM 1.2's `examples/quantization/quantize.py` performs, written against the same contracts
(calibrate with modelopt, export with `export_tensorrt_llm_checkpoint`, then patch `config.json` for qwen2) and
validated before anything reaches a GPU. What each precision means is its record in af3trt/registry.py
(DecoderPrecision: quant_algo, modelopt_cfg, simulate_cfg, awq, max_calib_size); this module branches on none:

    precision   modelopt config            checkpoint quant_algo     weights in rank{r}.safetensors
    bf16/fp16   none                       null                      bf16/fp16
    fp8         FP8_DEFAULT_CFG            FP8                       float8_e4m3fn + per-tensor scales
    int8_sq     INT8_SMOOTHQUANT_CFG       W8A8_SQ_PER_CHANNEL       int8 + per-channel scales + smoothing
    int8_wo     none (see below)           W8A16                     bf16/fp16; trtllm-build quantizes them
    int4_awq    INT4_AWQ_CFG               W4A16_AWQ                 int4 packed in int8 + group scales
    kv fp8/int8 + "*[kv]_bmm_quantizer"    kv_cache_quant_algo       + attention.kv_cache_scaling_factor

int8_wo follows TensorRT-LLM 1.2 rather than modelopt's INT8_WEIGHT_ONLY_CFG export: modelopt writes plain int8
[out, in] weights, but trtllm-build's W8A16 loader passes int8 tensors through unchanged into WeightOnlyQuantLinear,
whose weight is the plugin's preprocessed [in, out] layout; 1.2's quantize.py therefore exports unquantized weights
with `quant_algo: W8A16` and lets the builder quantize them (per output channel, symmetric). The accuracy report
(af3trt.build.trtllm_engine) simulates that with INT8_WEIGHT_ONLY_CFG.

Everything here runs on CPU (slowly for the real 7B; `device="auto"` takes a GPU when there is one).

    af3trt quantize --lm-dir LM_DIR --out CKPT_DIR --precision fp8 [--kv-cache fp8] [--tp 1]
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import random
import time
from collections.abc import Iterable
from pathlib import Path

from af3trt.registry import (DECODER_PRECISIONS, KV_CACHE_QUANT_ALGO, KV_CACHES, DecoderPrecision,
                             check_precision_names, decoder_precision, rope_theta, text_config)

log = logging.getLogger(__name__)

AWQ_BLOCK_SIZES = (128, 64)  # the group sizes TensorRT-LLM's groupwise kernels take, preferred first
PROVENANCE_FILE = "af3trt_quant.json"

# Calibration prompts in AF3's chat markup: the decoder sees system/user/assistant turns around audio and answers
# in prose. Text only: the audio embeddings' activation ranges are covered by passing `calib_batches` (see below).
_SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
_TURNS = [
    ("Transcribe the input speech.", "The speaker says that the meeting has been moved to Thursday afternoon."),
    ("Describe the music in detail.", "A slow piano ballad in a minor key, with soft strings entering in the second "
                                      "verse and a warm female vocal carrying the melody."),
    ("What sounds can you hear in this recording?", "Birds chirping, a car passing on a wet road, and distant "
                                                     "voices of children playing in a park."),
    ("Summarize the conversation.", "Two colleagues discuss a delayed shipment; they agree to call the supplier "
                                    "and update the customer by the end of the day."),
    ("What is the mood of the song?", "Upbeat and nostalgic, driven by a bright guitar riff and steady drums."),
    ("Is the speaker male or female, and what language are they speaking?", "A male speaker, speaking German "
                                                                            "with a calm, measured tone."),
    ("Count the number of distinct speakers.", "There are three distinct speakers in this recording."),
    ("What instruments are playing?", "Acoustic guitar, upright bass, brushed drums and a muted trumpet."),
    ("Where was this recorded?", "It sounds like a busy train station: announcements echo over footsteps and "
                                 "rolling suitcases."),
    ("Answer the question asked in the audio.", "The capital of Australia is Canberra, not Sydney."),
    ("Translate the speech into English.", "Good morning, I would like two tickets for the evening show, please."),
    ("What emotion does the speaker express?", "Frustration, shifting to relief once the problem is solved."),
    ("Describe the acoustic environment.", "A small reverberant room with a humming air conditioner and a "
                                           "ticking clock."),
    ("List the events in order.", "A door opens, footsteps approach, a glass is set on a table, then silence."),
    ("What genre is this track?", "Electronic dance music with a four-on-the-floor kick at about 124 BPM."),
    ("Give the key points of the lecture.", "Photosynthesis converts light into chemical energy; chlorophyll "
                                            "absorbs red and blue light; oxygen is released as a by-product."),
]
_PROSE = [
    "Numbers and times matter: 1, 2, 3, 10, 42, 100, 2025, 9:30 in the morning, 7 o'clock in the evening.",
    "The quick brown fox jumps over the lazy dog while the birds are singing in the garden.",
    "In 1969, the Apollo 11 mission landed the first humans on the Moon, and Neil Armstrong stepped onto the "
    "surface while millions listened to the radio broadcast.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "Weather forecast: sunny tomorrow with a light wind from the west, highs of 24 degrees and clear skies at night.",
    "Recipe: whisk two eggs with sugar, fold in flour and melted butter, and bake at 180 degrees for 25 minutes.",
    "Der Zug nach Berlin fährt um acht Uhr ab. Le train pour Paris part à neuf heures. 列车九点出发。",
    "Q: What is the boiling point of water at sea level? A: 100 degrees Celsius, or 212 degrees Fahrenheit.",
]
CALIBRATION_TEXTS = tuple(
    [f"{_SYSTEM}<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>\n" for q, a in _TURNS]
    + list(_PROSE)
    + [f"{_SYSTEM}<|im_start|>user\n{p}<|im_end|>\n<|im_start|>assistant\n" for p in _PROSE]
)


class QuantizeError(ValueError):
    """The requested quantization cannot be produced (bad arguments, or a model modelopt cannot handle)."""


# ---------------------------------------------------------------------------------------------- HF config helpers

def hf_rope_scaling(text_cfg: dict) -> dict | None:
    """A real rope scaling (linear, yarn, ...) in TensorRT-LLM's `rotary_scaling` spelling, or None for plain rope.

    transformers 5 keeps `rope_type: default` in `rope_parameters`; passing that on as `rotary_scaling` would hand
    TensorRT-LLM a scaling type it does not know, so plain rope maps to None.
    """
    rope = dict(text_cfg.get("rope_scaling") or text_cfg.get("rope_parameters") or {})
    kind = rope.get("type", rope.get("rope_type", "default"))
    if kind in (None, "default"):
        return None
    out = {k: v for k, v in rope.items() if k not in ("rope_theta", "rope_type", "type")}
    out["type"] = kind
    return out


def default_dtype(precision: str, text_cfg: dict) -> str:
    """Engine dtype: the one the precision fixes (bf16, fp16), else the checkpoint's half dtype, else bfloat16."""
    fixed = decoder_precision(precision).dtype
    if fixed:
        return fixed
    declared = text_cfg.get("torch_dtype") or text_cfg.get("dtype")
    return declared if declared in ("float16", "bfloat16") else "bfloat16"


# ---------------------------------------------------------------------------------------------- modelopt configs

def modelopt_quant_config(precision: str, kv_cache: str = "auto", *, awq_block_size: int = 128,
                          simulate: bool = False) -> dict | None:
    """The mtq config for a precision (+ KV cache), or None when nothing is calibrated.

    modelopt 0.47 configs are ordered lists of {quantizer_name, cfg|enable}; later entries win. With `simulate` it is
    the precision's fake-quantization preset (registry DecoderPrecision.simulate_cfg: int8_wo has one, although its
    checkpoint carries unquantized weights), else the one calibrated for the checkpoint.
    """
    import modelopt.torch.quantization as mtq

    p = _check_args(precision, kv_cache)
    name = p.simulate_cfg if simulate else p.modelopt_cfg
    if name is None and kv_cache == "auto":
        return None
    if name is None:  # KV cache only: everything off, then the KV quantizers on
        cfg = {"quant_cfg": [{"quantizer_name": "*", "enable": False}], "algorithm": "max"}
    else:
        cfg = copy.deepcopy(getattr(mtq, name))
    if p.awq:
        for entry in cfg["quant_cfg"]:
            if entry.get("quantizer_name") == "*weight_quantizer":
                entry["cfg"]["block_sizes"][-1] = awq_block_size
    if kv_cache == "fp8":
        cfg["quant_cfg"] += copy.deepcopy(mtq.FP8_KV_CFG["quant_cfg"])
    elif kv_cache == "int8":
        # modelopt 0.47 has no INT8 KV preset; TensorRT-LLM 1.2 calibrates int8 KV with 8-bit per-tensor max
        # quantizers on K and V, which modelopt 0.47 reads from the attention's k/v bmm quantizers.
        cfg["quant_cfg"].append({"quantizer_name": "*[kv]_bmm_quantizer", "cfg": {"num_bits": 8, "axis": None}})
    return cfg


def _check_args(precision: str, kv_cache: str) -> DecoderPrecision:
    return check_precision_names(precision, kv_cache, QuantizeError)


def awq_block_size_for(text_cfg: dict, tp_size: int = 1, preferred: int = 128) -> int:
    """Largest AWQ group size (128, else 64) dividing every per-rank input width: hidden and intermediate / tp."""
    widths = [text_cfg["hidden_size"] // tp_size, text_cfg["intermediate_size"] // tp_size,
              text_cfg["num_attention_heads"] * _head_dim(text_cfg) // tp_size]
    for block in sorted({preferred, *AWQ_BLOCK_SIZES}, reverse=True):
        if block in AWQ_BLOCK_SIZES and all(w % block == 0 for w in widths):
            return block
    raise QuantizeError(f"no AWQ group size in {AWQ_BLOCK_SIZES} divides the input widths {widths} (tp={tp_size})")


def _head_dim(text_cfg: dict) -> int:
    return text_cfg.get("head_dim") or text_cfg["hidden_size"] // text_cfg["num_attention_heads"]


# ---------------------------------------------------------------------------------------------- model and data

def pick_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_lm(lm_dir: Path, dtype: str, device: str = "cpu"):
    """The Qwen2ForCausalLM of `lm_dir` in `dtype` ("float32", "bfloat16", ...), eval mode, on `device`."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(lm_dir, dtype=getattr(torch, dtype))
    return model.to(device).eval()


def load_tokenizer(lm_dir: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(lm_dir)
    except Exception as e:  # noqa: BLE001 - any loader failure means the same thing here
        raise QuantizeError(f"cannot load the tokenizer of {lm_dir} for calibration: {e}") from e


def calibration_batches(tokenizer, texts: Iterable[str] | None = None, *, calib_size: int = len(CALIBRATION_TEXTS),
                        max_seq_len: int = 512) -> list[dict]:
    """Up to `calib_size` single-sequence batches {input_ids: [1, S]} (texts cycled when fewer are given)."""
    import torch

    texts = list(texts) if texts is not None else list(CALIBRATION_TEXTS)
    if not texts:
        raise QuantizeError("no calibration texts")
    batches = []
    for i in range(calib_size):
        ids = tokenizer(texts[i % len(texts)], add_special_tokens=False)["input_ids"][:max_seq_len]
        if ids:
            batches.append({"input_ids": torch.tensor([ids], dtype=torch.long)})
    return batches


def calibrate(model, quant_cfg: dict, batches: list[dict], device: str = "cpu"):
    """mtq.quantize with a forward loop over `batches` (dicts of model kwargs); returns the quantized model."""
    import modelopt.torch.quantization as mtq
    import torch

    def forward_loop(m):
        t0 = time.perf_counter()
        for i, batch in enumerate(batches):
            m(**{k: v.to(device) for k, v in batch.items()})
            if (i + 1) % 8 == 0 or i + 1 == len(batches):
                log.info("calibration forward %d/%d (%.1f s)", i + 1, len(batches), time.perf_counter() - t0)

    with torch.no_grad():
        return mtq.quantize(model, quant_cfg, forward_loop=forward_loop)


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------- config patch

def patch_trtllm_config(config: dict, text_cfg: dict, precision: str, kv_cache: str) -> dict:
    """What TensorRT-LLM 1.2's quantize.py changes after export, for a qwen2 decoder; returns {field: new value}.

    modelopt 0.47 writes `architecture: QWenForCausalLM` and neither `qwen_type` nor `rotary_base`: without the
    latter TensorRT-LLM's QWenConfig builds the engine with rope base 10000 and a rope-theta-1e6 model answers
    wrongly without any error.
    """
    theta = rope_theta(text_cfg)
    if theta is None:
        raise QuantizeError("the Hugging Face config has no rope theta (rope_theta / rope_parameters.rope_theta)")
    patch = {
        "architecture": (text_cfg.get("architectures") or ["Qwen2ForCausalLM"])[0],
        "qwen_type": text_cfg.get("model_type", "qwen2"),
        "rotary_base": theta,
        "rotary_scaling": hf_rope_scaling(text_cfg),
        "norm_epsilon": float(text_cfg["rms_norm_eps"]),
        "intermediate_size": int(text_cfg["intermediate_size"]),
    }
    config.update(patch)
    quant = dict(config.get("quantization") or {})
    p = decoder_precision(precision, QuantizeError)
    quant["quant_algo"] = p.quant_algo
    quant["kv_cache_quant_algo"] = KV_CACHE_QUANT_ALGO[kv_cache]
    if p.modelopt_cfg is None:
        # No weight quantizer ran. exclude_modules None means TensorRT-LLM's default exclusions (lm_head,
        # vocab_embedding, ...): W8A16 needs them, since the builder quantizes only qkv/dense/fc/gate/proj.
        quant.pop("exclude_modules", None)
    config["quantization"] = quant
    patch["quantization"] = quant
    return patch


# ---------------------------------------------------------------------------------------------- the writer

def write_trtllm_checkpoint(lm_dir: Path, out_dir: Path, *, precision: str, kv_cache: str = "auto",
                            dtype: str | None = None, tp_size: int = 1, calib_texts: Iterable[str] | None = None,
                            calib_size: int = len(CALIBRATION_TEXTS), calib_max_seq_len: int = 512,
                            calib_batches: list[dict] | None = None, awq_block_size: int | None = None,
                            seed: int = 0, device: str = "auto") -> dict:
    """Calibrate (when the precision needs it), export and patch a TensorRT-LLM 1.2 checkpoint; validate it.

    lm_dir: a Qwen2ForCausalLM directory with its tokenizer (af3trt.export.extract_lm).
    calib_batches: extra calibration inputs as model kwargs, e.g. {"inputs_embeds": [1, S, H]} built from real audio
    through the encoder, so that the activation ranges of audio positions are seen too.
    Returns a summary: checkpoint_dir, precision, kv_cache, dtype, quant_algo, kv_cache_quant_algo, tp_size,
    calib_samples, awq_block_size, timings {load_s, calibrate_s, export_s, validate_s}, patched, validation.
    """
    import modelopt
    import torch
    from modelopt.torch.export import export_tensorrt_llm_checkpoint

    from af3trt.export.trtllm_checkpoint import validate_checkpoint

    p = _check_args(precision, kv_cache)
    lm_dir, out_dir = Path(lm_dir), Path(out_dir)
    text_cfg = text_config(lm_dir)
    if text_cfg.get("model_type", "qwen2") != "qwen2":
        raise QuantizeError(f"{lm_dir} is a {text_cfg.get('model_type')!r} model; this writer handles qwen2")
    dtype = dtype or default_dtype(precision, text_cfg)
    if dtype not in ("bfloat16", "float16"):
        raise QuantizeError(f"TensorRT-LLM engine dtype must be bfloat16 or float16, got {dtype!r}")
    if p.dtype and dtype != p.dtype:
        raise QuantizeError(f"precision {precision} means dtype {p.dtype}, not {dtype}")
    if text_cfg["num_attention_heads"] % tp_size or text_cfg["intermediate_size"] % tp_size:
        raise QuantizeError(f"tp_size {tp_size} does not divide the heads / intermediate size")
    device = pick_device(device)
    seed_everything(seed)
    timings = {}

    t = time.perf_counter()
    log.info("loading %s in %s on %s", lm_dir, dtype, device)
    model = load_lm(lm_dir, dtype, device)
    timings["load_s"] = round(time.perf_counter() - t, 3)

    block = None
    if p.awq:
        block = awq_block_size or awq_block_size_for(text_cfg, tp_size)
    quant_cfg = modelopt_quant_config(precision, kv_cache, awq_block_size=block or 128)
    n_calib = 0
    t = time.perf_counter()
    if quant_cfg is not None:
        if p.max_calib_size and calib_size > p.max_calib_size:
            log.info("%s calibration is slow; using calib_size=%d instead of %d (as TensorRT-LLM does)", precision,
                     p.max_calib_size, calib_size)
            calib_size = p.max_calib_size
        batches = calibration_batches(load_tokenizer(lm_dir), calib_texts, calib_size=calib_size,
                                      max_seq_len=calib_max_seq_len) + list(calib_batches or [])
        n_calib = len(batches)
        log.info("calibrating %s%s with %d samples (modelopt %s)", precision,
                 f" + {kv_cache} KV cache" if kv_cache != "auto" else "", n_calib, modelopt.__version__)
        model = calibrate(model, quant_cfg, batches, device)
    else:
        log.info("%s: no calibration (weights exported in %s%s)", precision, dtype,
                 f", trtllm-build quantizes them ({p.quant_algo})" if p.builder_quantizes else "")
    timings["calibrate_s"] = round(time.perf_counter() - t, 3)

    t = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in list(out_dir.glob("rank*.safetensors")) + [out_dir / "config.json"]:
        stale.unlink(missing_ok=True)
    log.info("exporting the TensorRT-LLM checkpoint (tp=%d) to %s", tp_size, out_dir)
    with torch.inference_mode():
        export_tensorrt_llm_checkpoint(model, "qwen", getattr(torch, dtype), export_dir=out_dir,
                                       inference_tensor_parallel=tp_size)
    del model
    config_path = out_dir / "config.json"
    config = json.loads(config_path.read_text())
    patched = patch_trtllm_config(config, text_cfg, precision, kv_cache)
    config_path.write_text(json.dumps(config, indent=4) + "\n")
    timings["export_s"] = round(time.perf_counter() - t, 3)

    t = time.perf_counter()
    report = validate_checkpoint(out_dir, hf_config=lm_dir)
    timings["validate_s"] = round(time.perf_counter() - t, 3)

    summary = {
        "checkpoint_dir": str(out_dir), "lm_dir": str(lm_dir), "precision": precision, "kv_cache": kv_cache,
        "dtype": dtype, "quant_algo": p.quant_algo, "kv_cache_quant_algo": KV_CACHE_QUANT_ALGO[kv_cache],
        "tp_size": tp_size, "calib_samples": n_calib, "awq_block_size": block, "seed": seed, "device": device,
        "modelopt_version": modelopt.__version__, "timings": timings, "patched": patched,
        "validation": report.as_dict(),
    }
    (out_dir / PROVENANCE_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    log.info("checkpoint ready: %s (%s, kv %s, tp %d, %.1f MB per rank)", out_dir, precision, kv_cache, tp_size,
             report.bytes_per_rank[0] / 1e6)
    return summary


def main(argv=None):
    ap = argparse.ArgumentParser(prog="af3trt quantize", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lm-dir", required=True, type=Path, help="Qwen2ForCausalLM directory (af3trt extract-lm)")
    ap.add_argument("--out", required=True, type=Path, help="TensorRT-LLM checkpoint directory to write")
    ap.add_argument("--precision", choices=DECODER_PRECISIONS, default="bf16")
    ap.add_argument("--kv-cache", choices=KV_CACHES, default="auto")
    ap.add_argument("--dtype", choices=["bfloat16", "float16"], default=None)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--calib-file", type=Path, help="text file, one calibration sample per paragraph")
    ap.add_argument("--calib-size", type=int, default=len(CALIBRATION_TEXTS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    texts = None
    if args.calib_file:
        texts = [p.strip() for p in args.calib_file.read_text().split("\n\n") if p.strip()]
    summary = write_trtllm_checkpoint(args.lm_dir, args.out, precision=args.precision, kv_cache=args.kv_cache,
                                      dtype=args.dtype, tp_size=args.tp, calib_texts=texts,
                                      calib_size=args.calib_size, seed=args.seed, device=args.device)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
