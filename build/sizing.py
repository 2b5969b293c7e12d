"""GPU memory sizing for AF3 (or any Qwen2 decoder) from its Hugging Face config, computed, not quoted.

    weights        decoder per precision (embeddings and lm_head stay in the engine dtype: TensorRT-LLM excludes them
                   from quantization), audio encoder + projector separately (bf16/fp16 engine)
    KV cache       bytes per token = 2 (K and V) x layers x kv_heads x head_dim x bytes per element
    prompt table   bytes per request = audio tokens x hidden x engine-dtype bytes (750 tokens per 30-s window)
    fit            requests of a given audio length that fit next to the weights, with TensorRT-LLM's default
                   kv_cache_free_gpu_mem_fraction (0.9) of what is left after weights and a runtime reserve

    af3trt sizing --hf-model AF3_DIR [--gpu h100] [--text-tokens 1024] [--output-tokens 1024]   (build/memory_plan.py)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from af3trt.build.tables import Column, markdown_table
from af3trt.registry import DECODER_PRECISIONS, KNOWN_GPUS, KV_CACHES, decoder_precision, read_config, text_config
from af3trt.runtime.stages.lengths import SAMPLE_RATE, audio_tokens_for_samples

DTYPE_BYTES = 2  # bf16 / fp16 engines
KV_FREE_FRACTION = 0.9  # tensorrt_llm backend's kv_cache_free_gpu_mem_fraction default
DEFAULT_RESERVE_BYTES = 4 * 1024**3  # CUDA context, TensorRT activations and workspaces: measure on the GPU
DEFAULT_GPU = KNOWN_GPUS["h100"]  # what the tables assume unless told otherwise
TOKENS_PER_BLOCK = 32


@dataclass(frozen=True)
class DecoderDims:
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    tied_embeddings: bool = False


@dataclass(frozen=True)
class EncoderDims:
    hidden: int
    layers: int
    heads: int
    ffn: int
    mel_bins: int
    max_source_positions: int
    projector_out: int  # the decoder's hidden size
    projector_bias: bool = True


def dims_from_config(config: dict | Path) -> tuple[DecoderDims, EncoderDims | None]:
    """Decoder (and, for AF3, encoder) sizes from a config.json dict or a model directory."""
    cfg = config if isinstance(config, dict) else read_config(config)
    text = text_config(cfg)
    heads = text["num_attention_heads"]
    dec = DecoderDims(
        vocab=text["vocab_size"], hidden=text["hidden_size"], layers=text["num_hidden_layers"], heads=heads,
        kv_heads=text.get("num_key_value_heads", heads), head_dim=text.get("head_dim") or text["hidden_size"] // heads,
        intermediate=text["intermediate_size"],
        tied_embeddings=bool(text.get("tie_word_embeddings", cfg.get("tie_word_embeddings", False))),
    )
    audio = cfg.get("audio_config")
    if not audio:
        return dec, None
    enc = EncoderDims(
        hidden=audio.get("hidden_size", audio.get("d_model")),
        layers=audio.get("num_hidden_layers", audio.get("encoder_layers")),
        heads=audio.get("num_attention_heads", audio.get("encoder_attention_heads")),
        ffn=audio.get("intermediate_size", audio.get("encoder_ffn_dim")),
        mel_bins=audio.get("num_mel_bins", 128), max_source_positions=audio.get("max_source_positions", 1500),
        projector_out=dec.hidden, projector_bias=bool(cfg.get("projector_bias", True)),
    )
    return dec, enc


# ---------------------------------------------------------------------------------------------- parameters

def decoder_linears(d: DecoderDims) -> list[tuple[int, int]]:
    """(out, in) of the quantizable linears of one layer: qkv, dense, fc (gate_proj), gate (up_proj), proj."""
    qkv_out = (d.heads + 2 * d.kv_heads) * d.head_dim
    return [(qkv_out, d.hidden), (d.hidden, d.heads * d.head_dim), (d.intermediate, d.hidden),
            (d.intermediate, d.hidden), (d.hidden, d.intermediate)]


def decoder_params(d: DecoderDims) -> dict:
    """Parameter counts: embedding, lm_head, layer linears, other (qkv bias, norms)."""
    linear = d.layers * sum(o * i for o, i in decoder_linears(d))
    other = d.layers * ((d.heads + 2 * d.kv_heads) * d.head_dim + 2 * d.hidden) + d.hidden
    emb = d.vocab * d.hidden
    lm_head = 0 if d.tied_embeddings else d.vocab * d.hidden
    return {"embedding": emb, "lm_head": lm_head, "linear": linear, "other": other,
            "total": emb + lm_head + linear + other}


def decoder_weight_bytes(d: DecoderDims, precision: str, awq_group: int = 128) -> int:
    """Bytes of the decoder's weights (and scales) in a TensorRT-LLM checkpoint / engine of this precision."""
    linear_bytes = decoder_precision(precision).linear_bytes  # per [out, in] linear, with its scales (registry)
    p = decoder_params(d)
    fixed = (p["embedding"] + p["lm_head"] + p["other"]) * DTYPE_BYTES
    return fixed + d.layers * sum(linear_bytes(o, i, DTYPE_BYTES, awq_group) for o, i in decoder_linears(d))


