"""Block-by-block polyphase resampling that reproduces `scipy.signal.resample_poly` sample for sample.

Why: a request's audio is decoded a block at a time and must never be held whole at its source rate (an hour
of 384 kHz audio is 5.5 GB of float32). `StreamResampler` takes the decoded mono blocks as they come, keeps only
the filter's left context between blocks, and can stop as soon as the first `keep` output samples exist — so
what the server holds is bounded by AF3's 600 s at 16 kHz, not by what the file claims.

The arithmetic (scipy's, with its defaults: Kaiser window beta 5, half length 10 * max(up, down)):

    h      = firwin(2*half+1, 1/max(up, down), kaiser 5) * up, zero-padded in front by pre = down - half % down
    y_full = upfirdn(h, x, up, down)            y_full[j] = sum_k h[j*down - k*up] * x[k]
    y      = y_full[pre_remove : pre_remove + ceil(n*up/down)],   pre_remove = (half + pre) // down

y_full[j] reads inputs k in ((j*down - len(h)) / up, j*down / up]: nothing to the right of the block it belongs
to, and ceil(len(h) / up) inputs to its left. So with block boundaries on multiples of `down` (then block start
s maps to output s*up/down exactly), running upfirdn on [s - context, e) gives y_full over [s*up/down,
e*up/down) exactly. The last block also yields the filter's tail (the input continued by zeros).
"""

from __future__ import annotations

import math

import numpy as np


class StreamResampler:
    """feed(block) → output samples ready so far; finish() → the rest. Concatenated, they equal
    `resample_poly(x, up, down)` of the whole input (float32 in, float32 out)."""

    def __init__(self, rate_in: int, rate_out: int):
        # scipy.signal here, not at import: it costs 0.8 s of CPU (measured) that a 16-kHz clip never needs, and the
        # preprocess stub imports this module, so every start and heal of that stub paid it
        from scipy.signal import firwin, upfirdn

        self.upfirdn = upfirdn
        g = math.gcd(rate_in, rate_out)
        self.up, self.down = rate_out // g, rate_in // g
        half = 10 * max(self.up, self.down)
        h = firwin(2 * half + 1, 1.0 / max(self.up, self.down), window=("kaiser", 5.0)).astype(np.float32)
        h *= self.up
        pre = self.down - half % self.down
        self.h = np.concatenate([np.zeros(pre, np.float32), h])  # [L]
        self.pre_remove = (half + pre) // self.down
        # Left context in inputs, a multiple of `down` so that every slice starts on an output boundary.
        self.context = -(-(-(-len(self.h) // self.up)) // self.down) * self.down
        self._tail = np.zeros(0, np.float32)  # inputs [start - len(_tail), seen): context + not yet processed
        self._start = 0  # input index of the next block (multiple of down)
        self._seen = 0  # inputs fed so far
        self._skip = self.pre_remove  # leading y_full samples still to drop
        self.produced = 0  # output samples returned so far

    def outputs_for(self, n_in: int) -> int:
        """Output length for a whole input of n_in samples (scipy's n_out)."""
        return -(-n_in * self.up // self.down)

    def inputs_needed(self, n_out: int) -> int:
        """Inputs that determine the first n_out outputs without the end of the input being known."""
        j = n_out + self.pre_remove  # y_full samples needed: [0, j)
        return (j * self.down) // self.up + self.down + 1

    def feed(self, x: np.ndarray) -> np.ndarray:
        """x: float32 [t] → float32 [u], the outputs this block completes."""
        self._seen += len(x)
        buf = np.concatenate([self._tail, np.asarray(x, np.float32)])  # inputs [seen - len(buf), seen)
        end = (self._seen // self.down) * self.down  # process inputs up to here
        if end <= self._start:
            self._tail = buf
            return np.zeros(0, np.float32)
        out = self._block(buf, end)
        keep_from = max(0, end - self.context)
        self._tail = buf[keep_from - (self._seen - len(buf)):]
        self._start = end
        return out

    def finish(self) -> np.ndarray:
        """The outputs left once the input has ended (including the filter's tail), trimmed to scipy's length."""
        buf = self._tail
        first = self._seen - len(buf)
        lo = max(first, self._start - self.context)
        ys = self.upfirdn(self.h, buf[lo - first:], self.up, self.down)
        ys = ys[(self._start - lo) * self.up // self.down:]
        self._start = self._seen
        out = self._drop_lead(ys.astype(np.float32, copy=False))
        n_left = self.outputs_for(self._seen) - self.produced
        if len(out) < n_left:  # scipy pads h with zeros at the end when the tail is short: zeros
            out = np.concatenate([out, np.zeros(n_left - len(out), np.float32)])
        out = out[:max(0, n_left)]
        self.produced += len(out)
        return out

    def _block(self, buf: np.ndarray, end: int) -> np.ndarray:
        first = self._seen - len(buf)
        lo = max(first, self._start - self.context)
        ys = self.upfirdn(self.h, buf[lo - first:end - first], self.up, self.down)
        a = (self._start - lo) * self.up // self.down
        ys = ys[a:a + (end - self._start) * self.up // self.down]
        out = self._drop_lead(ys.astype(np.float32, copy=False))
        self.produced += len(out)
        return out

    def _drop_lead(self, ys: np.ndarray) -> np.ndarray:
        if self._skip:
            n = min(self._skip, len(ys))
            self._skip -= n
            ys = ys[n:]
        return ys
