"""Our own closed-loop load generator: `concurrency` threads, each sending AF3Client requests back to back.

It measures what a user of af3trt's client sees, response by response (TTFT and inter-token latency of streams),
and cross-checks perf_analyzer. Each request opens its own gRPC stream, as AF3Client does, so the figures include
that client's connection set-up; perf_analyzer (C++) keeps its connections.
"""

from __future__ import annotations

import itertools
import threading
import time
from typing import Callable, Iterator

from af3trt.perf.metrics import RequestRecord
from af3trt.runtime.client.library import AF3Client, AF3Stream, Chunk, Request
from af3trt.runtime.stages.contract import ENSEMBLE


def run_load(url: str, inputs: list[tuple[str, bytes | None]], *, concurrency: int, requests: int,
             max_tokens: int, stream: bool, timeout: float = 1800.0,
             on_request: Callable[[RequestRecord, list[int]], None] | None = None, **fields
             ) -> tuple[list[RequestRecord], float]:
    """Send `requests` requests (cycling over `inputs`) with `concurrency` in flight; return (records, window s).

    on_request(record, answer_ids): called after each request (from its worker thread). fields: more Request fields
    of every request (e.g. ignore_eos=True)."""
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
            rec, ids = one_request(client, prompt, clip, max_tokens=max_tokens, stream=stream, **fields)
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
                stream: bool, **fields) -> tuple[RequestRecord, list[int]]:
    return record(client.stream(prompt, [clip] if clip else [], max_tokens=max_tokens, stream=stream, **fields))


def record(chunks: Iterator[Chunk]) -> tuple[RequestRecord, list[int]]:
    """Consume one request's chunks (the request is sent at the first `next`): its record and answer ids. An
    error is recorded and counted as an error of the point; a request answered by its final flag alone is one
    response of 0 tokens."""
    rec = RequestRecord(start_s=time.perf_counter())
    ids: list[int] = []
    try:
        for chunk in chunks:
            rec.response_s.append(time.perf_counter() - rec.start_s)
            rec.response_tokens.append(len(chunk.token_ids))
            ids += chunk.token_ids
    except Exception as e:  # noqa: BLE001 — recorded, counted as an error of the point
        rec.error = f"{type(e).__name__}: {e}"
    else:
        if not rec.response_s:
            rec.response_s.append(time.perf_counter() - rec.start_s)
            rec.response_tokens.append(0)
    return rec, ids


class PersistentStream:
    """One gRPC connection and one open stream (the client's AF3Stream), requests sent one at a time: what the
    serving stack costs without the client's connection set-up (AF3Client opens a new one per request). Used by
    the per-request overhead probe.

        with PersistentStream(url) as s:
            record, ids = s.request(prompt, clip, max_tokens=32, stream=False)
    """

    def __init__(self, url: str, model: str = ENSEMBLE, timeout: float = 3600.0):
        self.conn = AF3Stream(url, model, timeout)
        self.n = 0

    def request(self, prompt: str, clip: bytes | None, *, max_tokens: int, stream: bool,
                thinking: bool | None = None):
        self.n += 1
        req = Request(prompt, [clip] if clip else [], max_tokens=max_tokens, stream=stream, thinking=thinking,
                      request_id=f"bench-{id(self)}-{self.n}")
        return record(self.conn.responses(req))

    def close(self) -> None:
        self.conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
