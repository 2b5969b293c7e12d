"""Our own closed-loop load generator: `concurrency` threads, each sending AF3Client requests back to back.

It measures what a user of af3trt's client sees, response by response (TTFT and inter-token latency of streams),
and cross-checks perf_analyzer. Each request opens its own gRPC stream, as AF3Client does, so the figures include
that client's connection set-up; perf_analyzer (C++) keeps its connections.
"""

from __future__ import annotations

import itertools
import threading
import time
from typing import Callable

from af3trt.perf.metrics import RequestRecord
from af3trt.runtime.client import AF3Client


def run_load(url: str, inputs: list[tuple[str, bytes | None]], *, concurrency: int, requests: int,
             max_tokens: int, stream: bool, timeout: float = 1800.0,
             on_request: Callable[[RequestRecord, list[int]], None] | None = None
             ) -> tuple[list[RequestRecord], float]:
    """Send `requests` requests (cycling over `inputs`) with `concurrency` in flight; return (records, window s).

    on_request(record, answer_ids): called after each request (from its worker thread)."""
    client = AF3Client(url, timeout=timeout)
    order = itertools.count()
    lock = threading.Lock()
    records: list[RequestRecord] = []

    def worker():
        while True:
            with lock:
                i = next(order)
            if i >= requests:
                return
            prompt, clip = inputs[i % len(inputs)]
            rec, ids = one_request(client, prompt, clip, max_tokens=max_tokens, stream=stream)
            with lock:
                records.append(rec)
            if on_request:
                on_request(rec, ids)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, name=f"af3trt-load-{k}", daemon=True) for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return records, time.perf_counter() - t0


def one_request(client: AF3Client, prompt: str, clip: bytes | None, *, max_tokens: int,
                stream: bool) -> tuple[RequestRecord, list[int]]:
    rec = RequestRecord(start_s=time.perf_counter())
    ids: list[int] = []
    try:
        for chunk in client.stream(prompt, [clip] if clip else [], max_tokens=max_tokens, stream=stream):
            rec.response_s.append(time.perf_counter() - rec.start_s)
            rec.response_tokens.append(len(chunk.token_ids))
            ids += chunk.token_ids
    except Exception as e:  # noqa: BLE001 — recorded, counted as an error of the point
        rec.error = f"{type(e).__name__}: {e}"
    return rec, ids


class PersistentStream:
    """One gRPC connection and one open stream, requests sent one at a time: what the serving stack costs without
    the client's connection set-up (AF3Client opens a new one per request). Used by the per-request overhead probe.

        with PersistentStream(url) as s:
            record, ids = s.request(prompt, clip, max_tokens=32, stream=False)
    """

    def __init__(self, url: str, model: str = "af3", timeout: float = 3600.0):
        import queue

        import tritonclient.grpc as grpcclient

        self.model, self.timeout = model, timeout
        self.results: queue.Queue = queue.Queue()
        self.client = grpcclient.InferenceServerClient(url)
        self.client.start_stream(callback=lambda result, error: self.results.put((time.perf_counter(), result, error)))
        self.n = 0

    def request(self, prompt: str, clip: bytes | None, *, max_tokens: int, stream: bool):
        from af3trt.runtime.client import _inputs

        inputs = _inputs(prompt, [clip] if clip else [], None, {"max_tokens": max_tokens, "stream": stream})
        self.n += 1
        rid = f"bench-{id(self)}-{self.n}"
        rec = RequestRecord(start_s=time.perf_counter())
        ids: list[int] = []
        self.client.async_stream_infer(self.model, inputs, request_id=rid, enable_empty_final_response=True)
        while True:
            t, result, error = self.results.get(timeout=self.timeout)
            if error is not None:
                rec.error = str(error)
                return rec, ids
            if result.get_response().id != rid:
                continue
            out = result.as_numpy("output_ids")
            if out is not None:
                rec.response_s.append(t - rec.start_s)
                rec.response_tokens.append(int(out.size))
                ids += out.reshape(-1).tolist()
            final = result.get_response().parameters.get("triton_final_response")
            if final is not None and final.bool_param:
                if not rec.response_s:  # an empty final response only
                    rec.response_s.append(t - rec.start_s)
                    rec.response_tokens.append(0)
                return rec, ids

    def close(self) -> None:
        self.client.stop_stream()
        self.client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
