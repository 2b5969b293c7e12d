"""AF3 audio encoder → ONNX: audio tower (Whisper conv front-end, transformer, avg-pool, layer norm) + projector.

The graph maps a batch of W mel windows to the decoder's embedding space:

    input_features       float32 [W, 128, T]      log-mel windows cropped to T frames (T even, <= 3000)
    input_features_mask  int32   [W, T]           1 for valid frames
    audio_embeds         float32 [W, R, H]        R = T / 4 rows (750 for a full window), H = text hidden size;
                                                  rows past a window's valid length are finite garbage: the caller
                                                  keeps the first lengths.embeds_valid_per_window(mask sum)

Both W and T are dynamic. The kept rows of a window with L valid frames depend only on its frames [0, L+2)
(runtime/stages/lengths.py), so serving crops each window to a frame bucket >= L+2 and the encoder's cost follows the
valid audio; windows of different lengths share a batch padded to the longest (masked, so exact). The graph is
AF3's encoder with one change, in AudioEmbedder.forward: the positional embedding is sliced to the T/2 conv
positions instead of being added whole (which only fits T = 3000).

The export is described once by an `ExportSpec` (names, dims with their dynamic axis names, opset, tolerances)
and validated as it is produced: ONNX Runtime CPU against PyTorch (transformers' own forward on full 30-s windows,
SDPA attention) on batches with other W and T than the traced ones, holding a full window and partially padded
ones, each cropped batch compared on its kept rows with the full-window computation.

Only the `audio_tower.*` and `multi_modal_projector.*` tensors are read from the checkpoint (see weights.py), in
float32: at AF3's encoder size (654M parameters, 2.6 GB of float32 weights in `encoder.onnx.data`) the export
with its validation peaked at 10 GB RSS, whatever the size of the language model beside it.

    python -m af3trt.export.onnx_export --hf-dir DIR --out encoder.onnx [--int8 encoder.int8.onnx]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn
from transformers import AudioFlamingo3Config
from transformers.models.audioflamingo3.modeling_audioflamingo3 import (AudioFlamingo3Encoder,
                                                                         AudioFlamingo3MultiModalProjector)

from af3trt.export import weights
from af3trt.registry import read_config
from af3trt.runtime.stages import lengths
from af3trt.runtime.engines.encoder import (INPUT_FEATURES, INPUT_MASK, META_CHECKPOINT_DTYPE, META_EXPORT_DTYPE,
                                    META_HIDDEN_SIZE, META_MAX_FRAMES, META_QUANTIZATION, OUTPUT_EMBEDS)

log = logging.getLogger(__name__)

# Checkpoint layouts: save_pretrained writes the bare names (transformers' qwen2_audio key mapping), a model's
# own state dict nests them under `model.`.
AUDIO_TOWER_PREFIXES = ("audio_tower.", "model.audio_tower.")
PROJECTOR_PREFIXES = ("multi_modal_projector.", "model.multi_modal_projector.")

PARTIAL_FRAMES = 700  # valid frames of the partially padded window in the traced dummy and in validation
TRACE_FRAMES = 1200  # T of the traced dummy: a bucket the validation does not use, so a T baked in would show
MAX_SINGLE_FILE_BYTES = 1_800_000_000  # protobuf cannot serialise 2 GiB: weights go to one .data file beyond this


class ExportValidationError(RuntimeError):
    """The exported graph does not meet its ExportSpec (I/O contract or numerical tolerance)."""

    def __init__(self, message: str, figures: dict | None = None):
        super().__init__(message)
        self.figures = figures or {}


# ---------------------------------------------------------------------------------------------------------------
# The export, described once
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name
    dims: tuple  # int = static, str = name of a dynamic axis

    def shape(self, **axes: int) -> tuple[int, ...]:
        return tuple(axes[d] if isinstance(d, str) else d for d in self.dims)


def axes_for(windows: int, frames: int) -> dict[str, int]:
    """The dynamic axes' values for W windows of T frames: W, T and R = the output rows."""
    return {"W": windows, "T": frames, "R": lengths.encoder_rows(frames)}


@dataclass(frozen=True)
class ExportSpec:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    opset: int
    atol: float  # valid rows pass if max|onnx - torch| <= atol + rtol * max|torch|
    rtol: float
    min_cosine: float  # cosine of all valid rows, flattened
    max_frames: int = lengths.WINDOW_FRAMES  # largest T (a full window)

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {t.name: {i: d for i, d in enumerate(t.dims) if isinstance(d, str)}
                for t in (*self.inputs, *self.outputs)}


