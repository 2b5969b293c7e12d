"""PROJECTION — what AF3 should cost on an H100 or A100, computed from a checkpoint's config. Nothing here ran on
a GPU. Sizes (parameters, weight bytes per precision, KV bytes per token) come from af3trt.build.sizing; this
module adds the roofline times:

    decode step (batch B, context T tokens per sequence)
        bytes  = decoder weights streamed once per step (all but the embedding table, of which B rows are read)
                 + B x T x KV bytes per token
        flops  = 2 x (decoder parameters without the embedding) x B  (+ attention: 4 x layers x q_dim x T x B)
        time   = max(bytes / HBM bandwidth, flops / peak)          — memory-bound at small B
    prefill (L tokens)     flops = 2 x params x L + 2 x layers x q_dim x L^2 (causal);  time = flops / peak
    encoder (one window of T mel frames, compute-bound; T = 3000 for a full 30-s window)
        flops  = conv1 2*T*mels*3*H + conv2 2*(T/2)*H*3*H
                 + layers x (2*S*4*H^2 + 2*S*2*H*F + 4*S^2*H)   (S = T/2 positions)
                 + projector 2*(T/4)*(H*D + D*D)
        time   = flops / peak
    encoder per clip, following the valid audio: a request's windows run on T frames, the largest frame bucket among
        them (runtime/audio.request_frames; lengths.frame_bucket(L) is the smallest bucket >= L+2 for L valid
        frames — one definition shared with the preprocess crop); "full" is every window at 3000 frames, as before
        variable-length encoding (issue 10). So only one-window clips (<= 30 s) are cropped; a longer clip's last,
        partial window is padded to its full neighbours. Small buckets are assumed to reach the same efficiency as
        full windows — they do not quite (a 5-s window is 300 positions: small GEMMs), so read the short-clip gain
        as an upper bound.
"""

from __future__ import annotations

from af3trt.build import sizing
from af3trt.build.tables import Column, markdown_table
from af3trt.registry import KNOWN_GPUS, GpuInfo, af3_reference_config, supports_fp8
from af3trt.runtime.stages import lengths


# The GPUs of the registry's catalogue with datasheet peaks (H100, A100), keyed H100 / A100.
GPUS = {key.upper(): gpu for key, gpu in KNOWN_GPUS.items() if gpu.bf16_flops and gpu.hbm_bytes_per_s}
BANDWIDTH_EFFICIENCY = 0.7
COMPUTE_EFFICIENCY = 0.5
# what the projection tables show: one precision of each kind (registry.DECODER_PRECISIONS has them all)
PROJECTED_PRECISIONS = ("bf16", "fp8", "int8_wo", "int4_awq")
PROJECTED_KV_CACHES = ("auto", "fp8")

# AF3 as published (nvidia/audio-flamingo-3-hf): Qwen2.5-7B decoder, Whisper-large-v3 encoder (package data).
AF3_REFERENCE_CONFIG = af3_reference_config()


def encoder_window_flops(e: sizing.EncoderDims, frames: int | None = None) -> float:
    """One window of `frames` mel frames (default: the full window, 2 x max_source_positions)."""
    frames = 2 * e.max_source_positions if frames is None else frames
    s, rows = frames // 2, frames // 4
    h, f, d = e.hidden, e.ffn, e.projector_out
    convs = 2 * frames * e.mel_bins * 3 * h + 2 * s * h * 3 * h
    layer = 2 * s * 4 * h * h + 2 * s * 2 * h * f + 4 * s * s * h
    return float(convs + e.layers * layer + 2 * rows * (h * d + d * d))


def clip_encoder_flops(e: sizing.EncoderDims, seconds: float) -> dict:
    """Encoder FLOPs of a request with one clip: every window at 3000 frames ("full"), and every window at the
    request's frame count T, the largest bucket among its windows, as runtime/audio.request_frames crops it."""
    n = int(round(seconds * lengths.SAMPLE_RATE))
    buckets = lengths.encoded_frames_for_samples(n)  # each window's own bucket
    t, w = max(buckets), len(buckets)
    return {"windows": w, "frames_full": w * lengths.WINDOW_FRAMES, "frames": w * t,
            "full": w * encoder_window_flops(e), "cropped": w * encoder_window_flops(e, t)}


