"""`af3trt gpu-check OUT [OUT …]`: GPU acceptance in one command, run inside the serving container on the GPU host.

    af3trt gpu-check /data/af3-bf16 /data/af3-fp8

For each build output (one precision each; engines built by `af3trt build --from-prepared`): refuse clearly what
cannot run (no GPU, engines not built, no golden answers, a decoder head size TensorRT-LLM has no kernels for),
start tritonserver on OUT/model_repository (127.0.0.1, free ports), send the golden prompts written at prepare time
(artifacts/goldens.json, export/goldens.py: transformers' greedy answers), compare token ids, and print one line per
case and a PASS/FAIL line per output with its agreement figures; first, one PASS/FAIL line for the GPU log-mel
features against the CPU reference (check_features). Nothing is built. Exit status 0 when every output
passes, 1 when one fails, 2 when one cannot be checked.

Then the serving exercises (exercise(): what the golden prompts do not touch), one PASS/FAIL line each: a thinking
request (when the build has think/), a stream (it joins to the whole answer, in fewer responses than tokens: the
decoder front coalesces), a stop (a stream closed after its first response; the cancel model's stop reaches the
tensorrtllm backend and is acknowledged), a 10-minute clip, and an encoder cache fill (more distinct 10-minute clips
than the encoder's cache_bytes holds, then the first again). `--no-exercises` skips them.

Pass rules (ours, judged: transformers' reference is not the engine's numerics): an unquantized decoder (bf16, fp16)
must reproduce the first few tokens of every answer exactly and agree on at least a share of all positions;
quantized decoders must agree on their first token and on at least a smaller share of positions (both per precision:
af3trt/registry.py DecoderPrecision exact_prefix, min_agreement); CPU-side predictions
(manifest validation.decoder_accuracy, fake quantization) are printed beside the measured figures when present.

Imports only what the container's Python has (tests/test_container_half.py runs this module there).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from af3trt.registry import DECODER_PRECISIONS

# TensorRT-LLM's generation attention (masked multi-head attention) kernels are instantiated for these head sizes
# only: NVIDIA/TensorRT-LLM cpp/tensorrt_llm/kernels/decoderMaskedMultiheadAttention/instantiation/
# decoderMaskedMultiheadAttention{32,48,64,80,96,104,112,128,144,160,192,224,256}_{float,half,bf16}.cu.
# An engine with another head size builds, and fails at its first generated token.
TRTLLM_HEAD_SIZES = (32, 48, 64, 80, 96, 104, 112, 128, 144, 160, 192, 224, 256)

# A precision's thresholds are its registry record's (exact_prefix, min_agreement); these are for a manifest naming
# one this af3trt does not know.
DEFAULT_PREFIX, DEFAULT_MIN_AGREEMENT = 1, 0.75


class GpuCheckError(RuntimeError):
    """This output cannot be checked (what to do is in the message)."""


@dataclass(frozen=True)
class Golden:
    name: str
    prompt: str
    audio: Path
    token_ids: list[int]
    thinking: bool = False  # sent with thinking=True (the server adds the suffix; docs/thinking.md)


@dataclass(frozen=True)
class Goldens:
    max_tokens: int
    reference: str
    cases: list[Golden]


@dataclass
class Agreement:
    name: str
    got: list[int]
    want: list[int]

    @property
    def prefix(self) -> int:
        """Length of the common prefix."""
        n = 0
        for a, b in zip(self.got, self.want):
            if a != b:
                break
            n += 1
        return n

    @property
    def positional(self) -> float:
        """Share of the reference's positions where the answer has the same token (1.0 for two empty answers)."""
        n = max(len(self.want), len(self.got))
        return 1.0 if n == 0 else sum(a == b for a, b in zip(self.got, self.want)) / n


@dataclass
class Verdict:
    precision: str
    cases: list[Agreement] = field(default_factory=list)

    @property
    def agreement(self) -> float:
        total = sum(max(len(c.want), len(c.got)) for c in self.cases)
        same = sum(sum(a == b for a, b in zip(c.got, c.want)) for c in self.cases)
        return 1.0 if total == 0 else same / total

    @property
    def thresholds(self) -> tuple[int, float]:
        """(leading tokens that must match exactly, share of positions that must agree) for this precision."""
        p = DECODER_PRECISIONS.get(self.precision)
        return (p.exact_prefix, p.min_agreement) if p else (DEFAULT_PREFIX, DEFAULT_MIN_AGREEMENT)

    @property
    def passed(self) -> bool:
        need, min_agreement = self.thresholds
        prefix_ok = all(c.prefix >= min(need, len(c.want)) for c in self.cases)
        return bool(self.cases) and prefix_ok and self.agreement >= min_agreement