def encoder_spec(config: AudioFlamingo3Config, *, opset: int = 18) -> ExportSpec:
    audio = config.audio_config
    frames = 2 * audio.max_source_positions  # conv2 has stride 2: 3000 mel frames → 1500 positions
    rows = audio.max_source_positions // 2  # avg-pool stride 2 → 750 embeddings per window
    if (audio.num_mel_bins, frames, rows) != (lengths.N_MELS, lengths.WINDOW_FRAMES, lengths.EMBEDS_PER_WINDOW):
        raise ValueError(f"audio config gives [{audio.num_mel_bins}, {frames}] → {rows} rows per window; the serving "
                         f"arithmetic (runtime/stages/lengths.py) assumes [{lengths.N_MELS}, {lengths.WINDOW_FRAMES}] → "
                         f"{lengths.EMBEDS_PER_WINDOW}")
    return ExportSpec(
        inputs=(TensorSpec(INPUT_FEATURES, "float32", ("W", audio.num_mel_bins, "T")),
                TensorSpec(INPUT_MASK, "int32", ("W", "T"))),
        outputs=(TensorSpec(OUTPUT_EMBEDS, "float32", ("W", "R", config.text_config.hidden_size)),),
        max_frames=frames,
        opset=opset, atol=1e-4, rtol=1e-4, min_cosine=0.99999,
    )


# INT8 dynamic quantization (ONNX Runtime CPU benchmark option) is judged by cosine only.
INT8_MIN_COSINE = 0.99


# ---------------------------------------------------------------------------------------------------------------
# The torch module: transformers' encoder + projector, only their tensors loaded
# ---------------------------------------------------------------------------------------------------------------

class AudioEmbedder(nn.Module):
    """AF3's get_audio_features without the valid-row gather, on windows cropped to T frames: [W, n_mels, T] →
    [W, T/4, H].

    forward is transformers' AudioFlamingo3Encoder.forward + projector written out with its own modules, with the
    one change that makes T variable: the positional embedding is sliced to the T/2 conv positions. The attention
    bias is the eager one (finfo.min on padded keys). `reference` runs transformers' own forward (full windows
    only): validation compares the two.
    """

    def __init__(self, config: AudioFlamingo3Config):
        super().__init__()
        self.config = config
        self.audio_tower = AudioFlamingo3Encoder(config.audio_config)
        self.multi_modal_projector = AudioFlamingo3MultiModalProjector(config)

    def forward(self, input_features, input_features_mask):
        tower = self.audio_tower
        # input_features: [W, n_mels, T], input_features_mask: [W, T]
        x = nn.functional.gelu(tower.conv1(input_features))  # [W, D, T]
        x = nn.functional.gelu(tower.conv2(x)).permute(0, 2, 1)  # [W, T/2, D]
        x = x + tower.embed_positions.weight[: x.shape[1]]
        conv_lengths = (input_features_mask.sum(-1) - 1) // 2 + 1  # [W] valid conv positions
        valid = torch.arange(x.shape[1], device=x.device)[None, :] < conv_lengths[:, None]  # [W, T/2]
        bias = (~valid)[:, None, None, :].to(x.dtype) * torch.finfo(x.dtype).min  # [W, 1, 1, T/2] on the keys
        for layer in tower.layers:
            x = layer(x, bias)
        x = tower.avg_pooler(x.permute(0, 2, 1)).permute(0, 2, 1)  # [W, T/4, D]
        return self.multi_modal_projector(tower.layer_norm(x))  # [W, T/4, H]

    def reference(self, input_features, input_features_mask):
        """transformers' encoder + projector: full windows [W, n_mels, 3000] → [W, 750, H]."""
        hidden = self.audio_tower(input_features, input_features_mask=input_features_mask).last_hidden_state
        return self.multi_modal_projector(hidden)