MIX_SECONDS = (5, 30, 120, 600)  # the clip mix of the variable-length projection: one request of each


def clip_mix(d: sizing.DecoderDims, e: sizing.EncoderDims, gpu: GpuInfo, text_tokens: int,
             seconds=MIX_SECONDS) -> list[dict]:
    """Per clip (and the mix, one request each): encoder time full vs cropped, and the compute before the first
    token (encoder + prefill) — roofline at 100 % of peak and at COMPUTE_EFFICIENCY."""
    rows = []
    for sec in seconds:
        c = clip_encoder_flops(e, sec)
        tokens = lengths.audio_tokens_for_samples(int(round(sec * lengths.SAMPLE_RATE))) + text_tokens
        rows.append({"audio_s": sec, **c, "prefill_s": prefill_s(d, gpu, tokens), "context": tokens,
                     "encoder_full_s": c["full"] / gpu.bf16_flops, "encoder_s": c["cropped"] / gpu.bf16_flops})
    total = {k: sum(r[k] for r in rows) for k in ("audio_s", "windows", "frames_full", "frames", "full", "cropped",
                                                  "prefill_s", "encoder_full_s", "encoder_s", "context")}
    for r in rows + [total]:
        r["encoder_speedup"] = r["full"] / r["cropped"]
        r["first_token_full_s"] = r["encoder_full_s"] + r["prefill_s"]
        r["first_token_s"] = r["encoder_s"] + r["prefill_s"]
    total["label"] = "mix"
    return rows + [total]


def decoder_flops_per_token(d: sizing.DecoderDims) -> float:
    p = sizing.decoder_params(d)
    return 2.0 * (p["total"] - p["embedding"])


def streamed_weight_bytes(d: sizing.DecoderDims, precision: str) -> int:
    """Weights read once per decode step: everything but the embedding table (kept in the engine dtype)."""
    return sizing.decoder_weight_bytes(d, precision) - sizing.decoder_params(d)["embedding"] * sizing.DTYPE_BYTES


def decode_step(d: sizing.DecoderDims, gpu: GpuInfo, precision: str, kv_cache: str, batch: int, context: int) -> dict:
    q_dim = d.heads * d.head_dim
    bytes_ = streamed_weight_bytes(d, precision) + batch * context * sizing.kv_bytes_per_token(d, kv_cache)
    flops = batch * (decoder_flops_per_token(d) + 4.0 * d.layers * q_dim * context)
    t_mem, t_flop = bytes_ / gpu.hbm_bytes_per_s, flops / gpu.bf16_flops
    t = max(t_mem, t_flop)
    return {"bytes": bytes_, "flops": flops, "memory_s": t_mem, "compute_s": t_flop, "step_s": t,
            "bound": "memory" if t_mem >= t_flop else "compute", "tokens_per_s": batch / t,
            "step_s_at_efficiency": max(t_mem / BANDWIDTH_EFFICIENCY, t_flop / COMPUTE_EFFICIENCY)}


def prefill_s(d: sizing.DecoderDims, gpu: GpuInfo, tokens: int) -> float:
    flops = decoder_flops_per_token(d) * tokens + 2.0 * d.layers * d.heads * d.head_dim * tokens ** 2
    return flops / gpu.bf16_flops