def encoder_params(e: EncoderDims) -> dict:
    """Whisper-style encoder (2 convs, positions, layers, final norm) and AF3's 2-layer projector."""
    h = e.hidden
    convs = h * e.mel_bins * 3 + h + h * h * 3 + h
    positions = e.max_source_positions * h
    attn = 4 * h * h + 3 * h  # q, k, v, out; k has no bias
    layer = attn + 2 * h + (h * e.ffn + e.ffn) + (e.ffn * h + h) + 2 * h
    encoder = convs + positions + e.layers * layer + 2 * h
    b = e.projector_out if e.projector_bias else 0
    projector = h * e.projector_out + b + e.projector_out * e.projector_out + b
    return {"encoder": encoder, "projector": projector, "total": encoder + projector}


def encoder_weight_bytes(e: EncoderDims, dtype_bytes: int = DTYPE_BYTES) -> int:
    return encoder_params(e)["total"] * dtype_bytes


# ---------------------------------------------------------------------------------------------- per token / request

def kv_bytes_per_token(d: DecoderDims, kv_cache: str = "auto") -> int:
    """2 (K, V) x layers x kv_heads x head_dim x element bytes (2 for the model dtype, 1 for fp8/int8)."""
    element = DTYPE_BYTES if kv_cache == "auto" else 1
    return 2 * d.layers * d.kv_heads * d.head_dim * element


def audio_tokens(seconds: float) -> int:
    return audio_tokens_for_samples(int(round(seconds * SAMPLE_RATE)))


def prompt_table_bytes(d: DecoderDims, n_audio_tokens: int, dtype_bytes: int = DTYPE_BYTES) -> int:
    return n_audio_tokens * d.hidden * dtype_bytes


