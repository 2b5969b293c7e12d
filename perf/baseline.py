"""The reference to beat: transformers' AudioFlamingo3ForConditionalGeneration.generate on the same checkpoint and
the same clips, in this process.

A request is timed from its encoded bytes to its generated ids, like a request to the server: soundfile decoding
(to 16 kHz, scipy resampling when needed), AudioFlamingo3Processor.apply_chat_template (features and tokens),
greedy generate. Two ways of serving several requests:

    sequential  one request at a time (what a transformers script does): service time per request
    batched     one generate call over c requests, left-padded by the processor (transformers' own batching)
"""

from __future__ import annotations

import io
import time
from math import gcd
from pathlib import Path

import numpy as np

SR = 16000


def decode(data: bytes) -> np.ndarray:
    """The reference's own decoding: soundfile, channel mean, scipy polyphase resampling to 16 kHz."""
    import soundfile as sf
    from scipy.signal import resample_poly

    wave, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    wave = wave.mean(axis=1)
    if sr != SR:
        g = gcd(SR, sr)
        wave = resample_poly(wave, SR // g, sr // g).astype(np.float32)
    return wave


class TransformersBaseline:
    def __init__(self, ckpt: Path, threads: int | None = None, dtype: str | None = None):
        """dtype: the torch dtype to load the whole model in (`from_pretrained(dtype=...)`); None: transformers'
        default, which in 5.x is "auto": the checkpoint's own dtype (fp32 for the synthetic presets, bf16 for AF3)."""
        import torch
        from transformers import AudioFlamingo3ForConditionalGeneration, AutoProcessor

        self.torch = torch
        if threads:
            torch.set_num_threads(threads)
        self.threads = torch.get_num_threads()
        self.processor = AutoProcessor.from_pretrained(ckpt)
        kw = {} if dtype is None else {"dtype": getattr(torch, dtype)}
        self.model = AudioFlamingo3ForConditionalGeneration.from_pretrained(ckpt, **kw).eval()
        self.dtype = str(self.model.dtype).removeprefix("torch.")
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = list(eos) if isinstance(eos, (list, tuple)) else [eos]
        self.end_id = self.eos_ids[0]  # like the server: stop on the first end id, which is not output

    def set_threads(self, n: int) -> None:
        self.torch.set_num_threads(n)
        self.threads = n

    def generate(self, batch: list[tuple[str, bytes | None]], max_new_tokens: int) -> tuple[float, list[list[int]]]:
        """One generate call over `batch` (prompt, clip bytes); returns (seconds, generated ids per request)."""
        torch = self.torch
        t0 = time.perf_counter()
        convs = []
        for prompt, clip in batch:
            content = ([{"type": "audio", "audio": decode(clip)}] if clip else []) + [{"type": "text", "text": prompt}]
            convs.append([{"role": "user", "content": content}])
        with torch.inference_mode():
            inputs = self.processor.apply_chat_template(convs, tokenize=True, return_dict=True,
                                                        add_generation_prompt=True)
            inputs = inputs.to(self.model.dtype)  # BatchFeature.to: the float tensors (the features) only
            out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                      eos_token_id=self.end_id, pad_token_id=self.end_id)
        seconds = time.perf_counter() - t0
        new = out[:, inputs["input_ids"].shape[1]:].tolist()
        return seconds, [strip_end(row, self.end_id) for row in new]

    def sequential(self, inputs: list[tuple[str, bytes | None]], requests: int, max_new_tokens: int) -> dict:
        """`requests` requests one after another (cycling over inputs): per-request seconds and ids."""
        times, ids = [], []
        for i in range(requests):
            s, (row,) = self.generate([inputs[i % len(inputs)]], max_new_tokens)
            times.append(s)
            ids.append(row)
        return {"seconds": times, "ids": ids, "tokens": [len(r) for r in ids]}

    def batched(self, inputs: list[tuple[str, bytes | None]], batch_size: int, max_new_tokens: int) -> dict:
        batch = [inputs[i % len(inputs)] for i in range(batch_size)]
        s, ids = self.generate(batch, max_new_tokens)
        return {"batch_size": batch_size, "seconds": s, "ids": ids, "tokens": [len(r) for r in ids]}


def strip_end(ids: list[int], end_id: int) -> list[int]:
    """Generated ids up to (not including) the first end id: what the server returns (padding follows it)."""
    return ids[: ids.index(end_id)] if end_id in ids else ids


def sequential_point(service_s: list[float], tokens: list[int], concurrency: int) -> dict:
    """A closed loop of `concurrency` clients in front of a one-at-a-time server, from measured service times:
    throughput is 1 / mean service time whatever the concurrency; a request waits for the ones ahead of it, so its
    latency is about concurrency x service time (derived, not measured at c > 1)."""
    mean = float(np.mean(service_s))
    return {"concurrency": concurrency, "throughput_rps": 1.0 / mean,
            "output_tokens_per_s": float(np.mean(tokens)) / mean,
            "latency_ms": {f"p{p}": 1e3 * concurrency * float(np.percentile(service_s, p)) for p in (50, 90, 99)},
            "derived": concurrency > 1}


def batched_point(run: dict) -> dict:
    s = run["seconds"]
    return {"concurrency": run["batch_size"], "throughput_rps": run["batch_size"] / s,
            "output_tokens_per_s": sum(run["tokens"]) / s,
            "latency_ms": {f"p{p}": 1e3 * s for p in (50, 90, 99)}, "derived": False}


def agreement(ours: list[list[int]], theirs: list[list[int]]) -> dict:
    """Exact-match rate and mean shared-prefix fraction of two lists of id sequences."""
    exact = [a == b for a, b in zip(ours, theirs)]
    prefix = []
    for a, b in zip(ours, theirs):
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        prefix.append(n / max(len(a), len(b), 1))
    return {"pairs": len(exact), "exact": float(np.mean(exact)) if exact else None,
            "prefix": float(np.mean(prefix)) if prefix else None}