def project(config: dict, *, label: str, text_tokens: int = 64, batches=(1, 8, 64)) -> dict:
    d, e = sizing.dims_from_config(config)
    out = {"label": label, "decoder": sizing.decoder_params(d), "gpus": {},
           "weights_bytes": {p: sizing.decoder_weight_bytes(d, p) for p in PROJECTED_PRECISIONS},
           "streamed_weight_bytes": {p: streamed_weight_bytes(d, p) for p in PROJECTED_PRECISIONS},
           "kv_bytes_per_token": {k: sizing.kv_bytes_per_token(d, k) for k in PROJECTED_KV_CACHES},
           "encoder_weight_bytes": sizing.encoder_weight_bytes(e) if e else 0,
           "encoder_window_flops": encoder_window_flops(e) if e else None,
           "decoder_flops_per_token": decoder_flops_per_token(d),
           "assumptions": {"bandwidth_efficiency": BANDWIDTH_EFFICIENCY, "compute_efficiency": COMPUTE_EFFICIENCY,
                           "text_tokens": text_tokens}}
    for key, gpu in GPUS.items():
        g = {"gpu": gpu.name, "hbm_bytes_per_s": gpu.hbm_bytes_per_s, "bf16_flops": gpu.bf16_flops,
             "encoder_window_s": (encoder_window_flops(e) / gpu.bf16_flops) if e else None, "decode": [],
             "prefill_s": {}, "clip_mix": clip_mix(d, e, gpu, text_tokens) if e else []}
        for seconds in (30, 600):
            ctx = lengths.audio_tokens_for_samples(seconds * lengths.SAMPLE_RATE) + text_tokens
            g["prefill_s"][f"{seconds}s"] = prefill_s(d, gpu, ctx)
            for p in PROJECTED_PRECISIONS:
                for kv in PROJECTED_KV_CACHES:
                    for b in batches:
                        g["decode"].append({"audio_s": seconds, "context": ctx, "precision": p, "kv_cache": kv,
                                            "batch": b, **decode_step(d, gpu, p, kv, b, ctx)})
        out["gpus"][key] = g
    return out


