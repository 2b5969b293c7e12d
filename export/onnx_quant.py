"""Encoder precision for the TensorRT build, written into the ONNX graph itself.

TensorRT 10.14 builds the encoder strongly typed (build/trt_encoder.py): every tensor keeps the type the ONNX gives
it, and the weakly typed builder flags (FP16/BF16/INT8/FP8) are not used. So the precision is chosen here, on the
validated float32 export (export/onnx_export.py), and the result is validated again before any engine is built:

    fp16 | bf16   cast_encoder       weights and activations in the low type; graph inputs/outputs stay float32
                                     (a Cast after each input and before the output), so the Triton contract of the
                                     encoder (float32 features in, float32 audio_embeds out) does not change.
    int8 | fp8    quantize_encoder   explicit Q/DQ from nvidia-modelopt's ONNX PTQ, calibrated on real speech
                                     (calibration_set); the unquantized rest runs in fp16.

Casting choices (all ops go to the low type, none is kept in float32):
  - LayerNormalization keeps its `stash_type` (float32, the default): the ONNX-TensorRT parser turns it into the
    normalization layer's compute precision, so mean and variance are accumulated in float32 while the tensors are
    fp16/bf16. Softmax runs in the low type like every TensorRT-LLM/Whisper fp16 encoder; its kernels accumulate in
    float32.
  - Float constants outside the low type's finite range are clamped to it first. The export's attention-mask bias is
    float32's lowest value (-3.4e38); cast as-is it becomes -inf in fp16 (and in bf16, where round-to-nearest
    overflows), and a fully masked score row would turn into NaN. Clamped, masking keeps the float32 graph's
    semantics (exp underflows to 0).
  - Which type: fp16 has 3 more mantissa bits, bf16 float32's range. The audio tower is Whisper's, which NVIDIA
    serves in fp16; fp16 is the default and its validation on real audio (below) catches an overflow, since every
    node's output is stored in fp16 there too. bf16 is offered for encoders whose activations leave fp16's range.

Validation: valid rows of held-out real-audio windows, against the float32 ONNX on ONNX Runtime CPU; figures are the
cosine over all valid rows, the worst row's cosine and the max abs difference.
  - fp16: ORT CPU runs the cast graph itself (where it has no fp16 kernel it computes in float32 and rounds the
    output back to fp16: fp16 storage, float32 accumulation, as TensorRT's fp16 kernels do).
  - bf16: ORT CPU has no bf16 Conv/MatMul, so the cast graph cannot run here. The figure is an ESTIMATE: the same torch
    module (transformers' encoder + projector) run in bfloat16 against itself in float32 (`method: torch-bf16`).
  - int8: ORT CPU runs the Q/DQ graph (it fuses Q/DQ pairs into its int8 kernels).
  - fp8: the Q/DQ graph is written at opset 21, the first whose Transpose/Reshape accept float8 (at opset 19 ORT
    refuses "float8 through Transpose"; TensorRT 10.14 parses opset 21). ORT CPU then runs the very file TensorRT
    gets, with graph optimisations below ENABLE_ALL (its MatMulIntegerToFloat fusion rejects float8): exact FP8
    Q/DQ rounding with the calibrated scales, GEMMs in fp16/float32 instead of FP8 tensor cores
    (`method: ort-cpu-fp8-qdq`).

    python -m af3trt.export.onnx_quant --onnx encoder.onnx --precision int8 --out encoder.int8.onnx \
        [--calib-audio a.wav b.flac ...] [--hf-dir DIR]
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from af3trt.export.onnx_export import compare, onnx_bytes, save_onnx, set_metadata
from af3trt.registry import GPU_ENCODER_PRECISIONS
from af3trt.runtime.engines.encoder import (INPUT_FEATURES, INPUT_MASK, META_EXPORT_DTYPE, META_QUANTIZATION,
                                    OUTPUT_EMBEDS, pad_frames)

log = logging.getLogger(__name__)

# The precisions, which of them are Q/DQ and their acceptance bounds: af3trt/registry.py GPU_ENCODER_PRECISIONS.
# How each cast type is written: (ONNX type, numpy name, largest finite value).
LOW_TYPES = {"fp16": (onnx.TensorProto.FLOAT16, "float16", 65504.0),
             "bf16": (onnx.TensorProto.BFLOAT16, "bfloat16", (2 - 2 ** -7) * 2.0 ** 127)}
FP8_OPSET = 21  # first opset whose Transpose/Reshape take float8 (TensorRT 10.14 parses it)


class OnnxQuantError(RuntimeError):
    """A precision variant that cannot be produced or does not meet its accuracy bound."""

    def __init__(self, message: str, figures: dict | None = None):
        super().__init__(message)
        self.figures = figures or {}


# ---------------------------------------------------------------------------------------------------------------
# Calibration data: real speech through the serving front end
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class CalibrationSet:
    features: np.ndarray  # [N, 128, T] float32  calibration windows (T: the longest window's frame bucket)
    mask: np.ndarray  # [N, T] int32
    held_features: np.ndarray  # [M, 128, T'] float32  held-out windows: never seen by calibration
    held_mask: np.ndarray  # [M, T'] int32
    source: str

    def describe(self) -> dict:
        return {"source": self.source, "calibration_windows": len(self.features),
                "held_out_windows": len(self.held_features),
                "calibration_valid_frames": self.mask.sum(1).tolist(),
                "held_out_valid_frames": self.held_mask.sum(1).tolist()}


def _wav_bytes(wave: np.ndarray) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, wave.astype(np.float32), 16000, format="WAV", subtype="FLOAT")
    return buf.getvalue()


def _tile(wave: np.ndarray, seconds: float, gains: Sequence[float]) -> np.ndarray:
    """wave repeated (with alternating gains) to `seconds` of audio: a window with no padding."""
    n = int(16000 * seconds)
    reps = -(-n // len(wave))
    return np.concatenate([wave * gains[i % len(gains)] for i in range(reps)])[:n]


def bundled_clips() -> tuple[list[bytes], list[bytes]]:
    """(calibration clips, held-out clips) as WAV bytes, cut from the bundled 5-s speech clip.

    Its first half (2.5 s) feeds calibration and its second half the held-out set, so no held-out window shares a
    sample with calibration. Each half gives a short padded window as is, at lower gain, and a full 30-s window
    (the half repeated with alternating gains), covering both the padded and the unpadded case of the encoder.
    """
    from af3trt.runtime import assets
    from af3trt.runtime.stages.audio import decode_audio

    wave = decode_audio(assets.speech_path().read_bytes())  # [80026] mono 16 kHz
    first, second = wave[: len(wave) // 2], wave[len(wave) // 2:]
    calib = [first, 0.5 * first, _tile(first, 30.0, (1.0, 0.6, 0.3))]
    held = [second, 0.7 * second, _tile(second, 30.0, (0.8, 0.4))]
    return [_wav_bytes(w) for w in calib], [_wav_bytes(w) for w in held]


def _windows(clips: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
    from af3trt.runtime.stages.audio import prepare_clips

    batches = [prepare_clips([c]) for c in clips]  # one clip at a time: a bad file names itself
    # each clip comes cropped to its frame bucket: pad to the longest, as the encoder does with a mixed batch
    return pad_frames([b.features for b in batches], [b.mask for b in batches])


def calibration_set(clips: Sequence[bytes] | None = None, *, held_out_fraction: float = 0.25) -> CalibrationSet:
    """Calibration and held-out windows from real audio, featurised by af3trt.runtime.stages.audio.prepare_clips.

    clips: encoded audio files (WAV/FLAC/OGG/MP3 bytes). The last `held_out_fraction` of them (at least one) are held
    out whole, so held-out windows come from audio calibration never saw. None: the bundled clip (bundled_clips).
    """
    if clips is None:
        calib, held = bundled_clips()
        source = "bundled speech.flac: first 2.5 s -> calibration, last 2.5 s -> held out"
    else:
        clips = list(clips)
        if len(clips) < 2:
            raise OnnxQuantError("calibration needs at least 2 audio files (one is held out for validation)")
        n_held = max(1, int(round(len(clips) * held_out_fraction)))
        calib, held = clips[:-n_held], clips[-n_held:]
        source = f"{len(clips)} user audio files: {len(calib)} calibration, {len(held)} held out"
    features, mask = _windows(calib)
    held_features, held_mask = _windows(held)
    return CalibrationSet(features, mask, held_features, held_mask, source)


# ---------------------------------------------------------------------------------------------------------------
# Graph helpers
# ---------------------------------------------------------------------------------------------------------------

def _io_signature(model: onnx.ModelProto) -> list[tuple]:
    def dims(v):
        return [d.dim_param if d.HasField("dim_param") else d.dim_value for d in v.type.tensor_type.shape.dim]

    return [(kind, v.name, v.type.tensor_type.elem_type, dims(v))
            for kind, values in (("input", model.graph.input), ("output", model.graph.output)) for v in values]


def _check_same_io(want: list[tuple], result: onnx.ModelProto, what: str) -> None:
    got = _io_signature(result)
    if want != got:
        raise OnnxQuantError(f"{what}: graph inputs/outputs changed: {got} != {want}")


def clamp_float_constants(model: onnx.ModelProto, limit: float) -> list[str]:
    """Clamp float32 initializers and Constant values to [-limit, limit] (in place); return what was clamped."""
    clamped = []

    def fix(t: onnx.TensorProto, where: str):
        if t.data_type != onnx.TensorProto.FLOAT:
            return
        a = numpy_helper.to_array(t)
        if a.size and np.abs(a).max() > limit:
            t.CopyFrom(numpy_helper.from_array(np.clip(a, -limit, limit).astype(np.float32), t.name))
            clamped.append(where)

    for init in model.graph.initializer:
        fix(init, init.name)
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    fix(attr.t, node.name or node.output[0])
    return clamped


def _initializer_types(model: onnx.ModelProto) -> dict[str, int]:
    """{element type name: count} over the initializers: what the weights are stored as."""
    out: dict[str, int] = {}
    for init in model.graph.initializer:
        name = onnx.TensorProto.DataType.Name(init.data_type)
        out[name] = out.get(name, 0) + 1
    return out


def _load(path: Path) -> onnx.ModelProto:
    return onnx.load(str(path))


def _session(path: Path, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = level
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_onnx(path: Path, features: np.ndarray, mask: np.ndarray, *, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
             batch: int = 4) -> np.ndarray:
    """audio_embeds [W, T/4, H] float32 of `path` on ORT CPU, `batch` windows per run."""
    s = _session(path, level)
    return np.concatenate([s.run([OUTPUT_EMBEDS], {INPUT_FEATURES: features[i: i + batch],
                                                   INPUT_MASK: mask[i: i + batch]})[0]
                           for i in range(0, len(features), batch)])


def _figures(got: np.ndarray, want: np.ndarray, mask: np.ndarray) -> dict:
    f = compare(got, want, [int(n) for n in mask.sum(1)])
    f.pop("valid_rows", None)
    return f


# ---------------------------------------------------------------------------------------------------------------
# fp16 / bf16
# ---------------------------------------------------------------------------------------------------------------

def cast_encoder(onnx_path: Path, out_path: Path, dtype: str = "fp16") -> dict:
    """Write `out_path`: the float32 encoder with weights and activations in fp16 or bf16, float32 I/O kept.
    (modelopt's AutoCast `convert_to_f16` does the cast and the boundary Casts; no float op is kept in float32 —
    the Range/And it reports skipping compute the mask's integer/bool arithmetic.)"""
    from modelopt.onnx.autocast import convert_to_f16

    if dtype not in LOW_TYPES:
        raise OnnxQuantError(f"cast dtype must be one of {sorted(LOW_TYPES)}, got {dtype!r}")
    _, np_name, limit = LOW_TYPES[dtype]
    onnx_path, out_path = Path(onnx_path), Path(out_path)
    t0 = time.perf_counter()
    model = _load(onnx_path)
    meta, io_sig = {p.key: p.value for p in model.metadata_props}, _io_signature(model)
    clamped = clamp_float_constants(model, limit)
    model = convert_to_f16(model, low_precision_type=dtype, keep_io_types=True, op_block_list=[])
    _check_same_io(io_sig, model, f"{dtype} cast")
    set_metadata(model, {**meta, META_EXPORT_DTYPE: np_name})
    out_path.parent.mkdir(parents=True, exist_ok=True)
    external = save_onnx(model, out_path)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    del model
    onnx.checker.check_model(str(out_path))
    return {"onnx_path": str(out_path), "onnx_bytes": onnx_bytes(out_path), "external_data": external,
            "precision": dtype, "opset": opset, "io_dtype": "float32", "clamped_constants": clamped,
            "initializer_types": _initializer_types(_load(out_path)), "seconds": round(time.perf_counter() - t0, 3)}


def estimate_bf16_torch(hf_dir: Path, features: np.ndarray, mask: np.ndarray) -> dict:
    """ESTIMATE of bf16 accuracy where the bf16 graph cannot run: the encoder + projector torch module in bfloat16
    against the same module in float32, on the given windows."""
    import torch

    from af3trt.export.onnx_export import load_audio_embedder

    model, _ = load_audio_embedder(Path(hf_dir))
    f, m = torch.from_numpy(features), torch.from_numpy(mask)
    with torch.no_grad():
        want = model(f, m).numpy()
        got = model.to(torch.bfloat16)(f.to(torch.bfloat16), m).float().numpy()
    return {"method": "torch-bf16", "estimate": True, **_figures(got, want, mask)}


# ---------------------------------------------------------------------------------------------------------------
# INT8 / FP8 explicit Q/DQ
# ---------------------------------------------------------------------------------------------------------------

def quantize_encoder(onnx_path: Path, out_path: Path, mode: str, calib: CalibrationSet, *,
                     high_precision: str = "fp16", calibration_method: str | None = None,
                     calibration_eps: Sequence[str] = ("cpu",)) -> dict:
    """Write `out_path`: explicit Q/DQ (`mode` int8 or fp8) by nvidia-modelopt's ONNX PTQ, calibrated with `calib`'s
    calibration windows (on ONNX Runtime CPU unless `calibration_eps` says e.g. ("cuda:0", "cpu")); the unquantized
    ops in `high_precision` (fp16, or fp32), float32 I/O kept.

    modelopt's defaults decide what is quantized: MatMul/Conv inputs and weights (per-channel weights for INT8),
    plus the attention BMMs in FP8 mode. FP8 is written at opset 21 (see the module docstring).
    """
    from modelopt.onnx.quantization import quantize

    qdq_modes = [n for n, p in GPU_ENCODER_PRECISIONS.items() if p.qdq]
    if mode not in qdq_modes:
        raise OnnxQuantError(f"quantize mode must be {' or '.join(qdq_modes)}, got {mode!r}")
    if high_precision not in ("fp16", "fp32"):
        raise OnnxQuantError("high_precision must be fp16 or fp32: a bf16 remainder cannot be validated on CPU "
                             "(ONNX Runtime has no bf16 kernels for it)")
    onnx_path, out_path = Path(onnx_path), Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model = _load(onnx_path)
    meta, io_sig = {p.key: p.value for p in model.metadata_props}, _io_signature(model)
    external = onnx_path.with_name(onnx_path.name + ".data").exists()
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".qdq-") as tmp:
        clamped_path = Path(tmp) / "encoder.clamped.onnx"
        clamped = clamp_float_constants(model, LOW_TYPES["fp16"][2]) if high_precision == "fp16" else []
        save_onnx(model, clamped_path, external)
        del model
        raw = Path(tmp) / f"encoder.{mode}.onnx"
        quantize(onnx_path=str(clamped_path), quantize_mode=mode,
                 calibration_data={INPUT_FEATURES: calib.features, INPUT_MASK: calib.mask},
                 calibration_method=calibration_method, calibration_eps=list(calibration_eps), output_path=str(raw),
                 high_precision_dtype=high_precision, use_external_data_format=external, log_level="WARNING",
                 opset=FP8_OPSET if mode == "fp8" else None)
        model = onnx.load(str(raw))
    _check_same_io(io_sig, model, f"{mode} Q/DQ")
    set_metadata(model, {**meta, META_QUANTIZATION: f"{mode}-qdq",
                         META_EXPORT_DTYPE: "float16" if high_precision == "fp16" else "float32"})
    saved_external = save_onnx(model, out_path)
    qdq = _qdq_types(model)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    del model
    if not qdq:
        raise OnnxQuantError(f"modelopt wrote no Q/DQ nodes into {out_path}")
    return {"onnx_path": str(out_path), "onnx_bytes": onnx_bytes(out_path), "external_data": saved_external,
            "precision": mode, "high_precision": high_precision, "opset": opset, "io_dtype": "float32",
            "qdq_nodes": qdq, "clamped_constants": clamped, "calibration": calib.describe(),
            "calibration_method": calibration_method or "modelopt default",
            "seconds": round(time.perf_counter() - t0, 3)}