def head_size(engine_config: dict) -> int:
    """The decoder's attention head size from an engine's (or checkpoint's) config.json."""
    p = engine_config.get("pretrained_config", engine_config)
    return int(p.get("head_size") or p["hidden_size"] // p["num_attention_heads"])


def read_goldens(artifacts: Path) -> Goldens:
    path = Path(artifacts) / "goldens.json"
    if not path.is_file():
        raise GpuCheckError(f"{path} does not exist: it is written by `af3trt build --target gpu` (export side, "
                            f"with transformers); prepare again without --no-goldens")
    doc = json.loads(path.read_text(encoding="utf-8"))
    if doc.get("af3trt_goldens") != 1 or not doc.get("cases"):
        raise GpuCheckError(f"{path} is not an af3trt goldens file (format 1 with cases)")
    cases = [Golden(c["name"], c["prompt"], Path(artifacts) / c["audio"], [int(t) for t in c["token_ids"]],
                    bool(c.get("thinking", False))) for c in doc["cases"]]
    for c in cases:
        if not c.audio.is_file():
            raise GpuCheckError(f"{path}: audio {c.audio} of case {c.name} is missing")
    return Goldens(int(doc["max_tokens"]), doc.get("reference", ""), cases)


def preflight(out: Path) -> dict:
    """Everything that can be refused without a server; returns {"precision", "goldens", "repository", "notes"}."""
    out = Path(out)
    problems = []
    manifest_path = out / "manifest.json"
    if not manifest_path.is_file():
        raise GpuCheckError(f"{out}: no manifest.json (not an af3trt build output)")
    m = json.loads(manifest_path.read_text(encoding="utf-8"))
    if m.get("target") != "gpu":
        raise GpuCheckError(f"{out} is a {m.get('target')!r} build: gpu-check takes GPU builds")
    repo, engine = out / "model_repository", out / "artifacts" / "engine"
    if not (repo / "encoder" / "1" / "model.plan").is_file() or not list(engine.glob("rank*.engine")):
        problems.append(f"the engines are not built (no {repo / 'encoder/1/model.plan'} or "
                        f"{engine}/rank*.engine): run `af3trt build --from-prepared {out}` in this container first")
    else:
        hs = head_size(json.loads((engine / "config.json").read_text(encoding="utf-8")))
        if hs not in TRTLLM_HEAD_SIZES:
            problems.append(f"the decoder's head size is {hs}; TensorRT-LLM has generation kernels for head sizes "
                            f"{TRTLLM_HEAD_SIZES[0]}…{TRTLLM_HEAD_SIZES[-1]} ({', '.join(map(str, TRTLLM_HEAD_SIZES))})"
                            f" only: for a synthetic check use `af3trt synth --preset tiny-gpu`")
    try:
        goldens = read_goldens(out / "artifacts")
    except GpuCheckError as e:
        problems.append(str(e))
    if problems:
        raise GpuCheckError(f"{out}: " + "; ".join(problems))
    predicted = (m.get("validation") or {}).get("decoder_accuracy") or {}
    return {"precision": m["gpu"]["options"]["precision"], "goldens": goldens, "repository": repo,
            "predicted_agreement": predicted.get("token_agreement")}


def check_repository(repo: Path, goldens: Goldens, precision: str, *, log_path: Path | None = None,
                     timeout: float = 600.0, exercises: bool = True) -> tuple[Verdict, list[Exercise]]:
    """Serve `repo` on loopback, send every golden prompt (greedy, the goldens' max_tokens), compare; then the serving
    exercises (exercise) unless told not to."""
    from af3trt.runtime.client.library import AF3Client
    from af3trt.runtime.serve.server import TritonServer

    verdict, done = Verdict(precision), []
    with TritonServer(Path(repo), log_path=log_path) as srv:
        client = AF3Client(srv.grpc_url, timeout=timeout)
        for c in goldens.cases:
            got = client.ask(c.prompt, [c.audio.read_bytes()], max_tokens=goldens.max_tokens,
                             thinking=c.thinking or None).token_ids
            verdict.cases.append(Agreement(c.name, got, c.token_ids))
        if exercises and goldens.cases:
            first = goldens.cases[0]
            done = exercise(client, srv.grpc_url, repo, thinking=any(c.thinking for c in goldens.cases),
                            prompt=first.prompt, audio=first.audio.read_bytes())
    return verdict, done


@dataclass
class Exercise:
    name: str
    passed: bool
    detail: str
    seconds: float = 0.0

    def line(self) -> str:
        return f"{'PASS' if self.passed else 'FAIL'} {self.name}: {self.detail} ({self.seconds:.1f} s)"


def ten_minute_clip(variant: int = 0) -> bytes:
    """A 10-minute WAV: the bundled speech tiled, one sample changed per variant (a new audio digest each)."""
    import io

    import numpy as np
    import soundfile as sf

    from af3trt.runtime import assets
    from af3trt.runtime.stages import lengths

    wave, rate = sf.read(assets.speech_path(), dtype="float32")
    n = int(lengths.MAX_WINDOWS * lengths.WINDOW_SECONDS * rate)
    tiled = np.resize(wave, n)
    tiled[variant % n] = 0.5 if tiled[variant % n] < 0 else -0.5
    buf = io.BytesIO()
    sf.write(buf, tiled, rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def exercise(client, grpc_url: str, repo: Path, *, thinking: bool, prompt: str, audio: bytes,
             max_tokens: int = 32) -> list[Exercise]:
    """The serving exercises against a served repository (module docstring): each an Exercise, an error a FAIL."""
    import time
    import uuid

    from af3trt.runtime.client.library import send_cancel
    from af3trt.triton_repo import configs

    out = []

    def run(name, fn):
        t0 = time.perf_counter()
        try:
            passed, detail = fn()
        except Exception as e:  # noqa: BLE001 - a failed exercise is a FAIL line, the others still run
            passed, detail = False, f"{type(e).__name__}: {e}"
        out.append(Exercise(name, passed, detail, time.perf_counter() - t0))

    def think():
        a = client.ask(prompt, [audio], max_tokens=max_tokens, thinking=True, stream=False)
        return bool(a.token_ids), f"{len(a.token_ids)} tokens"

    def stream():
        whole = client.ask(prompt, [audio], max_tokens=max_tokens, ignore_eos=True, stream=False)
        streamed = client.ask(prompt, [audio], max_tokens=max_tokens, ignore_eos=True, stream=True)
        same = streamed.token_ids == whole.token_ids
        return (same and len(whole.token_ids) == max_tokens and streamed.chunks < len(whole.token_ids),
                f"{len(streamed.token_ids)} tokens in {streamed.chunks} responses, equal to the whole answer: {same}")

    def stop():
        rid = f"gpu-check-{uuid.uuid4().hex}"
        chunks = client.stream(prompt, [audio], max_tokens=max_tokens * 16, ignore_eos=True, request_id=rid)
        first = next(iter(chunks))
        chunks.close()  # the client cancels its stream and sends the cancel model the id
        acknowledged = send_cancel(grpc_url, rid)  # again, now that it is closed: the backend acknowledges a stop
        after = client.ask(prompt, [audio], max_tokens=4, stream=False)
        return (acknowledged and bool(after.token_ids),
                f"first response {len(first.token_ids)} tokens, stop acknowledged: {acknowledged}, next request "
                f"answered: {bool(after.token_ids)}")

    def long_clip():
        t0 = time.perf_counter()
        chunks = list(client.stream(prompt, [ten_minute_clip()], max_tokens=4, stream=False))
        prompt_tokens = max(c.prompt_tokens for c in chunks)
        answered = any(c.token_ids for c in chunks)
        return (prompt_tokens >= 20 * 750 and answered,
                f"prompt {prompt_tokens} tokens, answered: {answered}, {time.perf_counter() - t0:.1f} s")

    def cache_fill():
        enc = configs.parse((Path(repo) / "encoder" / "config.pbtxt").read_text())
        fusion = configs.parse((Path(repo) / "fusion" / "config.pbtxt").read_text())
        budget = int(enc.parameters["cache_bytes"].string_value or 0)
        per_clip = 20 * 750 * int(fusion.parameters["hidden_size"].string_value) * 4
        clips = budget // per_clip + 2
        times = [client.ask(prompt, [ten_minute_clip(i + 1)], max_tokens=1, stream=False).latency_s
                 for i in range(clips)]
        again = client.ask(prompt, [ten_minute_clip(clips)], max_tokens=1, stream=False).latency_s
        return True, (f"{clips} distinct 10-min clips past cache_bytes {budget / 2**20:.0f} MiB answered "
                      f"({min(times):.1f}-{max(times):.1f} s each), the last again in {again:.1f} s")

    if thinking:
        run("thinking", think)
    for name, fn in (("stream", stream), ("stop", stop), ("10-minute clip", long_clip), ("cache fill", cache_fill)):
        run(name, fn)
    return out


def check_features(device: str = "cuda") -> tuple[bool, str]:
    """The preprocess model's device path (OpenAI Triton kernels, warmed first; torch if they fail) against the CPU
    reference on the bundled clip (kernels/check.py features_vs_cpu): (passed, report line)."""
    from af3trt.kernels.check import GPU_VS_CPU_TOL, features_vs_cpu
    from af3trt.runtime import assets

    r = features_vs_cpu(assets.speech_path().read_bytes(), device)
    path = "Triton kernels" if r["triton"] else f"torch path ({r['note'] or 'Triton cannot run there'})"
    return r["passed"], (f"{'PASS' if r['passed'] else 'FAIL'} features: log-mel on {device} with the {path} vs the "
                         f"CPU reference: max |diff| {r['max_abs']:.1e} (needs <= {GPU_VS_CPU_TOL:.0e})")


def report(out: Path, verdict: Verdict, predicted: float | None = None) -> str:
    lines = [f"  {c.name}: {c.positional:.0%} of positions agree, common prefix {c.prefix}/{len(c.want)}"
             f"\n    gpu       {c.got}\n    reference {c.want}" for c in verdict.cases]
    pred = "" if predicted is None else f" (CPU fake-quant prediction {predicted:.0%})"
    lines.append(f"{'PASS' if verdict.passed else 'FAIL'} {verdict.precision} {out}: {verdict.agreement:.1%} token "
                 f"agreement over {len(verdict.cases)} prompts{pred}; needs prefix {verdict.thresholds[0]} and >= "
                 f"{verdict.thresholds[1]:.0%}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="af3trt gpu-check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("outputs", nargs="+", type=Path, help="build outputs (engines built), one precision each")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for one answer")
    ap.add_argument("--no-exercises", dest="exercises", action="store_false",
                    help="only the golden prompts (no thinking/stream/stop/10-minute/cache-fill exercises)")
    args = ap.parse_args(argv)
    from af3trt.runtime.engines.gpus import detect_gpu

    refusals, checks = [], []
    for out in args.outputs:
        try:
            checks.append((out.resolve(), preflight(out.resolve())))
        except GpuCheckError as e:
            refusals.append(str(e))
    gpu = detect_gpu()
    if gpu is None:
        refusals.append("no NVIDIA GPU is visible (nvidia-smi found none): run gpu-check on the GPU host, inside "
                        "the container (docker run --gpus all …)")
    if refusals:
        for r in refusals:
            print(f"cannot check: {r}", file=sys.stderr)
        return 2
    ok, line = check_features()
    print(line, flush=True)
    failed = not ok
    for out, pre in checks:
        print(f"checking {out} ({pre['precision']}) on {gpu.name}: {len(pre['goldens'].cases)} golden prompts, "
              f"reference {pre['goldens'].reference}", flush=True)
        verdict, done = check_repository(pre["repository"], pre["goldens"], pre["precision"],
                                         log_path=out / "gpu-check.tritonserver.log", timeout=args.timeout,
                                         exercises=args.exercises)
        print(report(out, verdict, pre["predicted_agreement"]), flush=True)
        for e in done:
            print(e.line(), flush=True)
        failed |= not verdict.passed or not all(e.passed for e in done)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
