"""A clip seen again skips decoding and the encoder: the audio digest and a byte-bounded LRU cache keyed by it.

Preprocess computes one digest of a request's audio (`audio_digest`: BLAKE2b over each clip's bytes and the settings
that shape its features) and one key per window from what the window holds (`content_keys`: BLAKE2b over its 16-kHz
samples and the frame count T it is cropped to; the AUDIO_DIGEST tensor of runtime/stages/contract.py, uint64
[W, 2]). The keys are computed once and carried along as that tensor:

    preprocess  digest → its cached AudioBatch (decoded, windowed, log-mel, keys), else decode; then each window's
                key → its cached log-mel row, else compute it (`featurize`)
    encoder     window key → its cached projector rows [T/4, H], else run the window and cache
    fusion      window keys → prompt_table_extra_ids (runtime/prompt.table_extra_ids), without reading the table

A window is keyed by its content, not by the request it came in: the same 30 s of audio seen in another request
(a longer recording that starts the same, a live session's stream sent a window at a time, runtime/openai/realtime.py)
finds its features and rows cached. Exact: a window's log-mel is a function of its samples alone (the clamp uses the
window's own maximum) cropped to T, and its embeddings a function of its features (the encoder batches only windows
of the same frame count T, triton_repo/configs.py encoder_config); both are in the key. A hit returns the very array
the miss computed, so cached and uncached outputs are equal bit for bit.

    cache = LruBytes(max_bytes=256 << 20)
    hit = cache.get(key)          # None on a miss; a hit becomes the most recently used
    cache.put(key, array)         # evicts least recently used entries until the total fits max_bytes
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

import numpy as np

DIGEST_BYTES = 16  # 128-bit keys: two uint64 words per window
# Default bounds (the models' `cache_bytes` parameter overrides them; 0 turns a cache off). A 10-min clip is 20
# windows: 31 MB of log-mel features, and 20 x 750 x H x 4 bytes of encoder rows (215 MB at AF3's H = 3584).
DEFAULT_PREPROCESS_BYTES = 256 << 20
DEFAULT_ENCODER_BYTES = 1 << 30
# The CPU decoder's prompt KV (runtime/engines/decoder.py, prefix reuse): K and V of every layer, 2 x layers x kv_heads x
# head_dim x dtype bytes per token (57 KB for AF3's Qwen2.5-7B in bf16: 15,000 tokens of a 10-min clip are 860 MB).
DEFAULT_PREFIX_BYTES = 1 << 30


def audio_digest(clips: list[bytes], *settings) -> bytes:
    """16 bytes identifying a request's audio: each clip's length and bytes in order, then `settings` (what else
    shapes the features, e.g. max windows and cropping) as text."""
    h = hashlib.blake2b(digest_size=DIGEST_BYTES)
    for data in clips:
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    h.update(repr(settings).encode())
    return h.digest()


def window_keys(digest: bytes, windows: int) -> np.ndarray:
    """uint64 [windows, 2]: one key per window of the request (the digest with the window's index)."""
    keys = np.empty((windows, 2), np.uint64)
    for w in range(windows):
        keys[w] = np.frombuffer(hashlib.blake2b(digest + w.to_bytes(4, "little"),
                                                digest_size=DIGEST_BYTES).digest(), np.uint64)
    return keys


def content_keys(chunks: list[np.ndarray], frames: int) -> np.ndarray:
    """uint64 [len(chunks), 2]: one key per window from its float32 16-kHz samples (at most one window's) and the
    frames T the request crops its features to."""
    keys = np.empty((len(chunks), 2), np.uint64)
    for w, chunk in enumerate(chunks):
        h = hashlib.blake2b(b"window %d %d " % (frames, len(chunk)), digest_size=DIGEST_BYTES)
        h.update(memoryview(np.ascontiguousarray(chunk, np.float32)).cast("B"))
        keys[w] = np.frombuffer(h.digest(), np.uint64)
    return keys


def key_bytes(key: np.ndarray) -> bytes:
    """A window key (uint64 [2]) as a dict key."""
    return np.ascontiguousarray(key, np.uint64).tobytes()


def nbytes(value) -> int:
    """Bytes an entry holds: an array's, or the sum over a dataclass's / tuple's arrays."""
    if isinstance(value, np.ndarray) or isinstance(getattr(value, "nbytes", None), int):  # numpy, torch
        return int(value.nbytes)
    if isinstance(value, (list, tuple)):
        return sum(nbytes(v) for v in value)
    if hasattr(value, "__dict__"):
        return sum(nbytes(v) for v in vars(value).values())
    return 0


class LruBytes:
    """Least-recently-used cache bounded by the bytes of its values (max_bytes 0: off, nothing is kept).
    Values are shared, not copied: callers must not modify what they put or get. Thread-safe."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self.bytes = 0
        self._items: OrderedDict[bytes, tuple[object, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.stats = {"hits": 0, "misses": 0, "evictions": 0, "failed_puts": 0, "clears": 0}

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: bytes) -> bool:
        return key in self._items

    def get(self, key: bytes):
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.stats["misses"] += 1
                return None
            self._items.move_to_end(key)
            self.stats["hits"] += 1
            return item[0]

    def clear(self) -> None:
        """Drop every entry (what the encoder does when an execution runs out of memory: runtime/stages/audio_cache.py
        keep_computed, triton_repo/encoder_trt)."""
        with self._lock:
            self._items.clear()
            self.bytes = 0
            self.stats["clears"] += 1

    def put(self, key: bytes, value) -> bool:
        """Keep `value` under `key`; False (nothing kept) when it alone exceeds max_bytes."""
        size = nbytes(value)
        if size > self.max_bytes:
            return False
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.bytes -= old[1]
            self._items[key] = (value, size)
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, (_, dropped) = self._items.popitem(last=False)
                self.bytes -= dropped
                self.stats["evictions"] += 1
        return True


# --- the encoder stage's use of the cache, one source for the CPU encoder (numpy rows) and the GPU one (torch rows
# on the device): triton_repo/encoder/model.py and triton_repo/encoder_trt/model.py

def encoder_keys(digests: list, windows: list[int], think) -> list:
    """[W] each window's key in the encoder cache: (think/'s variant?, the window's digest), the encoder variant that
    makes its rows and the window; None for a window of a request sent without digests (never cached).
    digests: per request uint64 [w_i, 2] or None; windows: w_i; think: bool [W]."""
    keys = [None if d is None else key_bytes(d[w]) for d, n in zip(digests, windows) for w in range(n)]
    return [None if k is None else (bool(t), k) for k, t in zip(keys, think)]


def take_cached(cache: LruBytes, keys: list, live: np.ndarray) -> tuple[dict, np.ndarray]:
    """({window: its cached rows} for the live windows found in `cache`, bool [W]: the live windows still to run)."""
    hits, todo = {}, np.array(live, bool)
    for w in np.flatnonzero(todo):
        hit = None if keys[w] is None else cache.get(keys[w])
        if hit is not None:
            hits[int(w)], todo[w] = hit, False
    return hits, todo


def keep_computed(cache: LruBytes, keys: list, rows: dict) -> int:
    """Put a copy of each computed window's rows ({window: [T/4, H] numpy array or torch tensor, a view into the
    execution's output}) under its key; the copy stays where the rows are (host or device) and is all the entry
    holds, not the execution's whole output. A copy that cannot be made (out of memory: a stub's allocator is capped)
    is not kept and fails nothing: the request has its rows already. Returns the windows kept."""
    kept = 0
    for w, value in rows.items():
        if keys[w] is None:
            continue
        try:
            copy = value.clone() if hasattr(value, "clone") else value.copy()
        except (MemoryError, RuntimeError):  # torch.OutOfMemoryError is a RuntimeError
            cache.stats["failed_puts"] += 1
            break  # the rest would fail alike
        kept += cache.put(keys[w], copy)
    return kept
