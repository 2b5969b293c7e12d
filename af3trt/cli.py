"""`af3trt <command>`: one entry point for the pipeline's steps.

    af3trt synth  --preset tiny --out DIR          write a synthetic AF3 checkpoint
    af3trt build  --hf-model DIR --out OUT          checkpoint → Triton model repository (+ manifest)
    af3trt serve  --model-repository OUT/model_repository
    af3trt ask    --audio clip.wav "What is said?" [--stream] [--url 127.0.0.1:8001]
    af3trt openai --triton 127.0.0.1:8001 [--port 9000]   OpenAI-compatible HTTP API in front of the ensemble
    af3trt listen FILE [--question "…"] [--vad]     stream a file to WS /v1/realtime at real-time speed
    af3trt demo   [--out out/demo]                  all of the above on the tiny model, end to end
    af3trt sizing --hf-model DIR                    GPU memory sizing table from the checkpoint config
    af3trt gpu-check OUT [OUT …]                    GPU acceptance in the container: serve, compare with goldens
    af3trt doctor [--repository DIR]                can this machine serve it? (GPU, backends, stub, versions)
    af3trt probe  [--url 127.0.0.1:8001]            liveness: one token of a cached clip through the ensemble, in time
    af3trt bench  …                                 perf_analyzer sweeps + baseline (perf/)
    af3trt bench --serving-path                     CPU per request and per streamed token, model cost taken out
    af3trt replicas --model-repository DIR --replicas 2   N tritonservers behind HAProxy on loopback
    af3trt k8s overlay|overlays|init                Kubernetes overlays sized by our sizing code (deploy/)
    af3trt soak   --minutes 10 --concurrency 16 …  steady load: errors, latency, RSS of every server process
    af3trt fuzz   --model-repository DIR --minutes 10   the OpenAI front fuzzed from its OpenAPI schema
    af3trt batch  IN.jsonl OUT.jsonl --url …|--model-repository …   OpenAI batch file, progress bar, resumable
    af3trt score  OUT.jsonl --key KEY.json          MMAU/MMAR-style multiple-choice accuracy, overall and per category

  single steps of the build:
    af3trt export-encoder   encoder + projector → validated ONNX (optionally INT8 dynamic)
    af3trt encoder-variant  that ONNX → fp16/bf16 cast or INT8/FP8 Q/DQ for a TensorRT engine
    af3trt extract-lm       AF3 → standalone Qwen2ForCausalLM checkpoint
    af3trt quantize         Qwen2 → TensorRT-LLM 1.2 checkpoint (bf16 … int4_awq), validated
    af3trt check-checkpoint validate a TensorRT-LLM checkpoint against the 1.2 format
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "synth": "af3trt.export.synth",
    "build": "af3trt.build.build_engines",
    "serve": "af3trt.runtime.serve.server",
    "ask": "af3trt.runtime.client.ask",
    "openai": "af3trt.runtime.openai.app",
    "listen": "af3trt.runtime.client.listen",
    "demo": "af3trt.demo",
    "sizing": "af3trt.build.memory_plan",
    "gpu-check": "af3trt.build.gpu_check",
    "doctor": "af3trt.runtime.serve.doctor",
    "probe": "af3trt.runtime.serve.liveness",
    "bench": "af3trt.perf.bench",
    "replicas": "af3trt.runtime.serve.replicas",
    "k8s": "af3trt.build.k8s",
    "soak": "af3trt.perf.soak",
    "fuzz": "af3trt.perf.fuzz",
    "batch": "af3trt.runtime.batch",
    "score": "af3trt.perf.score",
    "export-encoder": "af3trt.export.onnx_export",
    "encoder-variant": "af3trt.export.onnx_quant",
    "extract-lm": "af3trt.export.extract_lm",
    "quantize": "af3trt.export.quantize",
    "check-checkpoint": "af3trt.export.trtllm_checkpoint",
}


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__)
        raise SystemExit(0 if argv and argv[0] in ("-h", "--help") else 2)
    name = COMMANDS[argv[0]]
    if argv[0] == "bench" and "--serving-path" in argv:  # the serving path alone (stand-ins for encoder, decoder)
        name = "af3trt.perf.serving_path"
    module = importlib.import_module(name)
    raise SystemExit(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    main()
