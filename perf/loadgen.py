"""Our own closed-loop load generator: `concurrency` threads, each sending AF3Client requests back to back.

It measures what a user of af3trt's client sees, response by response (TTFT and inter-token latency of streams),
and cross-checks perf_analyzer. Each request opens its own gRPC stream, as AF3Client does, so the figures include
that client's connection set-up; perf_analyzer (C++) keeps its connections.
"""

from __future__ import annotations

import itertools
import threading
import time

from af3trt.perf.metrics import RequestRecord
from af3trt.runtime.client import AF3Client


def run_load(url: str, inputs: list[tuple[str, bytes | None]], *, concurrency: int, requests: int,
             max_tokens: int, stream: bool, timeout: float = 1800.0,
             on_request: callable = None) -> tuple[list[RequestRecord], float]:
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
