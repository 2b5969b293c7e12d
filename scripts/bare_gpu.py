"""What a bare machine with a GPU (torch and OpenAI Triton only: no TensorRT, no tritonserver, no network, little room
for files; the device tool's machines, /work/shared/docs/platform.md) can tell us, in one run of under 3 minutes:

    python3 scripts/bare_gpu.py --out OUT          # from the repository root; writes OUT/bare_gpu.json and .md

  1. kernels    af3trt.kernels on the device: the log-mel of 4 noise windows with the Triton epilogue and with the
                torch composition against the CPU reference (runtime/stages/audio.log_mel), and the prompt-table
                kernel against torch (kernels/check.py compare)
  2. bench      perf/kernels_bench.py: log-mel and table, GPU (torch, Triton) against the CPU path, 1/4/20 windows
  3. item 3     round 3's encoder cache under the stub's cap: the encoder stub's model.py (triton_repo/encoder_trt)
                with a torch stand-in for the TensorRT runner, capped as the build caps it
                (runtime/engines/gpus.py cap_cuda_memory: torch.cuda.set_per_process_memory_fraction), fed distinct
                10-minute requests of AF3's width (H = 3584): once with round 2's sizing (the cap without the cache,
                cache_bytes unset: 1 GiB; today's code then keeps requests alive by dropping cache copies, counted
                in failed_puts/clears, where round 2's code failed them) and once as the build renders it now
                (build/memory_plan.py); each in a process of its own (a cap is per process)
  4. dlpack     a bf16 prompt table [15000, 3584] on the device across DLPack (what fusion hands Triton): zero-copy,
                dtype and values kept
No af3trt installation is needed: the package is mapped from pyproject.toml's package-dir onto this checkout, and a
missing `soundfile` (no audio is decoded here) is stubbed. `--device cpu --quick` runs the same code on a CPU (the
kernels through TRITON_INTERPRET=1, the cap through tests/fakes/cuda_memory.py): tests/test_bare_gpu.py.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
AF3_WINDOWS = 20  # a 10-minute request


def importable() -> None:
    """`import af3trt` from this checkout without installing it; a stub `soundfile` where there is none."""
    try:
        import af3trt  # noqa: F401
    except ImportError:
        import tomllib

        dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
        shim = Path(tempfile.mkdtemp(prefix="af3trt-shim-")) / "af3trt"
        for package, folder in sorted(dirs.items(), key=lambda kv: kv[0].count(".")):
            target = shim.joinpath(*package.split(".")[1:])
            if package == "af3trt":
                shim.mkdir(parents=True)
                for f in (ROOT / folder).iterdir():
                    (shim / f.name).symlink_to(f)
            elif not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                target.symlink_to(ROOT / folder)
        sys.path.insert(0, str(shim.parent))
    try:
        import soundfile  # noqa: F401
    except ImportError:
        stub = types.ModuleType("soundfile")

        def absent(*a, **k):
            raise RuntimeError("soundfile is not installed on this machine (bare_gpu.py decodes no audio)")

        stub.read = stub.write = stub.info = absent
        stub.available_formats = lambda: {}
        sys.modules["soundfile"] = stub


# ---------------------------------------------------------------------------------------------- 1. kernels
def kernels(device: str, windows: int) -> dict:
    import numpy as np
    import torch

    from af3trt.kernels import check, logmel
    from af3trt.runtime.stages import audio, lengths

    dev = torch.device(device)
    rng = np.random.default_rng(0)
    chunks = [(0.1 * rng.standard_normal(lengths.WINDOW_SAMPLES)).astype(np.float32) for _ in range(windows)]
    ref, _ = audio.log_mel(chunks)  # CPU reference: features [W, 128, 3000]
    out = {"device": str(dev), "windows": windows, "triton_on_device": logmel.triton_runs_on(torch.empty(0, device=dev))}
    t0 = time.perf_counter()
    try:
        out["triton_vs_torch"] = check.compare(dev)  # compiles the kernels on first use
    except Exception as e:  # noqa: BLE001 - reported, the rest still runs
        out["triton_vs_torch"] = {"error": f"{type(e).__name__}: {e}"}
    out["compile_and_compare_s"] = time.perf_counter() - t0
    for name, use in (("triton", True), ("torch", False)):
        try:
            got = logmel.log_mel_windows(logmel.pad_windows(chunks, dev), use_triton=use).cpu().numpy()
            out[f"log_mel_{name}_vs_cpu_max_abs"] = float(np.abs(got - ref).max())
        except Exception as e:  # noqa: BLE001
            out[f"log_mel_{name}_vs_cpu_max_abs"] = f"{type(e).__name__}: {e}"
    out["tolerance"] = check.GPU_VS_CPU_TOL
    out["passed"] = all(isinstance(out[f"log_mel_{n}_vs_cpu_max_abs"], float)
                        and out[f"log_mel_{n}_vs_cpu_max_abs"] <= check.GPU_VS_CPU_TOL for n in ("triton", "torch"))
    return out


# ---------------------------------------------------------------------------------------------- 3. item 3
def af3_encoder_stub(cache: bool) -> dict:
    """The encoder stub's cap and cache_bytes for AF3's default GPU build: as the build renders them now (cache True),
    or as before round 3 (the cap without the audio cache or the TensorRT activations; cache_bytes unset)."""
    from af3trt.build.memory_plan import STUB_FLOOR_BYTES, default_plan
    from af3trt.runtime.stages import audio_cache, lengths
    from af3trt.build.sizing import dims_from_config

    config = json.loads((ROOT / "af3trt" / "reference" / "config.json").read_text())
    plan = default_plan(config)
    if cache:
        return {"cap_bytes": plan.stub_caps["encoder"], "cache_bytes": plan.encoder_cache,
                "activation_bytes": plan.encoder_activations, "encoder_windows": plan.encoder_windows}
    d, _ = dims_from_config(config)
    old_cap = max(STUB_FLOOR_BYTES, 2 * plan.encoder_windows * lengths.EMBEDS_PER_WINDOW * d.hidden * 4)
    return {"cap_bytes": old_cap, "cache_bytes": audio_cache.DEFAULT_ENCODER_BYTES, "activation_bytes": 0,
            "encoder_windows": plan.encoder_windows}


def item3(device: str, requests: int, cache: bool, windows: int = AF3_WINDOWS, hidden: int | None = None) -> dict:
    """Distinct 10-minute requests through triton_repo/encoder_trt/model.py under the stub's cap (see the docstring)."""
    import numpy as np
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from fakes import pb_utils as fake_pb  # Triton's python-backend utils, enough for a model.py
    from af3trt.runtime.engines import trt_runner
    from af3trt.runtime.stages import audio_cache, lengths
    from af3trt.triton_repo import configs

    stub = af3_encoder_stub(cache)
    config = json.loads((ROOT / "af3trt" / "reference" / "config.json").read_text())
    hidden = hidden or config["text_config"]["hidden_size"]
    dev = torch.device(device)

    class Place:
        def __init__(self, device_id):
            self.device = dev

        def handle(self):
            return 0

        def after_inputs(self):
            pass

        def finish(self):
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)

    class StandInRunner:
        """The TensorRT runner's interface: rows [W, 750, H] f32 on the device; its activation buffer allocated
        under the cap as trt_runner.SharedActivations does (the plan's figure: no engine here)."""

        def __init__(self, *a, **k):
            self.place = Place(0)
            self.activations = trt_runner.SharedActivations(dev)
            self.activations.buffer = torch.empty(max(1, stub["activation_bytes"]), dtype=torch.uint8, device=dev)

        @classmethod
        def load(cls, *a, **k):
            return cls()

        def run(self, feeds):
            f = feeds["input_features"]
            return {"audio_embeds": torch.zeros((f.shape[0], f.shape[2] // 4, hidden), dtype=torch.float32, device=dev)}

    trt_runner.TrtRunner = StandInRunner
    spec = configs.RepoSpec(target="gpu", hidden_size=hidden, decoder_dtype="bfloat16", vocab_size=1000, end_id=1,
                            pad_id=0, encoder_max_batch=stub["encoder_windows"], prompt_table_extra_ids=True,
                            encoder_params={"cuda_memory_cap_bytes": int(stub["cap_bytes"]),  # typed: EncoderParams
                                            **({"cache_bytes": int(stub["cache_bytes"])} if cache else {})})
    result = {"as": "the plan's cap and cache_bytes" if cache else "round 2's cap, cache_bytes unset (1 GiB)",
              "device": str(dev), **stub, "requests": []}
    fake = None
    if dev.type != "cuda":  # no CUDA allocator to cap here: the stand-in refuses past the same cap
        from fakes.cuda_memory import FakeCudaMemory

        fake = FakeCudaMemory(stub["cap_bytes"])
        fake.__enter__()
    try:
        mod = fake_pb.import_model("encoder_trt")
        model = mod.TritonPythonModel()
        from google.protobuf import json_format

        model.initialize({"model_config": json.dumps(json_format.MessageToDict(configs.encoder_config(spec),
                                                                               preserving_proto_field_name=True)),
                          "model_name": "encoder", "model_repository": "/nonexistent/encoder", "model_version": "1",
                          "model_instance_device_id": "0"})
        features = torch.zeros((windows, lengths.N_MELS, lengths.WINDOW_FRAMES), device=dev)
        mask = torch.ones((windows, lengths.WINDOW_FRAMES), dtype=torch.int32, device=dev)
        for i in range(requests):
            r = fake_pb.Request({"audio_digest": audio_cache.window_keys(i.to_bytes(16, "little"), windows)}, f"r{i}")
            r.inputs["input_features"] = fake_pb.Tensor.from_dlpack("input_features", torch.utils.dlpack.to_dlpack(features))
            r.inputs["input_features_mask"] = fake_pb.Tensor.from_dlpack("input_features_mask",
                                                                        torch.utils.dlpack.to_dlpack(mask))
            (resp,) = model.execute([r])
            row = {"request": i, "ok": not resp.has_error(), "cache_bytes_held": model.cache.bytes,
                   "cache_entries": len(model.cache)}
            if resp.has_error():
                row["error"] = resp.error.message()[:300]
            if dev.type == "cuda":
                row["max_reserved"] = torch.cuda.max_memory_reserved(dev)
            result["requests"].append(row)
            del resp
        result["cache_stats"] = dict(model.cache.stats)
        result["all_ok"] = all(r["ok"] for r in result["requests"])
        if fake is not None:
            result["peak"] = fake.peak
    finally:
        if fake is not None:
            fake.__exit__(None, None, None)
    return result


# ---------------------------------------------------------------------------------------------- 4. dlpack
def dlpack(device: str, rows: int, hidden: int) -> dict:
    import torch
    from torch.utils.dlpack import to_dlpack

    from af3trt.kernels import table

    dev = torch.device(device)
    embeds = torch.randn((rows // 750 + 1, 750, hidden), device=dev)
    lens = [750] * (rows // 750) + [rows % 750]
    t = table.prompt_table(embeds, lens, torch.bfloat16)  # the fusion kernel's output (Triton where it runs)
    back = torch.from_dlpack(to_dlpack(t))  # [1, N, H], as fusion hands it to Triton
    ref = torch.cat([embeds[i, :n] for i, n in enumerate(lens)]).to(torch.bfloat16)  # [N, H]
    return {"rows": int(back.shape[1]), "hidden": hidden, "dtype": str(back.dtype), "device": str(back.device),
            "zero_copy": back.data_ptr() == t.data_ptr(), "equal_to_torch_gather": bool(torch.equal(back[0], ref)),
            "bytes": back.numel() * back.element_size()}


# ---------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="small sizes (a CPU run of the same code)")
    ap.add_argument("--part", help=argparse.SUPPRESS)  # item3-before | item3-now: one capped process
    args = ap.parse_args(argv)
    importable()
    quick = args.quick
    if args.part:
        r = item3(args.device, requests=3 if quick else 6, cache=args.part == "item3-now")
        print(json.dumps(r))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    res = {"started_unix": int(t0), "quick": quick}
    import torch

    res["torch"], res["cuda"] = torch.__version__, torch.cuda.is_available()
    if res["cuda"] and args.device.startswith("cuda"):
        res["gpu"] = torch.cuda.get_device_name()
    try:
        import triton

        res["triton"] = triton.__version__
    except ImportError:
        res["triton"] = None
    res["kernels"] = kernels(args.device, 1 if quick else 4)
    from af3trt.perf import kernels_bench

    res["bench"] = kernels_bench.run([1] if quick else [1, 4, 20], 64 if quick else 3584, 2 if quick else 10)
    for part in ("item3-before", "item3-now"):
        p = subprocess.run([sys.executable, __file__, "--out", str(args.out), "--device", args.device, "--part", part,
                            *(["--quick"] if quick else [])], capture_output=True, text=True, timeout=600,
                           env={**os.environ})
        try:
            res[part] = json.loads(p.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            res[part] = {"error": f"exit {p.returncode}: {p.stderr[-1500:]}"}
    res["dlpack"] = dlpack(args.device, 1500 if quick else 15000, 64 if quick else 3584)
    res["wall_s"] = time.perf_counter() - t0
    (args.out / "bare_gpu.json").write_text(json.dumps(res, indent=1, default=str))
    (args.out / "bare_gpu.md").write_text(render(res))
    print(render(res))
    return 0


def render(res: dict) -> str:
    from af3trt.perf.kernels_bench import render as bench

    k = res["kernels"]
    lines = [f"# bare_gpu.py: {res.get('gpu') or k['device']}, torch {res['torch']}, triton {res['triton']}, "
             f"{res['wall_s']:.0f} s{' (quick)' if res['quick'] else ''}", "",
             f"kernels: log-mel vs the CPU reference, Triton {k['log_mel_triton_vs_cpu_max_abs']}, torch "
             f"{k['log_mel_torch_vs_cpu_max_abs']} (tolerance {k['tolerance']}); Triton vs torch {k['triton_vs_torch']}; "
             f"{'PASS' if k['passed'] else 'FAIL'}", "", bench(res["bench"]), ""]
    for part in ("item3-before", "item3-now"):
        r = res[part]
        if "error" in r:
            lines.append(f"{part}: could not run: {r['error']}")
            continue
        oks = "".join("." if q["ok"] else "X" for q in r["requests"])
        lines.append(f"{part} ({r['as']}): cap {r['cap_bytes'] / 2**30:.2f} GiB, cache_bytes {r['cache_bytes'] / 2**30:.2f} "
                     f"GiB; requests {oks}; cache {r['cache_stats']}"
                     + (f"; first error: {next(q['error'] for q in r['requests'] if not q['ok'])}"
                        if not r["all_ok"] else ""))
    d = res["dlpack"]
    lines += ["", f"dlpack: [{d['rows']}, {d['hidden']}] {d['dtype']} on {d['device']}: zero-copy {d['zero_copy']}, "
                  f"equal to torch's gather {d['equal_to_torch_gather']}"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
