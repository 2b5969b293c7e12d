"""Stands in for TensorRT-LLM 1.2's `trtllm-build` in the GPU-build tests: parses the flags, records its argv and
writes an engine directory as the real builder lays it out, with the `build_config.plugin_config` the real builder
would write for this checkpoint's quantization.

What it reproduces, and where it comes from (NVIDIA/TensorRT-LLM, 1.x line as stored in the search index, not
pinned to the v1.2.1 tag; re-read before relying on a detail):
- tensorrt_llm/builder.py `build()`: deep-copies the build config, then
    context_fmha off                    -> use_fp8_context_fmha and use_paged_context_fmha off;
    quant_algo not FP8/W4A8_AWQ/NVFP4   -> use_fp8_context_fmha off; with an FP8 KV cache also paged context off
                                           ("FP8 Paged Context FMHA is disabled because FP8 context FMHA is
                                           disabled.");
    SM < 89                             -> the same two switches off;
    paged context FMHA on               -> use_fp8_context_fmha follows the FP8 KV cache (on with it, off without);
    INT8 KV cache                       -> use_paged_context_fmha off ("Paged Context FMHA is disabled because it
                                           doesn't work with int8 kv cache currently.");
  and `Engine.save` writes config.json = EngineConfig(pretrained_config, that modified build_config, version)
  .to_dict(): {"version", "pretrained_config", "build_config": {..., "plugin_config": {...}}}, one
  rank{r}.engine per rank of the checkpoint's mapping.
- tensorrt_llm/plugin/plugin.py PluginConfig: field names as serialized (use_paged_context_fmha,
  use_fp8_context_fmha, context_fmha, paged_kv_cache, tokens_per_block, remove_input_padding, gemm_plugin, ...);
  "enable"/"disable" map to True/False, a plugin "disable" to None, "auto" resolves to the model dtype.
- `trtllm-build --help`: argparse's help (tensorrt_llm/commands/build.py parse_arguments is argparse) for the options
  our command line uses, with the choices of the version as indexed: plugin dtypes from plugin.py
  PLUGIN_DTYPE_OPTIONS_MAP / DEFAULT_PLUGIN_DTYPE_OPTIONS (gemm_plugin "auto", "float16", "float32", "bfloat16",
  "int32", "fp8", "nvfp4", None offered as "disable"; other plugins without fp8/nvfp4), features enable/disable,
  kv_cache_type continuous/paged/disabled, logits_dtype float16/float32. $FAKE_TRTLLM_GEMM_CHOICES (comma list)
  replaces gemm_plugin's choices, to play another version (0.x plugin.py: float16, float32, bfloat16, disable).
- LoRA (tensorrt_llm/commands/build.py --lora_plugin, --lora_target_modules (nargs +), --max_lora_rank;
  tensorrt_llm/lora_manager.py LoraConfig, serialized in build_config.lora_config): plugin_config.lora_plugin is the
  plugin dtype ("auto" resolves to the model dtype), build_config.lora_config {lora_target_modules, max_lora_rank}.
The SM of the build GPU comes from $FAKE_TRTLLM_SM (default 90, an H100). `install(bin_dir, python)` writes it as
an executable `trtllm-build` that `python` runs (the GPU-build tests put bin_dir first on PATH).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

FP8_WORKFLOW = ("FP8", "W4A8_AWQ", "NVFP4")


def _flag(value: str | None, default: bool) -> bool:
    return default if value is None else value == "enable"


def plugin_config(opt: dict, quant: dict, dtype: str, sm: int) -> dict:
    """The plugin_config builder.py leaves after its FMHA rules, for the flags `opt` and a checkpoint's quantization."""
    context_fmha = _flag(opt.get("context_fmha"), True)
    paged = _flag(opt.get("use_paged_context_fmha"), True)
    fp8_ctx = _flag(opt.get("use_fp8_context_fmha"), True)
    fp8_kv, int8_kv = quant.get("kv_cache_quant_algo") == "FP8", quant.get("kv_cache_quant_algo") == "INT8"
    if not context_fmha:
        fp8_ctx = paged = False
    elif quant.get("quant_algo") not in FP8_WORKFLOW or sm < 89:
        fp8_ctx = False
        if paged and fp8_kv:
            paged = False
    elif paged:
        fp8_ctx = fp8_kv
    if paged and int8_kv:
        paged = False

    def plugin(name, default="auto"):
        v = opt.get(name, default)
        return None if v == "disable" else dtype if v == "auto" else v

    return {"dtype": dtype, "gpt_attention_plugin": plugin("gpt_attention_plugin"), "gemm_plugin": plugin("gemm_plugin"),
            "context_fmha": context_fmha, "use_paged_context_fmha": paged, "use_fp8_context_fmha": fp8_ctx,
            "paged_kv_cache": opt.get("kv_cache_type", "paged") == "paged",
            "tokens_per_block": int(opt.get("tokens_per_block", 32)),
            "remove_input_padding": _flag(opt.get("remove_input_padding"), True),
            "multiple_profiles": _flag(opt.get("multiple_profiles"), False),
            "lora_plugin": plugin("lora_plugin", "disable")}


