"""Triton adapter: the exported encoder+projector ONNX graph on ONNX Runtime (CPU backend of the encoder stage).

Triton's dynamic batcher hands over the windows of several requests at once; they run as one ORT batch.
"""

import numpy as np
import triton_python_backend_utils as pb

from af3trt.runtime import triton_io as io
from af3trt.runtime.encoder import OnnxEncoder


class TritonPythonModel:
    def initialize(self, args):
        p = io.params(args)
        threads = int(p.get("intra_op_threads", "0")) or None
        self.encoder = OnnxEncoder(io.resolve(args, p["onnx_path"]), intra_op_threads=threads)
        self.max_run = int(p.get("max_windows_per_run", "0")) or None

    def execute(self, requests):
        feats = [io.tensor(pb, r, "input_features") for r in requests]  # each [w_i, 128, 3000]
        masks = [io.tensor(pb, r, "input_features_mask") for r in requests]  # each [w_i, 3000]
        try:
            f, m = np.concatenate(feats), np.concatenate(masks)
            embeds = np.zeros((len(f), self.encoder.rows_per_window, self.encoder.hidden_size), np.float32)  # [W, 750, H]
            live = np.flatnonzero(m.sum(1) > 0)  # placeholder windows (empty mask) are not computed
            step = self.max_run or max(len(live), 1)
            for s in range(0, len(live), step):
                idx = live[s: s + step]
                embeds[idx] = self.encoder.run(f[idx], m[idx])
        except Exception as e:  # noqa: BLE001
            return [io.error_response(pb, e) for _ in requests]
        out, start = [], 0
        for x in feats:
            out.append(pb.InferenceResponse([pb.Tensor("audio_embeds", embeds[start: start + len(x)])]))
            start += len(x)
        return out
