"""The main job on the embedded default model: synthetic tiny AF3 → build → tritonserver → one streamed gRPC
request with the bundled speech clip. The answer is meaningless (random weights); the pipeline is real."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from af3trt.runtime import assets


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="af3trt demo", description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("out/demo"), help="where the checkpoint and build go")
    ap.add_argument("--preset", default="tiny", choices=["tiny", "small"])
    ap.add_argument("--prompt", default="What is said in this audio?")
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="    %(message)s")

    from af3trt.build.build_engines import BuildOptions, build
    from af3trt.export.synth import write_checkpoint
    from af3trt.runtime.client.library import AF3Client
    from af3trt.runtime.serve.server import TritonServer

    out = args.out.resolve()
    ckpt = out / f"af3-{args.preset}-hf"
    if not (ckpt / "config.json").exists():
        print(f"== writing the synthetic {args.preset} AF3 checkpoint to {ckpt}", flush=True)
        write_checkpoint(ckpt, args.preset)
    build_dir = out / f"af3-{args.preset}-cpu"
    print(f"== building the CPU model repository in {build_dir}", flush=True)
    build(BuildOptions(hf_model=ckpt, out=build_dir, force=True))

    log = build_dir / "tritonserver.log"
    print("== starting tritonserver on 127.0.0.1", flush=True)
    with TritonServer(build_dir / "model_repository", log_path=log) as srv:
        print(f"   ready: gRPC {srv.grpc_url} (pid {srv.proc.pid})", flush=True)
        clip = assets.speech_path()
        print(f"== af3trt ask --audio {clip.name} {args.prompt!r} --stream", flush=True)
        n = 0
        for chunk in AF3Client(srv.grpc_url).stream(args.prompt, [clip.read_bytes()], max_tokens=args.max_tokens,
                                                    stream=True):
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
            n += len(chunk.token_ids)
        print(f"\n   ({n} tokens streamed; the synthetic model's words are random by design)")
    print(f"""
model repository: {build_dir / 'model_repository'}
manifest:         {build_dir / 'manifest.json'}
server log:       {log}
serve it again:   .venv/bin/af3trt serve --model-repository {build_dir / 'model_repository'}""")


if __name__ == "__main__":
    main()