def load_audio_embedder(hf_dir: Path, overrides: dict | None = None) -> tuple[AudioEmbedder, str]:
    """The float32 encoder + projector of a checkpoint, and the dtype the checkpoint stores them in. overrides:
    tensors by AF3 name (model.audio_tower.* / model.multi_modal_projector.*) replacing the checkpoint's, e.g.
    think/'s non_lora_trainables.bin (export/think.py); a name the modules lack is a ValueError."""
    cfg = read_config(hf_dir)
    if cfg.get("model_type") != "audioflamingo3":
        raise ValueError(f"{hf_dir}: model_type {cfg.get('model_type')!r}, expected 'audioflamingo3'")
    config = AudioFlamingo3Config.from_dict(cfg)

    with torch.device("meta"):  # no random init of weights that are about to be replaced
        model = AudioEmbedder(config)
    state, stored = {}, set()
    for name, candidates in (("audio_tower", AUDIO_TOWER_PREFIXES), ("multi_modal_projector", PROJECTOR_PREFIXES)):
        prefix = weights.resolve_prefix(hf_dir, candidates)
        stored.update(weights.stored_dtypes(hf_dir, prefix).values())
        tensors = weights.load_tensors(hf_dir, prefix, dtype=torch.float32)
        state.update({f"{name}.{key}": t for key, t in tensors.items()})
    for key, t in (overrides or {}).items():
        if key.removeprefix("model.") not in state:
            raise ValueError(f"override {key!r} names no tensor of the audio tower or projector")
        state[key.removeprefix("model.")] = t.to(torch.float32)
    model.load_state_dict(state, strict=True, assign=True)
    model.audio_tower.set_attn_implementation("sdpa")  # what from_pretrained picks on CPU: the reference
    checkpoint_dtype = "+".join(sorted(stored))
    n_params = sum(p.numel() for p in model.parameters())
    log.info("loaded audio tower + projector from %s: %.1fM parameters, stored as %s", hf_dir, n_params / 1e6,
             checkpoint_dtype)
    return model.eval().requires_grad_(False), checkpoint_dtype


# ---------------------------------------------------------------------------------------------------------------
# Torch / exporter work-arounds
# ---------------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def export_patches(model: AudioEmbedder):
    """Eager attention while tracing, and the tracer's warnings silenced.

    - Eager attention adds a finite (finfo.min) bias for padded keys: a plain MatMul-Softmax-MatMul graph,
      finite for every row. The SDPA path exports extra IsNaN/Where guards around a bool mask.
    - The frame axis is dynamic: AudioEmbedder.forward reads T from the tensor's shape (traced as Shape ops),
      never as a Python number; validation runs other T than the traced one, so a constant would show.
    The int32 mask needs nothing (ReduceSum + Cast). One known difference: the exported `(n - 1) // 2` truncates
    where torch floors, so only a window with no valid frame (0 rows either way) attends to its first frame.
    """
    previous = model.audio_tower.config._attn_implementation
    model.audio_tower.set_attn_implementation("eager")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
            warnings.filterwarnings("ignore", message=".*aten::index.*")
            yield
    finally:
        model.audio_tower.set_attn_implementation(previous)


def pin_output_dims(proto: onnx.ModelProto, spec: ExportSpec) -> None:
    """Write the declared output dims: the TorchScript exporter names the pooled length after its expression
    ('Addaudio_embeds_dim_1'); the contract calls it R (= T / 4) and H is static. The file is the contract a
    TensorRT build reads. Validation then checks that the actual outputs have exactly these dims for other W, T."""
    for out in proto.graph.output:
        declared = next(t for t in spec.outputs if t.name == out.name)
        dims = out.type.tensor_type.shape.dim
        for dim, want in zip(dims, declared.dims):
            if isinstance(want, str):
                dim.dim_param = want
            else:
                dim.dim_value = want


# ---------------------------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------------------------