def _qdq_types(model: onnx.ModelProto) -> dict[str, int]:
    """{quantized element type: QuantizeLinear count}, read from the Q nodes' zero-point (or output_dtype)."""
    inits = {i.name: i for i in model.graph.initializer}
    consts = {n.output[0]: n.attribute[0].t for n in model.graph.node if n.op_type == "Constant" and n.attribute}
    out: dict[str, int] = {}
    for n in model.graph.node:
        if n.op_type != "QuantizeLinear":
            continue
        zp = n.input[2] if len(n.input) > 2 else ""
        t = inits.get(zp) or consts.get(zp)
        name = onnx.TensorProto.DataType.Name(t.data_type) if t is not None else "UINT8"
        out[name] = out.get(name, 0) + 1
    return out


# ---------------------------------------------------------------------------------------------------------------
# Validation and the one entry point the build uses
# ---------------------------------------------------------------------------------------------------------------

def validate_variant(variant: Path, reference: Path, precision: str, calib: CalibrationSet, *,
                     hf_dir: Path | None = None) -> dict:
    """Figures of `variant` against the float32 `reference` on calib's held-out windows (see the module docstring
    for how each precision is measured). Raises OnnxQuantError below the precision's min_cosine (registry)."""
    feats, mask = calib.held_features, calib.held_mask
    want = run_onnx(reference, feats, mask)
    if precision in ("fp16", "int8"):
        figures = {"method": "ort-cpu", "estimate": False, **_figures(run_onnx(variant, feats, mask), want, mask)}
    elif precision == "fp8":
        got = run_onnx(variant, feats, mask, level=ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED)
        figures = {"method": "ort-cpu-fp8-qdq", "estimate": False, **_figures(got, want, mask)}
    elif precision == "bf16":
        if hf_dir is None:
            raise OnnxQuantError("bf16 cannot run on ONNX Runtime CPU: pass hf_dir for the torch bf16 estimate")
        figures = estimate_bf16_torch(hf_dir, feats, mask)
    else:
        raise OnnxQuantError(f"nothing to validate for precision {precision!r}")
    min_cosine = GPU_ENCODER_PRECISIONS[precision].min_cosine
    figures.update(min_cosine=min_cosine, held_out_windows=len(feats), calibration_source=calib.source)
    log.info("%s vs fp32 (%s, %d held-out windows): cosine %.6f, worst row %.6f, max abs %.4g", precision,
             figures["method"], len(feats), figures["cosine"], figures["min_row_cosine"], figures["max_abs_diff"])
    if not figures["all_finite"] or figures["cosine"] < min_cosine:
        raise OnnxQuantError(f"{precision} encoder vs fp32: cosine {figures['cosine']:.6f} < "
                             f"{min_cosine} on held-out audio ({figures['method']})", figures)
    return figures


