"""Triton's statistics API → per-stage figures of a benchmark point.

`snapshot(url)` reads the cumulative counters of every model (tritonclient gRPC `get_inference_statistics`);
`diff(before, after)` is what happened in between; `stage_split(delta, …)` turns that into milliseconds per
ensemble request for each stage of the pipeline. Everything but `snapshot` is pure and unit-tested.

What the counters mean (Triton 2.51):
- inference_stats.{queue, compute_input, compute_infer, compute_output}: summed over *requests*; a request that ran
  in a batch of 8 is charged the whole batch's compute. Divided by the ensemble's request count this is each stage's
  share of a request's latency ("latency split").
- batch_stats: summed over *executions*; divided by the ensemble's request count this is the stage's busy time
  per request ("busy split"), which is what bounds throughput.
- A decoupled model (the decoder) is charged only for its execute() call, which hands the request to the
  in-flight batcher and returns: its generation time is not in its counters. It is derived here as the ensemble's
  request time minus every other stage ("derived" in the report).
- postprocess runs once per decoder response (one per token when streaming); only the last one is on the
  request's critical path, so the split charges one execution's mean time and reports the total separately.
"""

from __future__ import annotations

KINDS = ("queue", "compute_input", "compute_infer", "compute_output")


def snapshot(url: str, timeout: float = 30.0) -> dict:
    """Cumulative counters of every model: {model: {...}} (see `parse`)."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    try:
        return parse(client.get_inference_statistics(as_json=True, client_timeout=timeout))
    finally:
        client.close()


def parse(stats_json: dict) -> dict:
    """The JSON form of ModelStatisticsResponse → {model: {"inferences", "executions", "success_count",
    "success_ns", <kind>_ns…, "batch_<kind>_ns"…}}, versions of one model summed (int64s arrive as strings)."""
    out: dict[str, dict] = {}
    for m in stats_json.get("model_stats", []):
        s = out.setdefault(m["name"], {"inferences": 0, "executions": 0, "success_count": 0, "success_ns": 0,
                                       "fail_count": 0, **{f"{k}_ns": 0 for k in KINDS},
                                       **{f"batch_{k}_ns": 0 for k in KINDS}, "batch_executions": 0})
        s["inferences"] += int(m.get("inference_count", 0))
        s["executions"] += int(m.get("execution_count", 0))
        inf = m.get("inference_stats", {})
        s["success_count"] += int(inf.get("success", {}).get("count", 0))
        s["success_ns"] += int(inf.get("success", {}).get("ns", 0))
        s["fail_count"] += int(inf.get("fail", {}).get("count", 0))
        for k in KINDS:
            s[f"{k}_ns"] += int(inf.get(k, {}).get("ns", 0))
        for b in m.get("batch_stats", []):
            s["batch_executions"] += int(b.get("compute_infer", {}).get("count", 0))
            for k in KINDS:
                s[f"batch_{k}_ns"] += int(b.get(k, {}).get("ns", 0))
    return out


def diff(before: dict, after: dict) -> dict:
    """Counters accumulated between two snapshots (models that appeared in between count from zero)."""
    return {m: {k: v - before.get(m, {}).get(k, 0) for k, v in a.items()} for m, a in after.items()}


def stage_split(delta: dict, *, ensemble: str, stages: tuple[str, ...], decoder: str = "decoder",
                per_response: tuple[str, ...] = ("postprocess",)) -> dict:
    """Per ensemble request, in ms, for each stage: queue, compute (input + infer + output), busy (executions'
    compute), requests and executions per ensemble request. Adds the decoder's derived generation time and the
    ensemble's own request time. Empty when the ensemble served no request in the interval."""
    n = delta.get(ensemble, {}).get("success_count", 0)
    if n <= 0:
        return {}
    out = {"requests": n, "ensemble_ms": delta[ensemble]["success_ns"] / n / 1e6, "stages": {}}
    on_path = 0.0
    for st in stages:
        d = delta.get(st)
        if d is None:
            continue
        runs = max(d["success_count"], 1)
        compute = sum(d[f"{k}_ns"] for k in KINDS[1:])
        row = {
            "inferences_per_request": d["success_count"] / n,
            "executions_per_request": d["executions"] / n,
            "queue_ms": d["queue_ns"] / n / 1e6,
            "compute_ms": compute / n / 1e6,
            "compute_infer_ms": d["compute_infer_ns"] / n / 1e6,
            "compute_io_ms": (d["compute_input_ns"] + d["compute_output_ns"]) / n / 1e6,
            "busy_ms": sum(d[f"batch_{k}_ns"] for k in KINDS[1:]) / n / 1e6,
        }
        if st in per_response:  # only the final response's run is on the critical path
            row["critical_ms"] = (d["queue_ns"] + compute) / runs / 1e6
        else:
            row["critical_ms"] = row["queue_ms"] + row["compute_ms"]
        out["stages"][st] = row
        on_path += row["critical_ms"]
    if decoder in out["stages"]:
        dec = out["stages"][decoder]
        out["decoder_generation_ms"] = max(out["ensemble_ms"] - on_path, 0.0)
        dec["derived_generation_ms"] = out["decoder_generation_ms"]
    return out


def overhead(split: dict, *, client_latency_ms: float | None, encoder: str = "encoder",
             decoder: str = "decoder", feature_stage: str = "preprocess") -> dict:
    """What a request spends outside encoder and decoder compute, in ms, from one stage split:
    every stage's queue and compute, except the encoder's compute_infer and the decoder's generation, plus the
    transport (client latency minus the ensemble's request time) when the client latency is known.
    `without_features_ms` leaves out the preprocess stage's compute (audio decoding and log-mel)."""
    if not split:
        return {}
    st = split["stages"]
    parts = {}
    for name, row in st.items():
        if name == encoder:
            parts[name] = row["critical_ms"] - row["compute_infer_ms"]
        else:
            parts[name] = row["critical_ms"]  # the decoder's is its queue + execute(): handing the request over
    server = sum(parts.values())
    out = {"parts_ms": parts, "server_ms": server}
    if client_latency_ms is not None:
        out["transport_ms"] = max(client_latency_ms - split["ensemble_ms"], 0.0)
        out["total_ms"] = server + out["transport_ms"]
    feat = st.get(feature_stage, {}).get("compute_ms", 0.0)
    out["features_ms"] = feat
    out["without_features_ms"] = out.get("total_ms", server) - feat
    return out