def export_encoder(hf_dir: Path, out_path: Path, *, opset: int = 18, validate: bool = True,
                   external_data: bool | None = None, overrides: dict | None = None) -> dict:
    """Export the encoder + projector of `hf_dir` to `out_path` and validate it; return the figures.

    external_data: None = a single file unless the weights pass ~1.8 GB (then `<out>.data` beside it).
    """
    hf_dir, out_path = Path(hf_dir), Path(out_path)
    t0 = time.perf_counter()
    model, checkpoint_dtype = load_audio_embedder(hf_dir, overrides)
    spec = encoder_spec(model.config, opset=opset)
    n_mels = spec.inputs[0].dims[1]
    dummy_frames = [TRACE_FRAMES - 2, PARTIAL_FRAMES]  # traced at W=2, T=1200; validation runs other W and T
    features, mask = make_inputs(n_mels, TRACE_FRAMES, dummy_frames, seed=1)

    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".export-") as tmp:
        # torch writes one file per tensor beside the model when it passes 2 GB: export to a scratch dir
        raw = Path(tmp) / "encoder.onnx"
        log.info("exporting %s (traced W=%d, T=%d, opset %d)", type(model).__name__, len(dummy_frames),
                 TRACE_FRAMES, opset)
        with export_patches(model), torch.no_grad():
            torch.onnx.export(
                model, (torch.from_numpy(features), torch.from_numpy(mask)), str(raw), dynamo=False,
                opset_version=opset, do_constant_folding=True,
                input_names=[t.name for t in spec.inputs], output_names=[t.name for t in spec.outputs],
                dynamic_axes=spec.dynamic_axes(),
            )
        proto = onnx.load(str(raw))
    pin_output_dims(proto, spec)
    set_metadata(proto, {
        META_HIDDEN_SIZE: str(model.config.text_config.hidden_size),
        META_CHECKPOINT_DTYPE: checkpoint_dtype,
        META_EXPORT_DTYPE: "float32",
        META_MAX_FRAMES: str(spec.max_frames),
    })
    external = save_onnx(proto, out_path, external_data)
    del proto
    onnx.checker.check_model(str(out_path))
    export_seconds = time.perf_counter() - t0
    log.info("wrote %s (%.1f MB%s) in %.1f s", out_path, onnx_bytes(out_path) / 1e6,
             ", external data" if external else "", export_seconds)

    figures = {
        "onnx_path": str(out_path), "onnx_bytes": onnx_bytes(out_path), "external_data": external,
        "opset": opset, "hidden_size": model.config.text_config.hidden_size, "checkpoint_dtype": checkpoint_dtype,
        "export_dtype": "float32", "export_windows": len(dummy_frames), "dynamic_axes": spec.dynamic_axes(),
        "export_seconds": round(export_seconds, 3),
    }
    if validate:
        figures.update(validate_encoder(out_path, model, spec))
    figures["seconds"] = round(time.perf_counter() - t0, 3)
    return figures


def save_onnx(proto: onnx.ModelProto, out_path: Path, external_data: bool | None = None) -> bool:
    """Save as one file, or with all weights in one `<name>.data` beside it; return whether external."""
    data = out_path.with_name(out_path.name + ".data")
    data.unlink(missing_ok=True)  # onnx appends to an existing data file
    if external_data is None:
        external_data = sum(_tensor_bytes(t) for t in proto.graph.initializer) > MAX_SINGLE_FILE_BYTES
    onnx.save_model(proto, str(out_path), save_as_external_data=external_data, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)
    return external_data


def set_metadata(proto: onnx.ModelProto, props: dict[str, str]) -> None:
    existing = {p.key: p for p in proto.metadata_props}
    for key, value in props.items():
        prop = existing.get(key) or proto.metadata_props.add()
        prop.key, prop.value = key, value


