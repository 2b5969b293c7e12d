"""Build the decoder engine with TensorRT-LLM 1.2's `trtllm-build`, and estimate the accuracy cost first, on CPU.

Every trtllm-build flag is derived from the serving limits, the precision and AF3's audio arithmetic:

    audio tokens / request     af3trt.runtime.stages.lengths for max_audio_seconds (750 per 30-s window, 15,000 for 10 min)
    --max_input_len            text budget + audio tokens
    --max_seq_len              max_input_len + max_output_len
    --max_num_tokens           one full prompt + one decode token per other request (capped at 16,384, above which
                               TensorRT-LLM warns of tensor-volume overflow; chunked context then covers the rest)
    --max_prompt_embedding_table_size   max_batch_size x audio tokens per request
    --gemm_plugin              auto (= engine dtype) for bf16/fp16/int8/int4; for FP8 `fp8` at batch <= 4, else
                               disabled (TensorRT-LLM's tuning guide: the FP8 GEMM plugin helps only small batches)
    --use_paged_context_fmha   enable, except with an INT8 KV cache or an FP8 KV cache under non-FP8 weights, where
                               the 1.2 builder turns it off anyway (so no KV-cache reuse / chunked context there)
    --use_fp8_context_fmha     enable for FP8 weights with an FP8 KV cache (the builder drops it otherwise)

Only flags that exist in 1.2's tensorrt_llm/commands/build.py and plugin.py are emitted (`--paged_kv_cache` is
deprecated there, `--auto_parallel` and `--enable_xqa` are gone; strongly typed is always on).

The accuracy report runs the decoder on CPU with modelopt's fake quantization (the quantized torch model simulates
the kernels' rounding) against the unquantized model in its own dtype, teacher-forced on a fixed prompt set.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import subprocess
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

from af3trt.registry import KV_CACHE_QUANT_ALGO, check_precision, check_precision_names, text_config
from af3trt.build.plan import ServingConfig

log = logging.getLogger(__name__)

MAX_NUM_TOKENS_CAP = 16384  # tensorrt_llm/_common.py check_max_num_tokens warns above this
FP8_GEMM_PLUGIN_MAX_BATCH = 4


class TrtllmBuildError(RuntimeError):
    """trtllm-build is missing or failed; the message carries the end of its log."""


@dataclass
class TrtllmBuildPlan:
    args: list[str]
    derived: dict
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def _check_against_checkpoint(ckpt_dir: Path, precision: str, kv_cache: str, tp_size: int) -> dict | None:
    """The checkpoint config when it exists; its quantization and mapping must be those asked for."""
    path = Path(ckpt_dir) / "config.json"
    if not path.exists():
        return None
    config = json.loads(path.read_text())
    quant = config.get("quantization") or {}
    found = (quant.get("quant_algo"), quant.get("kv_cache_quant_algo"), (config.get("mapping") or {}).get("tp_size"))
    p = check_precision_names(precision, kv_cache)
    wanted = (p.quant_algo, KV_CACHE_QUANT_ALGO[kv_cache], tp_size)
    if found != wanted:
        raise ValueError(f"{ckpt_dir} holds quant_algo/kv_cache_quant_algo/tp {found}, but the build asks for "
                         f"{precision}/{kv_cache}/tp {tp_size} = {wanted}")
    if p.dtype and config.get("dtype") != p.dtype:
        raise ValueError(f"{ckpt_dir} is {config.get('dtype')}, but the build asks for {precision}")
    return config


def plan_trtllm_build(ckpt_dir: Path, engine_dir: Path, limits: ServingConfig, precision: str,
                      kv_cache: str = "auto", audio_tokens_per_request: int | None = None, *,
                      timing_cache: Path | None = None, gpu=None, log_level: str = "info") -> TrtllmBuildPlan:
    """The trtllm-build command line for these limits, with the numbers behind it and the builder's caveats.

    gpu: the target (af3trt.runtime.engines.gpus.target_gpu); precisions it cannot run raise PrecisionError.
    When ckpt_dir already holds a checkpoint, its quantization, dtype and tp size must be the ones asked for.
    """
    p = check_precision_names(precision, kv_cache)
    notes = check_precision(precision, kv_cache, gpu)  # raises when the GPU cannot run it; a note when no GPU
    config = _check_against_checkpoint(ckpt_dir, precision, kv_cache, limits.tp_size)
    audio = audio_tokens_per_request if audio_tokens_per_request is not None else limits.audio_tokens_per_request
    if audio < 1:
        raise ValueError(f"audio_tokens_per_request must be positive, got {audio}")

    max_input_len = limits.max_text_len + audio
    max_seq_len = max_input_len + limits.max_output_len
    if config and config.get("max_position_embeddings") and max_seq_len > config["max_position_embeddings"]:
        raise ValueError(f"max_seq_len {max_seq_len} exceeds the model's max_position_embeddings "
                         f"{config['max_position_embeddings']}")
    if limits.max_num_tokens is not None:
        max_num_tokens = limits.max_num_tokens
    else:
        max_num_tokens = min(max_input_len + limits.max_batch_size - 1, MAX_NUM_TOKENS_CAP)
    max_num_tokens = min(max_num_tokens, limits.max_batch_size * max_seq_len)
    chunked_context = max_num_tokens < max_input_len

    fp8_weights, fp8_kv, int8_kv = p.fp8_workflow, kv_cache == "fp8", kv_cache == "int8"
    # builder.py (1.2): paged context FMHA is switched off with an INT8 KV cache, and with an FP8 KV cache unless
    # the weights are FP8 too; FP8 context FMHA needs FP8 weights and, with paged context FMHA, an FP8 KV cache.
    paged_context_fmha = not int8_kv and not (fp8_kv and not fp8_weights)
    fp8_context_fmha = fp8_weights and fp8_kv
    if fp8_weights:
        gemm_plugin = "fp8" if limits.max_batch_size <= FP8_GEMM_PLUGIN_MAX_BATCH else "disable"
    else:
        gemm_plugin = "auto"
    if chunked_context and not paged_context_fmha:
        raise ValueError(f"max_num_tokens {max_num_tokens} < max_input_len {max_input_len} needs chunked context, "
                         f"which needs paged context FMHA; TensorRT-LLM 1.2 disables that with a {kv_cache} KV cache "
                         f"under {precision} weights. Lower max_audio_seconds / max_text_len or change the "
                         f"KV cache.")
    if not paged_context_fmha:
        notes.append(f"paged context FMHA is off for {precision} weights with a {kv_cache} KV cache (TensorRT-LLM "
                     f"1.2 builder): no KV-cache reuse and no chunked context with this engine")
    if chunked_context:
        notes.append(f"max_num_tokens {max_num_tokens} < max_input_len {max_input_len}: serve with "
                     f"enable_chunked_context")
    if fp8_weights and gemm_plugin == "disable":
        notes.append("FP8 GEMMs without the GEMM plugin (TensorRT's own FP8 kernels), as TensorRT-LLM recommends "
                     "above batch 4")

    engine_dir = Path(engine_dir)
    timing_cache = Path(timing_cache) if timing_cache else engine_dir.parent / "trtllm.timing.cache"
    table = limits.max_batch_size * audio
    args = [
        "--checkpoint_dir", str(ckpt_dir),
        "--output_dir", str(engine_dir),
        "--max_batch_size", str(limits.max_batch_size),
        "--max_input_len", str(max_input_len),
        "--max_seq_len", str(max_seq_len),
        "--max_num_tokens", str(max_num_tokens),
        "--max_beam_width", str(limits.max_beam_width),
        "--max_prompt_embedding_table_size", str(table),
        "--kv_cache_type", "paged",
        "--tokens_per_block", str(limits.tokens_per_block),
        "--remove_input_padding", "enable",
        "--gpt_attention_plugin", "auto",
        "--gemm_plugin", gemm_plugin,
        "--context_fmha", "enable",
        "--use_paged_context_fmha", "enable" if paged_context_fmha else "disable",
        "--use_fp8_context_fmha", "enable" if fp8_context_fmha else "disable",
        "--multiple_profiles", "enable" if limits.multiple_profiles else "disable",
        "--logits_dtype", "float32",  # greedy argmax over 151k logits: no fp16 ties
        "--workers", str(limits.tp_size),
        "--input_timing_cache", str(timing_cache),
        "--output_timing_cache", str(timing_cache),
        "--log_level", log_level,
    ]
    derived = {
        "precision": precision, "kv_cache": kv_cache, "limits": asdict(limits),
        "audio_tokens_per_request": audio, "max_input_len": max_input_len, "max_seq_len": max_seq_len,
        "max_num_tokens": max_num_tokens, "max_prompt_embedding_table_size": table, "gemm_plugin": gemm_plugin,
        "use_paged_context_fmha": paged_context_fmha, "use_fp8_context_fmha": fp8_context_fmha,
        "enable_chunked_context": chunked_context, "kv_cache_reuse_possible": paged_context_fmha,
        "timing_cache": str(timing_cache),
    }
    return TrtllmBuildPlan(args=args, derived=derived, notes=notes)


def trtllm_build_args(ckpt_dir: Path, engine_dir: Path, limits: ServingConfig, precision: str,
                      kv_cache: str = "auto", audio_tokens_per_request: int | None = None, **kwargs) -> list[str]:
    """The trtllm-build arguments (without the executable) for these limits; see plan_trtllm_build."""
    return plan_trtllm_build(ckpt_dir, engine_dir, limits, precision, kv_cache, audio_tokens_per_request,
                             **kwargs).args


# ---------------------------------------------------------------------------------------------- running it

_MILESTONES = re.compile(r"(Total time|Build phase|Engine generation completed|Serializ|Timing cache|"
                         r"Loading|\[E\]|error|Error|Traceback|Set dtype|max_seq_len|max_num_tokens)")


def help_options(help_text: str) -> dict[str, set[str] | None]:
    """The options an argparse `--help` text offers: {"--name": its choices, or None when it takes any value}.
    argparse prints an option with choices as `--name {a,b,c}` (usage and option list alike); trtllm-build's
    parser is argparse (TensorRT-LLM tensorrt_llm/commands/build.py parse_arguments; plugin options from
    tensorrt_llm/plugin/plugin.py add_plugin_argument)."""
    out: dict[str, set[str] | None] = {}
    for m in re.finditer(r"(?<![\w-])(--[A-Za-z0-9][A-Za-z0-9_-]*)(?:[ =]\{([^}]*)\})?", help_text):
        name, choices = m.group(1), m.group(2)
        if choices is not None:
            out[name] = {c.strip() for c in choices.split(",")}
        else:
            out.setdefault(name, None)
    return out


def check_args_against_help(args: list[str], help_text: str) -> list[str]:
    """What in our trtllm-build command line the installed trtllm-build would refuse: an option it does not have, or
    a value outside its choices. The choices moved between TensorRT-LLM versions (plugin.py's plugin_options was
    ["float16", "float32", "bfloat16", "disable"] in the 0.x line as indexed, commit 035b99e0; later versions map
    gemm_plugin to "auto", …, "fp8", "nvfp4", None), so the installed one is asked rather than assumed."""
    offered = help_options(help_text)
    problems = []
    for i, a in enumerate(args):
        if not a.startswith("--"):
            continue
        value = args[i + 1] if i + 1 < len(args) and not args[i + 1].startswith("--") else None
        if a not in offered:
            problems.append(f"{a} is not an option of this trtllm-build")
        elif offered[a] is not None and value not in offered[a]:
            problems.append(f"{a} {value}: this trtllm-build takes {{{','.join(sorted(offered[a]))}}}")
    return problems


def run_trtllm_build(args: list[str], log_path: Path, *, executable: str = "trtllm-build",
                     env: dict | None = None, heartbeat_s: float = 30.0) -> dict:
    """Run trtllm-build with `args`, streaming its output into `log_path` and milestones into the log.

    Returns {returncode, seconds, log_path, command}; raises TrtllmBuildError when the executable is missing or the
    build fails (with the last lines of its output).
    """
    exe = shutil.which(executable)
    if exe is None:
        raise TrtllmBuildError(
            f"`{executable}` is not on PATH. It comes with TensorRT-LLM 1.2 (pip install tensorrt-llm==1.2.1 on a "
            f"CUDA machine, or run inside nvcr.io/nvidia/tritonserver:26.04-trtllm-python-py3); it cannot be "
            f"installed on a machine without an NVIDIA GPU stack.")
    helped = subprocess.run([exe, "--help"], capture_output=True, text=True, env={**os.environ, **(env or {})})
    problems = check_args_against_help(args, helped.stdout) if helped.returncode == 0 else [
        f"`{executable} --help` failed ({helped.returncode}): {helped.stderr.strip()[-500:]}"]
    if problems:
        raise TrtllmBuildError("the installed trtllm-build does not take our command line (checked against its "
                               "--help before building): " + "; ".join(problems))
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    command = [exe, *args]
    log.info("running %s", " ".join(command))
    tail: deque[str] = deque(maxlen=40)
    t0 = last = time.perf_counter()
    with open(log_path, "w") as logf:
        logf.write("$ " + " ".join(command) + "\n")
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                env={**os.environ, **(env or {})})
        assert proc.stdout is not None
        for line in proc.stdout:
            logf.write(line)
            logf.flush()
            line = line.rstrip("\n")
            tail.append(line)
            now = time.perf_counter()
            if _MILESTONES.search(line):
                log.info("trtllm-build: %s", line.strip()[:300])
                last = now
            elif now - last >= heartbeat_s:
                log.info("trtllm-build still running (%.0f s): %s", now - t0, line.strip()[:200])
                last = now
        code = proc.wait()
    seconds = round(time.perf_counter() - t0, 2)
    if code != 0:
        raise TrtllmBuildError(f"trtllm-build exited with {code} after {seconds} s (full log: {log_path}); "
                               f"last lines:\n" + "\n".join(tail))
    log.info("trtllm-build finished in %.1f s (log: %s)", seconds, log_path)
    return {"returncode": code, "seconds": seconds, "log_path": str(log_path), "command": command}


# ---------------------------------------------------------------------------------------------- accuracy on CPU

EVAL_PROMPTS = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWhat is the capital of France? "
    "Answer in one sentence.<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nDescribe the sound of rain on a "
    "tin roof.<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nTranscribe: the meeting starts "
    "at nine thirty tomorrow morning.<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nList three instruments that are "
    "common in jazz.<|im_end|>\n<|im_start|>assistant\n",
    "The history of recorded sound begins with the phonautograph in 1857, which traced sound waves",
    "Question: How many seconds are in ten minutes?\nAnswer:",
)


def decoder_accuracy_report(lm_dir: Path, precision: str, kv_cache: str = "auto", prompts=None, *,
                            max_new_tokens: int = 16, calib_texts=None, calib_size: int = 16, seed: int = 0,
                            device: str = "auto") -> dict:
    """Accuracy cost of a precision, simulated on CPU before any GPU time is spent.

    The reference is the unquantized model in its own dtype. For each prompt it generates `max_new_tokens` greedy
    tokens; both models are then run teacher-forced on prompt + those tokens, and at each generated position we
    compare the argmax (greedy-token agreement, in [0, 1]) and the KL divergence KL(reference || quantized) of the
    next-token distributions (>= 0). The quantized model is the same model after mtq.quantize with the config the
    checkpoint writer uses, cast first to the engine dtype and calibrated the same way (fake quantization: the
    rounding of the real kernels, computed in floating point). bf16/fp16 are the cast alone; int8_wo simulates
    trtllm-build's per-channel int8 weights with modelopt's INT8_WEIGHT_ONLY_CFG.
    """
    import modelopt.torch.quantization as mtq  # noqa: F401 - fail early when modelopt is missing
    import torch

    from af3trt.export.quantize import (awq_block_size_for, calibrate, calibration_batches, default_dtype, load_lm,
                                        load_tokenizer, modelopt_quant_config, pick_device, seed_everything)

    p = check_precision_names(precision, kv_cache)
    lm_dir = Path(lm_dir)
    device = pick_device(device)
    seed_everything(seed)
    text_cfg = text_config(lm_dir)
    native = text_cfg.get("torch_dtype") or text_cfg.get("dtype") or "float32"
    prompts = list(prompts) if prompts is not None else list(EVAL_PROMPTS)
    tok = load_tokenizer(lm_dir)
    t0 = time.perf_counter()
    model = load_lm(lm_dir, native, device)

    # Reference: greedy continuation, then teacher-forced logits at the generated positions.
    sequences, ref_logits = [], []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]], device=device)  # [1, P]
            seq = _greedy(model, ids, max_new_tokens)  # [1, P + N]
            sequences.append((seq, ids.shape[1]))
            ref_logits.append(_positions_logits(model, seq, ids.shape[1]))  # [N, V] float32 on cpu
    t_ref = time.perf_counter() - t0

    # The candidate: the engine's dtype, then (when the precision quantizes anything) modelopt's fake quantization.
    t1 = time.perf_counter()
    engine_dtype = default_dtype(precision, text_cfg)
    model = model.to(getattr(torch, engine_dtype))
    method = f"{engine_dtype}"
    cfg = modelopt_quant_config(precision, kv_cache, simulate=True,
                                awq_block_size=awq_block_size_for(text_cfg) if p.awq else 128)
    if cfg is not None:
        size = min(calib_size, p.max_calib_size or calib_size)
        model = calibrate(model, cfg, calibration_batches(tok, calib_texts, calib_size=size), device)
        method += " + modelopt fake quantization"
    t_quant = time.perf_counter() - t1

    per_prompt, agree_all, kl_all = [], [], []
    with torch.no_grad():
        for (seq, plen), ref in zip(sequences, ref_logits):
            got = _positions_logits(model, seq, plen)  # [N, V]
            agree = (got.argmax(-1) == ref.argmax(-1)).double()
            p_log = torch.log_softmax(ref.double(), -1)
            q_log = torch.log_softmax(got.double(), -1)
            kl = (p_log.exp() * (p_log - q_log)).sum(-1).clamp_min(0.0)  # [N]
            agree_all.append(agree)
            kl_all.append(kl)
            per_prompt.append({"prompt_tokens": plen, "token_agreement": agree.mean().item(),
                               "mean_kl": kl.mean().item()})
    agree_t, kl_t = torch.cat(agree_all), torch.cat(kl_all)
    report = {
        "precision": precision, "kv_cache": kv_cache, "method": method, "reference_dtype": native,
        "engine_dtype": engine_dtype,
        "prompts": len(prompts), "generated_tokens_per_prompt": max_new_tokens, "positions": int(agree_t.numel()),
        "token_agreement": agree_t.mean().item(), "mean_kl": kl_t.mean().item(), "max_kl": kl_t.max().item(),
        "per_prompt": per_prompt, "calib_size": calib_size, "seed": seed, "device": device,
        "seconds": {"reference": round(t_ref, 3), "quantize": round(t_quant, 3),
                    "total": round(time.perf_counter() - t0, 3)},
    }
    if not (0.0 <= report["token_agreement"] <= 1.0) or math.isnan(report["mean_kl"]):
        raise RuntimeError(f"accuracy report out of range: {report['token_agreement']}, {report['mean_kl']}")
    log.info("accuracy of %s (kv %s) vs %s: greedy-token agreement %.4f, mean KL %.5f over %d positions",
             precision, kv_cache, native, report["token_agreement"], report["mean_kl"], report["positions"])
    return report


def _greedy(model, ids, n: int):
    """Greedy continuation by n tokens with the KV cache; no stopping at end tokens (fixed length)."""
    import torch

    out = model(input_ids=ids, use_cache=True)
    seq = ids
    for step in range(n):
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)  # [1, 1]
        seq = torch.cat([seq, nxt], dim=1)
        if step + 1 < n:
            out = model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
    return seq


def _positions_logits(model, seq, prompt_len: int):
    """Logits predicting tokens prompt_len .. end of seq (teacher-forced), as float32 [N, V] on the CPU."""
    logits = model(input_ids=seq, use_cache=False).logits[0]  # [P + N, V]
    return logits[prompt_len - 1:-1].float().cpu()