EXECUTABLE = """#!{python}
import sys
sys.path.insert(0, {tests!r})
from fakes import trtllm_build
sys.exit(trtllm_build.main(sys.argv[1:]))
"""


def install(bin_dir: Path, python: str) -> Path:
    """`bin_dir`/trtllm-build, run by `python` (which must be able to import this package's numpy-free modules)."""
    exe = Path(bin_dir) / "trtllm-build"
    exe.write_text(EXECUTABLE.format(python=python, tests=str(Path(__file__).resolve().parent.parent)))
    exe.chmod(0o755)
    return exe


def help_text() -> str:
    import argparse

    ap = argparse.ArgumentParser(prog="trtllm-build")
    for name in ("checkpoint_dir", "output_dir", "input_timing_cache", "output_timing_cache"):
        ap.add_argument(f"--{name}", type=str)
    for name in ("max_batch_size", "max_input_len", "max_seq_len", "max_num_tokens", "max_beam_width",
                 "max_prompt_embedding_table_size", "tokens_per_block", "workers"):
        ap.add_argument(f"--{name}", type=int)
    ap.add_argument("--kv_cache_type", choices=["continuous", "paged", "disabled"])
    ap.add_argument("--logits_dtype", choices=["float16", "float32"])
    ap.add_argument("--lora_plugin", choices=["auto", "float16", "float32", "bfloat16", "int32", "disable"])
    ap.add_argument("--lora_target_modules", nargs="+")
    ap.add_argument("--max_lora_rank", type=int)
    ap.add_argument("--log_level", choices=["internal_error", "error", "warning", "info", "verbose", "debug", "trace"])
    gemm = os.environ.get("FAKE_TRTLLM_GEMM_CHOICES")
    ap.add_argument("--gemm_plugin", choices=gemm.split(",") if gemm else
                    ["auto", "float16", "float32", "bfloat16", "int32", "fp8", "nvfp4", "disable"])
    ap.add_argument("--gpt_attention_plugin", choices=["auto", "float16", "float32", "bfloat16", "int32", "disable"])
    for name in ("remove_input_padding", "context_fmha", "use_paged_context_fmha", "use_fp8_context_fmha",
                 "multiple_profiles"):
        ap.add_argument(f"--{name}", choices=["enable", "disable"])
    return ap.format_help()


def main(args: list[str]) -> int:
    if args == ["--help"]:
        print(help_text())
        return 0
    opt = {args[i][2:]: args[i + 1] for i in range(len(args) - 1) if args[i].startswith("--")}
    ckpt = json.loads((Path(opt["checkpoint_dir"]) / "config.json").read_text())
    out = Path(opt["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "argv.json").write_text(json.dumps(args))
    build = {k: int(opt[k]) for k in ("max_batch_size", "max_input_len", "max_seq_len", "max_num_tokens",
                                      "max_beam_width", "max_prompt_embedding_table_size")}
    build["kv_cache_type"] = opt.get("kv_cache_type", "paged").upper()
    build["plugin_config"] = plugin_config(opt, ckpt.get("quantization") or {}, ckpt["dtype"],
                                           int(os.environ.get("FAKE_TRTLLM_SM", "90")))
    # tensorrt_llm/commands/build.py build_model: `model_config.logits_dtype = logits_dtype`, the config the engine's
    # config.json saves as pretrained_config
    if "logits_dtype" in opt:
        ckpt = {**ckpt, "logits_dtype": opt["logits_dtype"]}
    if "--lora_target_modules" in args:  # nargs="+": the values up to the next flag
        i = args.index("--lora_target_modules") + 1
        modules = []
        while i < len(args) and not args[i].startswith("--"):
            modules.append(args[i])
            i += 1
        build["lora_config"] = {"lora_target_modules": modules, "max_lora_rank": int(opt.get("max_lora_rank", 64))}
    (out / "config.json").write_text(json.dumps({"version": "1.2.1", "pretrained_config": ckpt,
                                                 "build_config": build}))
    for rank in range((ckpt.get("mapping") or {}).get("world_size", 1)):
        (out / f"rank{rank}.engine").write_bytes(b"ENGINE")
    print("[TRT-LLM] Total time of building all engines: 00:00:01")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
