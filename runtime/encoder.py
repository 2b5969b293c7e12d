"""CPU backend of the encoder stage: the exported audio encoder + projector on ONNX Runtime.

Imported by the Triton python model, so it depends on onnxruntime and numpy only (no torch, no transformers).

    enc = OnnxEncoder("encoder.onnx")
    embeds = enc.run(features, mask)   # [W, 128, 3000] f32, [W, 3000] i32 → [W, 750, H] f32

Rows of a window past its valid length are finite but meaningless; the caller keeps the number of rows that the
audio-length arithmetic gives for that window.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

# The encoder's tensor contract (runtime/encoder_io.py, names as exported by af3trt.export.onnx_export).
from af3trt.runtime.encoder_io import (INPUT_FEATURES, INPUT_MASK, META_CHECKPOINT_DTYPE,  # noqa: F401
                                       META_EXPORT_DTYPE, META_HIDDEN_SIZE, META_QUANTIZATION, OUTPUT_EMBEDS)


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
        _, self.num_mel_bins, self.frames = inputs[INPUT_FEATURES].shape  # [W, n_mels, frames]
        _, self.rows_per_window, width = outputs[OUTPUT_EMBEDS].shape  # [W, rows, H]
        declared = self.metadata.get(META_HIDDEN_SIZE)
        if isinstance(width, int) and declared is not None and int(declared) != width:
            raise ValueError(f"{self.path}: output width {width} but metadata {META_HIDDEN_SIZE}={declared}")
        if not isinstance(width, int) and declared is None:
            raise ValueError(f"{self.path}: hidden size is neither static in the output shape nor in the metadata")
        self.hidden_size = width if isinstance(width, int) else int(declared)
        self.checkpoint_dtype = self.metadata.get(META_CHECKPOINT_DTYPE)
        self.quantization = self.metadata.get(META_QUANTIZATION)

    def run(self, features: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """features: [W, n_mels, frames] float32, mask: [W, frames] int32 → audio_embeds: [W, rows, H] float32."""
        self._check(features, mask)
        if features.shape[0] == 0:
            return np.zeros((0, self.rows_per_window, self.hidden_size), np.float32)
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
        if features.ndim != 3 or features.shape[1:] != (self.num_mel_bins, self.frames):
            raise ValueError(f"{INPUT_FEATURES} must be [W, {self.num_mel_bins}, {self.frames}], got {features.shape}")
        if mask.shape != (features.shape[0], self.frames):
            raise ValueError(f"{INPUT_MASK} must be [W={features.shape[0]}, {self.frames}], got {mask.shape}")
