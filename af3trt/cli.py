"""`af3trt <command>`: one entry point for the pipeline's steps.

    af3trt synth  --preset tiny --out DIR          write a synthetic AF3 checkpoint
    af3trt build  --hf-model DIR --out OUT          checkpoint → Triton model repository (+ manifest)
    af3trt serve  --model-repository OUT/model_repository
    af3trt ask    --audio clip.wav "What is said?" [--stream] [--url 127.0.0.1:8001]
    af3trt demo   [--out out/demo]                  all of the above on the tiny model, end to end
    af3trt sizing --hf-model DIR                    GPU memory sizing table from the checkpoint config
    af3trt bench  …                                 perf_analyzer sweeps + baseline (perf/)
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "synth": "af3trt.export.synth",
    "build": "af3trt.build.build_engines",
    "serve": "af3trt.runtime.server",
    "ask": "af3trt.runtime.client",
    "demo": "af3trt.demo",
    "sizing": "af3trt.build.sizing",
    "bench": "af3trt.perf.bench",
}


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__)
        raise SystemExit(0 if argv and argv[0] in ("-h", "--help") else 2)
    module = importlib.import_module(COMMANDS[argv[0]])
    module.main(argv[1:])


if __name__ == "__main__":
    main()