def request_tokens(audio_seconds: float, text_tokens: int, output_tokens: int) -> int:
    """KV tokens one request holds at its longest, rounded up to whole KV blocks."""
    n = audio_tokens(audio_seconds) + text_tokens + output_tokens
    return -(-n // TOKENS_PER_BLOCK) * TOKENS_PER_BLOCK


def max_concurrent(d: DecoderDims, e: EncoderDims | None, precision: str, kv_cache: str, audio_seconds: float, *,
                   gpu_bytes: int = DEFAULT_GPU.memory_bytes, text_tokens: int = 1024, output_tokens: int = 1024,
                   reserve_bytes: int = DEFAULT_RESERVE_BYTES) -> int:
    """Requests of `audio_seconds` that fit at once: 0.9 x (GPU - weights - reserve) / (KV + prompt table)."""
    weights = decoder_weight_bytes(d, precision) + (encoder_weight_bytes(e) if e else 0)
    free = gpu_bytes - weights - reserve_bytes
    if free <= 0:
        return 0
    per_request = (request_tokens(audio_seconds, text_tokens, output_tokens) * kv_bytes_per_token(d, kv_cache)
                   + prompt_table_bytes(d, audio_tokens(audio_seconds)))
    return int(KV_FREE_FRACTION * free // per_request)


# ---------------------------------------------------------------------------------------------- table

def sizing_table(config: dict | Path, *, gpu_bytes: int = DEFAULT_GPU.memory_bytes, gpu_name: str = DEFAULT_GPU.name,
                 text_tokens: int = 1024, output_tokens: int = 1024,
                 reserve_bytes: int = DEFAULT_RESERVE_BYTES) -> dict:
    """Every number of the sizing report, as a dict (rendered by `render_markdown`)."""
    d, e = dims_from_config(config)
    short, long = 30.0, 600.0
    table = {
        "decoder": asdict(d), "encoder": asdict(e) if e else None,
        "decoder_params": decoder_params(d), "encoder_params": encoder_params(e) if e else None,
        "assumptions": {"gpu": gpu_name, "gpu_bytes": gpu_bytes, "reserve_bytes": reserve_bytes,
                        "kv_free_fraction": KV_FREE_FRACTION, "text_tokens": text_tokens,
                        "output_tokens": output_tokens, "engine_dtype_bytes": DTYPE_BYTES,
                        "tokens_per_block": TOKENS_PER_BLOCK},
        "weights": {p: decoder_weight_bytes(d, p) for p in DECODER_PRECISIONS},
        "encoder_weights": encoder_weight_bytes(e) if e else 0,
        "kv_bytes_per_token": {k: kv_bytes_per_token(d, k) for k in KV_CACHES},
        "audio_tokens": {"30s": audio_tokens(short), "600s": audio_tokens(long)},
        "prompt_table_bytes": {"30s": prompt_table_bytes(d, audio_tokens(short)),
                               "600s": prompt_table_bytes(d, audio_tokens(long))},
        "request_tokens": {"30s": request_tokens(short, text_tokens, output_tokens),
                           "600s": request_tokens(long, text_tokens, output_tokens)},
        "fit": [],
    }
    for p in DECODER_PRECISIONS:
        for k in KV_CACHES:
            kw = dict(gpu_bytes=gpu_bytes, text_tokens=text_tokens, output_tokens=output_tokens,
                      reserve_bytes=reserve_bytes)
            table["fit"].append({
                "precision": p, "kv_cache": k,
                "weights_bytes": table["weights"][p] + table["encoder_weights"],
                "request_600s_bytes": (table["request_tokens"]["600s"] * kv_bytes_per_token(d, k)
                                       + table["prompt_table_bytes"]["600s"]),
                "max_concurrent_600s": max_concurrent(d, e, p, k, long, **kw),
                "max_concurrent_30s": max_concurrent(d, e, p, k, short, **kw),
            })
    return table


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M" if n >= 1e6 else f"{n:,}"


# docs/sizing.md's tables (build/tables.py writes them)
WEIGHTS = [Column("precision"), Column("decoder weights", "bytes", _gb, right=True),
           Column("+ encoder (bf16)", "with_encoder", _gb, right=True)]
KV = [Column("KV cache", "kv_cache"), Column("bytes / token", "bytes", "{:,}", right=True),
      Column("30-s request", "30s", _mb, right=True), Column("10-min request", "600s", _gb, right=True)]
FIT = [Column("precision"), Column("KV cache", "kv_cache"), Column("weights", "weights_bytes", _gb, right=True),
       Column("per 10-min request", "request_600s_bytes", _gb, right=True),
       Column("concurrent 10-min", "max_concurrent_600s", right=True),
       Column("concurrent 30-s", "max_concurrent_30s", right=True)]


def render_markdown(t: dict) -> str:
    d, a = t["decoder"], t["assumptions"]
    lines = [
        "## AF3 GPU sizing",
        "",
        f"Decoder: {d['layers']} layers, hidden {d['hidden']}, {d['heads']} heads / {d['kv_heads']} KV heads "
        f"(head dim {d['head_dim']}), intermediate {d['intermediate']}, vocab {d['vocab']}, "
        f"{_count(t['decoder_params']['total'])} parameters"
        + ("" if t["encoder"] is None else
           f". Encoder + projector: {t['encoder']['layers']} layers, hidden {t['encoder']['hidden']}, "
           f"{_count(t['encoder_params']['total'])} parameters") + ".",
        "",
        "### Weights",
        "",
        *markdown_table(WEIGHTS, [{"precision": p, "bytes": b, "with_encoder": b + t["encoder_weights"]}
                                  for p, b in t["weights"].items()]),
        "", "Embedding and lm_head stay in bf16 in every precision (excluded from quantization).", "",
        "### KV cache and prompt table", "",
        *markdown_table(KV, [{"kv_cache": "bf16/fp16 (auto)" if k == "auto" else k, "bytes": b,
                              "30s": b * t["request_tokens"]["30s"], "600s": b * t["request_tokens"]["600s"]}
                             for k, b in t["kv_bytes_per_token"].items()]),
        "", f"A request holds audio + {a['text_tokens']} text + {a['output_tokens']} output tokens: "
            f"{t['request_tokens']['30s']:,} (30 s) / {t['request_tokens']['600s']:,} (10 min) KV tokens.",
        f"Prompt table per request (bf16): {_mb(t['prompt_table_bytes']['30s'])} for 30 s "
        f"({t['audio_tokens']['30s']} audio tokens), {_mb(t['prompt_table_bytes']['600s'])} for 10 min "
        f"({t['audio_tokens']['600s']} audio tokens).", "",
        f"### What fits on one {a['gpu']} ({a['gpu_bytes'] / 1024**3:.1f} GiB)", "",
        f"{a['kv_free_fraction']} x (GPU - weights - {a['reserve_bytes'] / 1024**3:.0f} GiB reserve) / "
        f"(KV + prompt table per request); the engine's --max_batch_size caps concurrency too. "
        f"Estimates: measure on the GPU.", "",
        *markdown_table(FIT, t["fit"]),
    ]
    return "\n".join(lines) + "\n"