def _bytes(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _t(s: float | None) -> str:
    if s is None:
        return "—"
    return f"{s * 1e3:.2f} ms" if s >= 1e-3 else f"{s * 1e6:.0f} µs"


WEIGHTS = [Column("decoder precision", "precision"), Column("weights", "weights", _bytes, right=True),
           Column("streamed per step", "streamed", _bytes, right=True),
           Column("KV / token (bf16)", "kv_auto", "{:,} B", right=True),
           Column("KV / token (fp8)", "kv_fp8", "{:,} B", right=True)]
PREFILL = [Column("GPU", "gpu"), Column("encoder / window", "encoder_window_s", _t, right=True),
           Column("prefill 30 s", ("prefill_s", "30s"), _t, right=True),
           Column("prefill 10 min", ("prefill_s", "600s"), _t, right=True)]
def _cropped(full: str, cropped: str):
    """A clip-mix row's 'full → cropped (cropped at the compute efficiency)' of two of its times."""
    return lambda r: f"{_t(r[full])} → {_t(r[cropped])} ({_t(r[cropped] / COMPUTE_EFFICIENCY)})"


CLIP_MIX = [Column("clip", "label"), Column("windows", right=True),
            Column("frames encoded (full → cropped)", lambda r: f"{r['frames_full']:,} → {r['frames']:,}", right=True),
            Column("encoder GFLOP (full → cropped)", lambda r: f"{r['full'] / 1e9:,.0f} → {r['cropped'] / 1e9:,.0f}",
                   right=True),
            Column("encoder time (full → cropped)", _cropped("encoder_full_s", "encoder_s"), right=True),
            Column("encoder gain", "encoder_speedup", "{:.2f}×", right=True),
            Column("first token (full → cropped)", _cropped("first_token_full_s", "first_token_s"), right=True)]


def render_markdown(projections: list[dict]) -> str:
    lines = ["## GPU projection (PROJECTION — computed from the config, not measured)", "",
             "Formulas and assumptions: see `af3trt/perf/projection.py` (module docstring). Times are roofline lower "
             f"bounds at 100 % of HBM bandwidth / dense bf16 peak; the 'at eff.' column assumes "
             f"{BANDWIDTH_EFFICIENCY:.0%} of bandwidth and {COMPUTE_EFFICIENCY:.0%} of peak.", ""]
    for pr in projections:
        n = pr["decoder"]["total"]
        weights = [{"precision": p, "weights": pr["weights_bytes"][p], "streamed": pr["streamed_weight_bytes"][p],
                    "kv_auto": pr["kv_bytes_per_token"]["auto"], "kv_fp8": pr["kv_bytes_per_token"]["fp8"]}
                   for p in PROJECTED_PRECISIONS]
        lines += [f"### {pr['label']}", "",
                  f"Decoder {n / 1e6:,.1f} M parameters; {pr['decoder_flops_per_token'] / 1e9:.2f} GFLOP per token; "
                  f"encoder {pr['encoder_window_flops'] / 1e9:,.1f} GFLOP per 30-s window; encoder weights "
                  f"{pr['encoder_weight_bytes'] / 1e6:,.1f} MB (bf16).", "",
                  *markdown_table(WEIGHTS, weights), "", *markdown_table(PREFILL, pr["gpus"].values())]
        lines += _clip_mix_markdown(pr["gpus"]["H100"])
        lines += ["", "Decode step, one token for each of B sequences, bf16 KV cache: roofline time (at eff.), and "
                  "tokens/s at the largest B at 100 %:", "", *_decode_table(pr["gpus"]), ""]
    return "\n".join(lines) + "\n"


def _decode_table(gpus: dict) -> list[str]:
    """One row per GPU, audio length and precision (bf16 KV cache): the step time at each batch size."""
    batches = sorted({r["batch"] for g in gpus.values() for r in g["decode"]})
    rows = []
    for key, g in gpus.items():
        by_b: dict = {}
        for r in g["decode"]:
            if r["kv_cache"] == "auto":
                by_b.setdefault((r["audio_s"], r["precision"]), {})[r["batch"]] = r
        for (audio_s, prec), steps in by_b.items():
            no_fp8 = prec == "fp8" and not supports_fp8(GPUS[key].sm)
            rows.append({"gpu": key, "audio": f"{audio_s // 60} min" if audio_s >= 60 else f"{audio_s} s",
                         "precision": prec, "steps": None if no_fp8 else steps,
                         "na": f"n/a: no FP8 on {key} (SM {GPUS[key].sm / 10:.1f})"})

    def step(b, first):
        def at(r):
            if r["steps"] is None:
                return r["na"] if first else None
            return f"{_t(r['steps'][b]['step_s'])} ({_t(r['steps'][b]['step_s_at_efficiency'])})"
        return at

    columns = [Column("GPU", "gpu"), Column("audio"), Column("precision"),
               *(Column(f"B={b}", step(b, i == 0), right=True) for i, b in enumerate(batches)),
               Column("tokens/s", lambda r: None if r["steps"] is None else r["steps"][batches[-1]]["tokens_per_s"],
                      "{:,.0f}", right=True)]
    return markdown_table(columns, rows)


def _clip_mix_markdown(g: dict) -> list[str]:
    """The variable-length encoder table (one GPU): encoder cost follows the valid audio."""
    if not g["clip_mix"]:
        return []
    rows = [{**r, "label": "mix (5 s + 30 s + 2 min + 10 min)" if r.get("label") == "mix" else
             (f"{r['audio_s'] // 60} min" if r["audio_s"] >= 60 else f"{r['audio_s']} s")} for r in g["clip_mix"]]
    return ["", f"Encoder cost following the valid audio on the {g['gpu']} (PROJECTION): windows encoded at their "
            "frame bucket (smallest multiple of 100 frames >= L+2, `runtime/lengths.frame_bucket`) instead of 3000 "
            "frames. 'First token' is encoder + prefill compute (64 text tokens), roofline at 100 % of peak "
            f"(at {COMPUTE_EFFICIENCY:.0%}); the mix is one request of each clip. A request's windows share the "
            "largest bucket among them (`runtime/audio.request_frames`), so only clips of one window (<= 30 s) are "
            "cropped: the 5-s clip gains, the 30-s clip is a full window, and 2-min and 10-min clips run every window "
            "at 3000 frames.", "", *markdown_table(CLIP_MIX, rows)]
