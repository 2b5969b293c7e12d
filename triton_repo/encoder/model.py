"""Triton adapter: the exported encoder+projector ONNX graph on ONNX Runtime (CPU backend of the encoder stage).

With encoder batching (off on CPU by default: triton_repo/configs.py ENCODER_BATCHING) Triton's dynamic batcher hands
over the windows of several requests at once; they run as one ORT batch; without it, one request's windows. Each
request's windows are cropped to its frame bucket T_i (preprocess); requests of different T are padded to the
longest with an empty mask, which changes no kept row (runtime/stages/lengths.py), and each gets back its own T_i / 4 rows.
A build with think/ overriding the audio side has a second graph (think_onnx_path): the windows of thinking requests
(window_thinking) run on it, the others on the base graph, both in the same execution.

A window whose key (audio_digest, from preprocess) is in the cache is not run: its rows are the cached ones
(runtime/stages/audio_cache.py; byte-bounded LRU, parameter cache_bytes).
"""

import numpy as np
import triton_python_backend_utils as pb

from af3trt.runtime.stages import audio_cache
from af3trt.runtime.stages.params import EncoderParams
from af3trt.runtime.triton import triton_io as io
from af3trt.runtime.stages.contract import AUDIO_DIGEST, AUDIO_EMBEDS, INPUT_FEATURES, INPUT_FEATURES_MASK, WINDOW_THINKING
from af3trt.runtime.triton.context import RunningRequests
from af3trt.runtime.engines.encoder import OnnxEncoder, pad_frames


class TritonPythonModel:
    def initialize(self, args):
        self.running = RunningRequests(args["model_name"])
        p = EncoderParams.parse(io.params(args))
        threads = p.intra_op_threads or None
        if p.stand_in_hidden_size is not None:  # the serving-path benchmark's stand-in: zeros of the right shape
            from af3trt.runtime.engines.stand_in import StandInEncoder  # here: it imports the decoder's module (torch)

            self.encoder = StandInEncoder(p.stand_in_hidden_size)
        else:
            self.encoder = OnnxEncoder(io.resolve(args, p.onnx_path), intra_op_threads=threads)
        # think/'s encoder variant; without one a thinking request's windows use the base graph (the adapter
        # then overrides nothing on the audio side)
        self.think = (OnnxEncoder(io.resolve(args, p.think_onnx_path), intra_op_threads=threads)
                      if p.think_onnx_path else self.encoder)
        self.max_run = p.max_windows_per_run or None
        self.cache = audio_cache.LruBytes(p.cache_bytes)

    def execute(self, requests):
        with self.running.of(len(requests)):  # the supervisor's drain reads it
            return self.encode(requests)

    def encode(self, requests):
        feats = [io.tensor(pb, r, INPUT_FEATURES) for r in requests]  # each [w_i, 128, T_i]
        masks = [io.tensor(pb, r, INPUT_FEATURES_MASK) for r in requests]  # each [w_i, T_i]
        think = [io.tensor(pb, r, WINDOW_THINKING) for r in requests]  # each [w_i, 1] or absent
        think = np.concatenate([np.zeros(len(x), bool) if t is None else t.reshape(-1).astype(bool)
                                for x, t in zip(feats, think)])  # [W]
        keys = [io.tensor(pb, r, AUDIO_DIGEST) for r in requests]  # each [w_i, 2] or None
        try:
            f, m = pad_frames(feats, masks)  # [W, 128, T], [W, T] with T = max T_i
            rows = [self.encoder.rows(x.shape[2]) for x in feats for _ in range(len(x))]  # [W]: T_i / 4 per window
            embeds = np.zeros((len(f), self.encoder.rows(f.shape[2]), self.encoder.hidden_size), np.float32)
            # placeholder windows (empty mask) are not computed; cached ones are not either
            cache_key = audio_cache.encoder_keys(keys, [len(x) for x in feats], think)
            hits, live = audio_cache.take_cached(self.cache, cache_key, m.sum(1) > 0)
            for w, hit in hits.items():
                embeds[w, :rows[w]] = hit
            for variant, chosen in ((self.encoder, ~think), (self.think, think)):
                run = np.flatnonzero(live & chosen)
                step = self.max_run or max(len(run), 1)
                for s in range(0, len(run), step):
                    idx = run[s: s + step]
                    embeds[idx] = variant.run(f[idx], m[idx])  # [w, T/4, H]
            audio_cache.keep_computed(self.cache, cache_key, {w: embeds[w, :rows[w]] for w in np.flatnonzero(live)})
        except Exception as e:  # noqa: BLE001
            return [io.error_response(pb, e) for _ in requests]
        out, start = [], 0
        for x in feats:
            n = self.encoder.rows(x.shape[2])
            out.append(pb.InferenceResponse([pb.Tensor(AUDIO_EMBEDS, np.ascontiguousarray(embeds[start: start + len(x), :n]))]))
            start += len(x)
        return out
