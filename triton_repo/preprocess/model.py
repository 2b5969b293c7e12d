"""Triton adapter: encoded audio clips → log-mel windows (af3trt.runtime.stages.audio; af3trt.kernels.logmel on the GPU).

The request's audio is digested once here (runtime/stages/audio_cache.py): a clip seen again skips decoding and the
log-mel, a window seen again (by its content, in any request) skips its log-mel (one byte-bounded LRU of prepared
batches and window rows, parameter cache_bytes), and each window's key travels on as audio_digest to the encoder's
cache and fusion's prompt_table_extra_ids."""

from functools import partial

import numpy as np
import triton_python_backend_utils as pb

from af3trt.kernels import device_of as kernels_device
from af3trt.kernels import logmel
from af3trt.runtime.stages import audio, audio_cache, lengths
from af3trt.runtime.stages.params import PreprocessParams
from af3trt.runtime.triton import triton_io as io
from af3trt.runtime.engines.gpus import cap_cuda_memory
from af3trt.runtime.triton.context import RequestContext, RunningRequests
from af3trt.runtime.stages.contract import (AUDIO, AUDIO_WINDOWS, INPUT_FEATURES, INPUT_FEATURES_MASK, STREAM, STRIP_PREFIX,
                                    THINKING, WINDOW_THINKING, AUDIO_DIGEST)


class TritonPythonModel:
    def initialize(self, args):
        p = PreprocessParams.parse(io.params(args))
        self.max_windows = p.max_audio_windows
        self.crop = p.crop_frames  # windows cropped to the request's frame bucket
        if p.threads:  # torch intra-op threads of the log-mel (process-wide in this stub)
            import torch

            torch.set_num_threads(p.threads)
        self.ctx = RequestContext()
        self.running = RunningRequests(args["model_name"])  # the supervisor's drain reads it
        self.cache = audio_cache.LruBytes(p.cache_bytes)
        device = self.device = kernels_device(p.gpu_kernels, p.kernels_device, "preprocess")  # None: the CPU log-mel
        cap_cuda_memory(p.cuda_memory_cap_bytes, device, "preprocess")  # build/memory_plan.py stub_caps (GPU target)
        self.log_mel = audio.log_mel if device is None else partial(logmel.log_mel, device=device)
        if device is not None:
            from af3trt.kernels.check import warm

            off = warm(device)  # compiled and checked now, not on the first request; torch path if they fail
            if off:
                pb.Logger.log_warn(f"preprocess: {off}; using the torch log-mel")
            pb.Logger.log_info(f"preprocess: log-mel on {device} (af3trt.kernels)")

    def execute(self, requests):
        with self.running.of(len(requests)):
            return io.per_request(pb, requests, self.run)

    def run(self, r):
        clips = io.tensor(pb, r, AUDIO)
        clips = [] if clips is None else [bytes(c) for c in clips.reshape(-1)]
        digest = audio_cache.audio_digest(clips, self.max_windows, self.crop)
        batch = self.cache.get(digest) if clips else None
        if batch is None:
            batch = audio.prepare_clips(clips, self.max_windows, crop=self.crop, log_mel_fn=self.log_mel,
                                        window_cache=self.cache if self.device is None else None)
            if clips and self.device is None:  # device features stay on the GPU: not kept here
                self.cache.put(digest, batch)
        if sum(batch.windows_per_clip) > self.max_windows:
            raise io.RequestError(f"{sum(batch.windows_per_clip)} windows of audio in one request; the limit is "
                                  f"{self.max_windows} ({self.max_windows * lengths.WINDOW_SECONDS} s in all)")
        limit = self.max_windows * lengths.WINDOW_SECONDS
        notices = [audio.truncation_notice(i, s, limit)
                   for i, (s, cut) in enumerate(zip(batch.seconds_per_clip, batch.truncated)) if cut]
        self.ctx.put(r.request_id(), {"notices": notices,
                                      STRIP_PREFIX: bool(io.scalar(pb, r, STRIP_PREFIX) or False),
                                      STREAM: bool(io.scalar(pb, r, STREAM) or False)})
        features, mask, keys = batch.features, batch.mask, batch.keys
        if features.shape[0] == 0:
            # Text-only request: Triton cannot batch zero windows, so send one empty-mask placeholder window
            # (the CPU encoder skips it; fusion ignores windows past the clips').
            features = np.zeros((1, lengths.N_MELS, lengths.FRAME_BUCKETS[0]), np.float32)
            mask = np.zeros((1, lengths.FRAME_BUCKETS[0]), np.int32)
            keys = np.zeros((1, 2), np.uint64)  # never looked up: the encoder skips an empty window
        return pb.InferenceResponse([
            io.output_tensor(pb, INPUT_FEATURES, features),  # [W, 128, T]: cropped to the request's frame bucket
            pb.Tensor(INPUT_FEATURES_MASK, mask),  # [W, T]
            pb.Tensor(AUDIO_WINDOWS, np.asarray(batch.windows_per_clip, np.int32)),  # [clips]
            # [W, 1]: the encoder runs think/'s variant on a thinking request's windows
            pb.Tensor(WINDOW_THINKING, np.full((len(mask), 1), bool(io.scalar(pb, r, THINKING) or False))),
            pb.Tensor(AUDIO_DIGEST, keys),  # [W, 2]
        ])
