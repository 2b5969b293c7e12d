"""Triton adapter: the encoder's TensorRT plan run by TensorRT's Python runtime (GPU backend of the encoder stage).

The serving container has no Triton TensorRT backend (runtime/engines/trt_runner.py says where that is written), so the
plan runs inside this python-backend model, one engine and CUDA stream per GPU instance. Triton's dynamic batcher
still merges the windows of several requests into one execution; each request gets its slice of the output as a
GPU tensor through DLPack (python_backend r26.04 README: pb_utils.Tensor.from_dlpack takes C-contiguous tensors
implementing __dlpack__; a row slice of the contiguous output is one). Triton hands initialize() the model's
directory, version and the instance's GPU as args "model_repository", "model_version", "model_instance_device_id"
(python_backend r26.04 src/stub_launcher.cc).

A window whose key (audio_digest, from preprocess) is in the cache is not run: its rows are the cached ones, kept on
the GPU as torch tensors (runtime/stages/audio_cache.py: the CPU encoder's byte-bounded LRU and keys, parameter
cache_bytes). A cached window's mask is emptied before the engine runs, so it is a placeholder there (not computed,
encode_windows), and its cached rows are put in its place after.
"""

from pathlib import Path

import numpy as np
import torch
import triton_python_backend_utils as pb

from af3trt.runtime.stages import audio_cache
from af3trt.runtime.stages.params import EncoderTrtParams
from af3trt.runtime.triton import triton_io as io
from af3trt.runtime.stages.contract import AUDIO_DIGEST, AUDIO_EMBEDS, INPUT_FEATURES, INPUT_FEATURES_MASK, WINDOW_THINKING
from af3trt.runtime.engines.gpus import cap_cuda_memory
from af3trt.runtime.triton.context import RunningRequests
from af3trt.runtime.engines.trt_runner import TrtRunner, encode_windows


def _torch(request, name: str, device) -> torch.Tensor:
    # inputs may arrive in CPU or GPU memory (FORCE_CPU_ONLY_INPUT_TENSORS "no"): taken without a copy, then moved
    return torch.from_dlpack(pb.get_input_tensor_by_name(request, name).to_dlpack()).to(device)


class TritonPythonModel:
    def initialize(self, args):
        self.running = RunningRequests(args["model_name"])
        p = EncoderTrtParams.parse(io.params(args))
        plan = Path(args["model_repository"]) / args["model_version"] / p.plan_file
        device_id = int(args.get("model_instance_device_id", "0"))
        self.runner = TrtRunner.load(plan, device_id)
        cap_cuda_memory(p.cuda_memory_cap_bytes, self.runner.place.device, "encoder")  # build/memory_plan.py stub_caps
        # think/'s encoder variant (build/think.py): thinking requests' windows run on it, on the same activation buffer
        self.think = (TrtRunner.load(plan.with_name(p.think_plan_file), device_id, activations=self.runner.activations)
                      if p.think_plan_file else self.runner)
        # sized by the memory plan (build/memory_plan.py encoder_cache_bytes), inside this stub's cap
        self.cache = audio_cache.LruBytes(p.cache_bytes)

    def execute(self, requests):
        with self.running.of(len(requests)):  # the supervisor's drain reads it
            return self.encode(requests)

    def encode(self, requests):
        try:
            return self._encode(requests)
        except torch.OutOfMemoryError:
            if not len(self.cache):
                raise
            # the cache is planned inside this stub's cap (build/memory_plan.py); should an execution still run out of
            # memory, the cache gives way: never a request failed for what caching holds
            self.cache.clear()
            pb.Logger.log_warn("encoder: out of memory with the audio cache full; the cache was cleared")
            return self._encode(requests)

    def _encode(self, requests):
        try:
            device = self.runner.place.device
            feats = [_torch(r, INPUT_FEATURES, device) for r in requests]  # each [w_i, 128, T]
            masks = [_torch(r, INPUT_FEATURES_MASK, device) for r in requests]  # each [w_i, T]
            f, m = torch.cat(feats), torch.cat(masks)
            think = torch.cat([torch.zeros(len(x), dtype=torch.bool) if t is None else
                               torch.from_numpy(t.as_numpy().reshape(-1).astype(bool))
                               for x, t in zip(feats, (pb.get_input_tensor_by_name(r, WINDOW_THINKING)
                                                       for r in requests))]).to(device)  # [W]
            # Triton batches only requests of the same [128, T] here (configs.encoder_config), so every window has
            # T/4 rows; keys come in host or GPU memory (FORCE_CPU_ONLY_INPUT_TENSORS "no": triton_io.host_array)
            keys = audio_cache.encoder_keys([io.host_array(pb, r, AUDIO_DIGEST) for r in requests],
                                            [len(x) for x in feats], think.cpu().numpy())
            hits, todo = audio_cache.take_cached(self.cache, keys, (m.sum(1) > 0).cpu().numpy())
            if hits:
                m = m.clone()
                m[torch.tensor(sorted(hits), device=device)] = 0  # [W, T]: cached windows become placeholders
            if hits and not todo.any():  # nothing to run
                first = next(iter(hits.values()))  # [T/4, H]
                embeds = first.new_zeros((len(f), *first.shape))
            elif self.think is self.runner or not bool(think.any()):
                embeds = encode_windows(self.runner, f, m)  # [W, T/4, H] on the GPU
            elif bool(think.all()):
                embeds = encode_windows(self.think, f, m)
            else:  # base and thinking windows in one execution: each variant runs its own
                base = encode_windows(self.runner, f[~think], m[~think])
                embeds = base.new_empty((len(f), *base.shape[1:]))
                embeds[~think] = base
                embeds[think] = encode_windows(self.think, f[think], m[think])
            for w, hit in hits.items():
                embeds[w] = hit
            audio_cache.keep_computed(self.cache, keys, {int(w): embeds[w] for w in np.flatnonzero(todo)})
        except torch.OutOfMemoryError as e:
            if len(self.cache):
                raise  # encode() clears the cache and runs it again
            return [io.error_response(pb, e) for _ in requests]
        except Exception as e:  # noqa: BLE001
            return [io.error_response(pb, e) for _ in requests]
        out, start = [], 0
        for x in feats:
            part = embeds[start: start + len(x)]
            out.append(pb.InferenceResponse([pb.Tensor.from_dlpack(AUDIO_EMBEDS, part)]))
            start += len(x)
        return out
