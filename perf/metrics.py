"""Per-request timings → the figures of a benchmark point. Pure functions, no I/O.

A `RequestRecord` is what both load generators produce, perf_analyzer (from its profile export) and our own
gRPC client (perf/loadgen.py): when the request was sent, and when each of its responses arrived with how many
tokens it carried. Every figure of a point is computed from these records the same way, whichever tool made them:

    latency  time from sending the request to its last response
    TTFT     time to the first response that carries a token
    ITL      gaps between consecutive token-bearing responses of one request (streaming only), pooled over requests
    tokens   output tokens summed over a request's responses
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

PERCENTILES = (50, 90, 99)


@dataclass
class RequestRecord:
    start_s: float  # send time, seconds on the generator's clock
    response_s: list[float] = field(default_factory=list)  # arrival of each response, seconds after start_s
    response_tokens: list[int] = field(default_factory=list)  # tokens carried by each response
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.response_s)

    @property
    def tokens(self) -> int:
        return int(sum(self.response_tokens))

    @property
    def latency_s(self) -> float:
        return self.response_s[-1]

    @property
    def end_s(self) -> float:
        return self.start_s + self.latency_s

    @property
    def ttft_s(self) -> float | None:
        return next((t for t, n in zip(self.response_s, self.response_tokens) if n > 0), None)

    def inter_token_s(self) -> list[float]:
        """Gaps between token-bearing responses; a response with k > 1 tokens counts as k arrivals at once."""
        times = [t for t, n in zip(self.response_s, self.response_tokens) for _ in range(n)]
        return [b - a for a, b in zip(times, times[1:])]

    def to_dict(self) -> dict:
        return asdict(self)


def percentiles(values, ps=PERCENTILES) -> dict[str, float | None]:
    """{"p50": …, "p90": …, "p99": …} with numpy's linear interpolation; None for no values."""
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    return {f"p{p}": (float(np.percentile(v, p)) if v.size else None) for p in ps}


def summarize(records: list[RequestRecord], window_s: float | None = None) -> dict:
    """Throughput and latency figures of one point. Times in ms, rates per second.

    window_s: the measurement window (perf_analyzer reports its own); by default from the first send to the last
    response of the successful requests.
    """
    ok = [r for r in records if r.ok]
    out = {"requests": len(records), "errors": len(records) - len(ok)}
    if not ok:
        return out
    if window_s is None:
        window_s = max(r.end_s for r in ok) - min(r.start_s for r in ok)
    window_s = max(window_s, 1e-9)
    tokens = [r.tokens for r in ok]
    out.update({
        "window_s": window_s,
        "throughput_rps": len(ok) / window_s,
        "output_tokens_per_s": sum(tokens) / window_s,
        "tokens_per_request": float(np.mean(tokens)),
        "latency_ms": _ms(percentiles(r.latency_s for r in ok)),
        "latency_mean_ms": 1e3 * float(np.mean([r.latency_s for r in ok])),
        "ttft_ms": _ms(percentiles(r.ttft_s for r in ok)),
    })
    itl = [g for r in ok for g in r.inter_token_s()]
    if itl and any(len(r.response_s) > 1 for r in ok):
        out["itl_ms"] = _ms(percentiles(itl))
        out["itl_mean_ms"] = 1e3 * float(np.mean(itl))
    return out


def _ms(d: dict) -> dict:
    return {k: (None if v is None else 1e3 * v) for k, v in d.items()}


def fit_linear(x, y) -> dict:
    """Least-squares y = a + b x, with R² and the largest relative deviation from the line (linearity check)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.size < 2 or np.ptp(x) == 0:
        return {"intercept": None, "slope": None, "r2": None, "max_rel_dev": None}
    b, a = np.polyfit(x, y, 1)
    pred = a + b * x
    ss_res, ss_tot = float(((y - pred) ** 2).sum()), float(((y - y.mean()) ** 2).sum())
    return {"intercept": float(a), "slope": float(b), "r2": 1.0 - ss_res / ss_tot if ss_tot else 1.0,
            "max_rel_dev": float(np.max(np.abs(y - pred) / np.maximum(np.abs(y), 1e-12)))}


def growth_exponent(x, y) -> float | None:
    """Slope of log y against log x: 1 = linear, 2 = quadratic (over the measured range)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    keep = (x > 0) & (y > 0)
    if keep.sum() < 2 or np.ptp(np.log(x[keep])) == 0:
        return None
    return float(np.polyfit(np.log(x[keep]), np.log(y[keep]), 1)[0])


def quadratic_share(x, y) -> float | None:
    """Least-squares y = a + b x + c x²: the quadratic term's share of the fitted cost at the largest x (0 = linear;
    positive = growing faster than linear, e.g. attention over the whole sequence)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.size < 3 or len(set(x.tolist())) < 3:
        return None
    c, b, a = np.polyfit(x, y, 2)
    top = x.max()
    fitted = a + b * top + c * top * top
    return float(c * top * top / fitted) if fitted else None