def onnx_bytes(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def _tensor_bytes(t: onnx.TensorProto) -> int:
    if t.raw_data:
        return len(t.raw_data)
    return int(np.prod(t.dims)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


# ---------------------------------------------------------------------------------------------------------------
# Validation (part of export)
# ---------------------------------------------------------------------------------------------------------------

def make_inputs(n_mels: int, frames: int, valid_frames: list[int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Log-mel-like windows with the given valid lengths; padded frames hold a constant, as the feature
    extractor's padding does. → features [W, n_mels, frames] f32, mask [W, frames] i32."""
    rng = np.random.default_rng(seed)
    features = (0.5 * rng.standard_normal((len(valid_frames), n_mels, frames))).astype(np.float32)
    mask = np.zeros((len(valid_frames), frames), np.int32)
    for w, n in enumerate(valid_frames):
        mask[w, :n] = 1
        features[w, :, n:] = -1.0
    return features, mask


def validation_frames(frames: int) -> list[int]:
    """W = 4, not the traced 2: a full window, 700 valid frames, an odd length (1501 → 375 rows), and 98 frames
    (exactly its 100-frame bucket's L + 2)."""
    return [frames, PARTIAL_FRAMES, frames // 2 + 1, lengths.FRAME_BUCKETS[0] - lengths.CROP_MARGIN]


def validation_crops(valid_frames: list[int]) -> list[tuple[int, list[int]]]:
    """(T, windows) of each ONNX run: all windows at the full T (the old fixed shape), then each shorter window's
    bucket with every window that fits in it (the longest sets T, the others are padded to it)."""
    full = max(lengths.frame_bucket(n) for n in valid_frames)
    runs = [(full, list(range(len(valid_frames))))]
    for T in sorted({lengths.frame_bucket(n) for n in valid_frames} - {full}, reverse=True):
        runs.append((T, [w for w, n in enumerate(valid_frames) if lengths.frame_bucket(n) <= T]))
    return runs


def validate_encoder(onnx_path: Path, model: AudioEmbedder, spec: ExportSpec,
                     valid_frames: list[int] | None = None) -> dict:
    """ONNX Runtime CPU (all graph optimisations) vs transformers' forward on full windows; the graph runs the
    full windows and, per frame bucket, the windows cropped to it (validation_crops): every run's kept rows are
    compared with the full-window reference. Raise ExportValidationError on a broken contract or a difference
    above the spec's tolerance. Return the figures (worst over the runs, and per T)."""
    t0 = time.perf_counter()
    n_mels = spec.inputs[0].dims[1]
    valid_frames = valid_frames or validation_frames(spec.max_frames)
    features, mask = make_inputs(n_mels, spec.max_frames, valid_frames)  # full windows
    check_io(onnx_path, spec)
    session = _session(onnx_path)
    with torch.no_grad():
        want = model.reference(torch.from_numpy(features), torch.from_numpy(mask)).numpy()  # [W, 750, H]

    runs = validation_crops(valid_frames)
    log.info("validating %s on W=%d windows (valid frames %s) at T=%s", Path(onnx_path).name, len(valid_frames),
             valid_frames, [T for T, _ in runs])
    per_t, got = {}, None
    for T, idx in runs:
        outputs = session.run(None, {INPUT_FEATURES: np.ascontiguousarray(features[idx, :, :T]),
                                     INPUT_MASK: np.ascontiguousarray(mask[idx, :T])})
        axes = axes_for(len(idx), T)
        for out, t in zip(outputs, spec.outputs):
            if out.dtype != np.dtype(t.dtype) or out.shape != t.shape(**axes):
                raise ExportValidationError(f"{t.name} at T={T}: got {out.dtype}{list(out.shape)}, declared "
                                            f"{t.dtype}{list(t.shape(**axes))}")
        per_t[T] = compare(outputs[0], want[idx], [valid_frames[w] for w in idx])
        if got is None:
            got = outputs[0]

    figures = compare(got, want, valid_frames)
    figures["max_abs_diff"] = max(f["max_abs_diff"] for f in per_t.values())
    figures["cosine"] = min(f["cosine"] for f in per_t.values())
    figures["min_row_cosine"] = min(f["min_row_cosine"] for f in per_t.values())
    figures["all_finite"] = all(f["all_finite"] for f in per_t.values())
    figures["per_frames"] = {str(T): {k: per_t[T][k] for k in ("max_abs_diff", "cosine")} for T in per_t}
    figures.update(windows_tested=len(valid_frames), valid_frames=list(valid_frames), atol=spec.atol,
                   rtol=spec.rtol, min_cosine=spec.min_cosine, frames_tested=[T for T, _ in runs],
                   validate_seconds=round(time.perf_counter() - t0, 3))
    limit = spec.atol + spec.rtol * figures["max_abs_ref"]
    log.info("onnx vs torch: max abs diff %.3g (limit %.3g), cosine %.8f (min %.8f)",
             figures["max_abs_diff"], limit, figures["cosine"], spec.min_cosine)
    if not figures["all_finite"]:
        raise ExportValidationError("non-finite values in audio_embeds", figures)
    if figures["max_abs_diff"] > limit or figures["cosine"] < spec.min_cosine:
        raise ExportValidationError(
            f"onnx vs torch above tolerance: max abs diff {figures['max_abs_diff']:.3g} (limit {limit:.3g}), "
            f"cosine {figures['cosine']:.8f} (min {spec.min_cosine})", figures)
    return figures


def check_io(onnx_path: Path, spec: ExportSpec) -> None:
    """The file's declared graph inputs/outputs: names, order, element types, and dims, dynamic exactly on the
    declared axes. (Read from the file, not from an ORT session: ORT reports its own inferred shapes.)"""
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    for kind, values, declared in (("input", graph.input, spec.inputs), ("output", graph.output, spec.outputs)):
        got = [(v.name, onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
                [d.dim_param if d.HasField("dim_param") else (d.dim_value if d.HasField("dim_value") else None)
                 for d in v.type.tensor_type.shape.dim]) for v in values]
        want = [(t.name, t.dtype, list(t.dims)) for t in declared]
        if got != want:
            raise ExportValidationError(f"{kind}s: got {got}, declared {want}")


def compare(got: np.ndarray, want: np.ndarray, valid_frames: list[int]) -> dict:
    """Figures on the valid rows of each window (got, want: [W, rows, H])."""
    rows = [lengths.embeds_valid_per_window(n) for n in valid_frames]
    a = np.concatenate([got[w, :n] for w, n in enumerate(rows)]).astype(np.float64)  # [sum(rows), H]
    b = np.concatenate([want[w, :n] for w, n in enumerate(rows)]).astype(np.float64)
    row_cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-30)
    return {
        "max_abs_diff": float(np.abs(a - b).max()),
        "max_abs_ref": float(np.abs(b).max()),
        "cosine": float((a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30)),
        "min_row_cosine": float(row_cos.min()),
        "valid_rows": rows,
        "all_finite": bool(np.isfinite(got).all()),
    }


def _session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


# ---------------------------------------------------------------------------------------------------------------
# INT8 dynamic quantization (ONNX Runtime CPU option)
# ---------------------------------------------------------------------------------------------------------------

def quantize_encoder_dynamic(onnx_path: Path, out_path: Path, *, valid_frames: list[int] | None = None) -> dict:
    """INT8 weights (per output channel), activations quantized at run time, MatMuls only: the two convs are
    under 1% of the encoder's FLOPs and quantizing them too cost accuracy on the tiny model (cosine 0.9991 vs
    0.9997). Accuracy is measured against the float model on the validation windows; ExportValidationError
    below INT8_MIN_COSINE."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    onnx_path, out_path = Path(onnx_path), Path(out_path)
    t0 = time.perf_counter()
    external = onnx_path.with_name(onnx_path.name + ".data").exists()
    log.info("quantizing %s → %s (int8 dynamic, MatMul weights per channel)", onnx_path.name, out_path.name)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".quant-") as tmp:
        raw = Path(tmp) / "encoder.int8.onnx"
        quantize_dynamic(onnx_path, raw, op_types_to_quantize=["MatMul"], per_channel=True,
                         weight_type=QuantType.QInt8, use_external_data_format=external)
        proto = onnx.load(str(raw))
    set_metadata(proto, {p.key: p.value for p in onnx.load(str(onnx_path), load_external_data=False).metadata_props})
    set_metadata(proto, {META_QUANTIZATION: "int8-dynamic"})
    save_onnx(proto, out_path)
    del proto
    seconds = time.perf_counter() - t0

    fp32, int8 = _session(onnx_path), _session(out_path)
    n_mels = fp32.get_inputs()[0].shape[1]  # [W, n_mels, T]
    frames = lengths.WINDOW_FRAMES
    valid_frames = valid_frames or validation_frames(frames)
    features, mask = make_inputs(n_mels, frames, valid_frames)
    feeds = {INPUT_FEATURES: features, INPUT_MASK: mask}
    figures = compare(int8.run(None, feeds)[0], fp32.run(None, feeds)[0], valid_frames)
    figures.update(onnx_path=str(out_path), onnx_bytes=onnx_bytes(out_path), float_onnx_bytes=onnx_bytes(onnx_path),
                   windows_tested=len(valid_frames), valid_frames=list(valid_frames), min_cosine=INT8_MIN_COSINE,
                   quantization="int8-dynamic", seconds=round(time.perf_counter() - t0, 3),
                   quantize_seconds=round(seconds, 3))
    log.info("int8 vs fp32: max abs diff %.3g, cosine %.6f, %.1f MB", figures["max_abs_diff"], figures["cosine"],
             figures["onnx_bytes"] / 1e6)
    if not figures["all_finite"] or figures["cosine"] < INT8_MIN_COSINE:
        raise ExportValidationError(f"int8 vs fp32 cosine {figures['cosine']:.6f} < {INT8_MIN_COSINE}", figures)
    return figures


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf-dir", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--opset", type=int, default=18)
    ap.add_argument("--int8", type=Path, help="also write an ONNX Runtime int8 dynamic-quantized copy here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    figures = {"encoder": export_encoder(args.hf_dir, args.out, opset=args.opset)}
    if args.int8:
        figures["int8_dynamic"] = quantize_encoder_dynamic(args.out, args.int8)
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
