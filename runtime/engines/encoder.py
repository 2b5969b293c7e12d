"""CPU backend of the encoder stage: the exported audio encoder + projector on ONNX Runtime.

Imported by the Triton python model, so it depends on onnxruntime and numpy only (no torch, no transformers).

    enc = OnnxEncoder("encoder.onnx")
    embeds = enc.run(features, mask)   # [W, 128, T] f32, [W, T] i32 → [W, T/4, H] f32 (T = 3000: [W, 750, H])

T is the frame bucket the windows were cropped to (runtime/stages/lengths.py); a graph exported before the frame axis was
dynamic takes only its fixed T. Rows of a window past its valid length are finite but meaningless; the caller keeps
the number of rows that the audio-length arithmetic gives for that window.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from af3trt.runtime.stages import lengths
# The encoder's tensor contract (runtime/engines/encoder_io.py, names as exported by af3trt.export.onnx_export).
from af3trt.runtime.engines.encoder_io import (INPUT_FEATURES, INPUT_MASK, META_CHECKPOINT_DTYPE,  # noqa: F401
                                       META_EXPORT_DTYPE, META_HIDDEN_SIZE, META_MAX_FRAMES, META_QUANTIZATION,
                                       OUTPUT_EMBEDS)


def pad_frames(features: list[np.ndarray], masks: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate several requests' windows ([w_i, n_mels, T_i] float32, [w_i, T_i] int32) into one batch padded
    to the longest T with an empty mask: [W, n_mels, T], [W, T]. Exact for every kept row, which depends only on its
    window's first L + 2 <= T_i frames (runtime/stages/lengths.py). The padded frames repeat each window's last frame (a
    padding frame, as in the full window), so the activations look like the full window's (calibration data)."""
    frames = max(f.shape[2] for f in features)
    if all(f.shape[2] == frames for f in features):
        return np.concatenate(features), np.concatenate(masks)
    n = sum(len(f) for f in features)
    out_f = np.empty((n, features[0].shape[1], frames), np.float32)
    out_m = np.zeros((n, frames), np.int32)
    start = 0
    for f, m in zip(features, masks):
        out_f[start: start + len(f), :, : f.shape[2]] = f
        out_f[start: start + len(f), :, f.shape[2]:] = f[:, :, -1:]
        out_m[start: start + len(f), : m.shape[1]] = m
        start += len(f)
    return out_f, out_m


class OnnxEncoder:
    """One ONNX Runtime CPU session over the exported encoder."""

    def __init__(self, path: str | Path, intra_op_threads: int | None = None, inter_op_threads: int = 1):
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.inter_op_num_threads = inter_op_threads
        if intra_op_threads is not None:  # else ORT uses one thread per physical core
            opts.intra_op_num_threads = intra_op_threads
        # Idle pool threads sleep instead of spinning: the encoder shares the CPU with the decoder and the other
        # stages, and a spinning pool thread steals a core from them (measured on 2 cores: 2 threads without
        # spinning ran a window in half the time of 1 thread alone, and still faster than 1 thread next to a busy
        # core; with spinning, 2 threads were no faster than 1).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
        self.path = Path(path)
        self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)

        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name: o for o in self.session.get_outputs()}
        if set(inputs) != {INPUT_FEATURES, INPUT_MASK} or OUTPUT_EMBEDS not in outputs:
            raise ValueError(f"{self.path} is not an af3trt encoder: inputs {sorted(inputs)}, "
                             f"outputs {sorted(outputs)}")
        _, self.num_mel_bins, frames = inputs[INPUT_FEATURES].shape  # [W, n_mels, T]
        _, _, width = outputs[OUTPUT_EMBEDS].shape  # [W, T/4, H]
        # dynamic T: any even T up to max_frames; a fixed-T graph: that T only
        self.dynamic_frames = not isinstance(frames, int)
        self.max_frames = int(self.metadata.get(META_MAX_FRAMES, lengths.WINDOW_FRAMES)) if self.dynamic_frames \
            else frames
        self.frames = None if self.dynamic_frames else frames
        declared = self.metadata.get(META_HIDDEN_SIZE)
        if isinstance(width, int) and declared is not None and int(declared) != width:
            raise ValueError(f"{self.path}: output width {width} but metadata {META_HIDDEN_SIZE}={declared}")
        if not isinstance(width, int) and declared is None:
            raise ValueError(f"{self.path}: hidden size is neither static in the output shape nor in the metadata")
        self.hidden_size = width if isinstance(width, int) else int(declared)
        self.checkpoint_dtype = self.metadata.get(META_CHECKPOINT_DTYPE)
        self.quantization = self.metadata.get(META_QUANTIZATION)

    def rows(self, frames: int) -> int:
        """Output rows per window for windows of `frames` frames."""
        return lengths.encoder_rows(frames)

    def run(self, features: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """features: [W, n_mels, T] float32, mask: [W, T] int32 → audio_embeds: [W, T/4, H] float32."""
        self._check(features, mask)
        if features.shape[0] == 0:
            return np.zeros((0, self.rows(features.shape[2]), self.hidden_size), np.float32)
        feeds = {INPUT_FEATURES: np.ascontiguousarray(features), INPUT_MASK: np.ascontiguousarray(mask)}
        (embeds,) = self.session.run([OUTPUT_EMBEDS], feeds)
        return embeds

    def _check(self, features, mask):
        if not isinstance(features, np.ndarray) or not isinstance(mask, np.ndarray):
            raise ValueError(f"features and mask must be numpy arrays, got {type(features)}, {type(mask)}")
        if features.dtype != np.float32:
            raise ValueError(f"{INPUT_FEATURES} must be float32, got {features.dtype}")
        if mask.dtype != np.int32:
            raise ValueError(f"{INPUT_MASK} must be int32, got {mask.dtype}")
        frames = "T" if self.dynamic_frames else self.frames
        if features.ndim != 3 or features.shape[1] != self.num_mel_bins:
            raise ValueError(f"{INPUT_FEATURES} must be [W, {self.num_mel_bins}, {frames}], got {features.shape}")
        t = features.shape[2]
        if self.dynamic_frames and not (2 <= t <= self.max_frames and t % 2 == 0):
            raise ValueError(f"{INPUT_FEATURES} must have an even number of frames T in 2..{self.max_frames}, "
                             f"got {t}")
        if not self.dynamic_frames and t != self.frames:
            raise ValueError(f"{INPUT_FEATURES} must be [W, {self.num_mel_bins}, {frames}], got {features.shape}")
        if mask.shape != (features.shape[0], t):
            raise ValueError(f"{INPUT_MASK} must be [W={features.shape[0]}, T={t}], got {mask.shape}")