def prepare_encoder(onnx_path: Path, out_dir: Path, precision: str, *, calib: CalibrationSet | None = None,
                    hf_dir: Path | None = None) -> tuple[Path, dict]:
    """The ONNX file to build the TensorRT engine from, for `precision` (fp32 | fp16 | bf16 | int8 | fp8), produced
    in out_dir and validated. Returns (path, figures)."""
    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    if precision not in GPU_ENCODER_PRECISIONS:
        raise OnnxQuantError(f"encoder precision must be one of {tuple(GPU_ENCODER_PRECISIONS)}, got {precision!r}")
    if GPU_ENCODER_PRECISIONS[precision].min_cosine is None:  # the reference itself: the float32 export
        return onnx_path, {"precision": precision, "onnx_path": str(onnx_path)}
    calib = calib or calibration_set()
    out = out_dir / f"encoder.{precision}.onnx"
    if precision in LOW_TYPES:
        figures = cast_encoder(onnx_path, out, precision)
    else:
        figures = quantize_encoder(onnx_path, out, precision, calib)
    figures["validation"] = validate_variant(out, onnx_path, precision, calib, hf_dir=hf_dir)
    return out, figures


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--onnx", type=Path, required=True, help="the validated float32 encoder (onnx_export)")
    ap.add_argument("--precision", required=True,
                    choices=[n for n, p in GPU_ENCODER_PRECISIONS.items() if p.min_cosine is not None])
    ap.add_argument("--out-dir", type=Path, required=True)
    ap.add_argument("--calib-audio", type=Path, nargs="*", help="audio files (the last quarter is held out); "
                                                                 "default: the bundled clip")
    ap.add_argument("--hf-dir", type=Path, help="checkpoint, for the bf16 estimate")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    calib = calibration_set([p.read_bytes() for p in args.calib_audio] if args.calib_audio else None)
    path, figures = prepare_encoder(args.onnx, args.out_dir, args.precision, calib=calib, hf_dir=args.hf_dir)
    print(json.dumps(figures, indent=2, default=str))


if __name__ == "__main__":
    main()
