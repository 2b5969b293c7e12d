"""The GPU target's repository: the RepoSpec for a TensorRT encoder plan and TensorRT-LLM 1.2's `tensorrtllm`
decoder backend, and the placement of the encoder plan.

    info = read_decoder_engine("artifacts/engine")          # dtype, vocab, hidden, build limits of the engine
    spec = gpu_repo_spec(checkpoint, serving, engine_dir="artifacts/engine", tokenizer_dir="artifacts/lm",
                         encoder_max_windows=160, engine=info, options=TrtllmOptions())
    render_gpu_repository(work / "model_repository", spec, encoder_plan=work / "artifacts/encoder.plan")

`checkpoint` and `serving` are the build plan's CheckpointFacts and ServingConfig (build/plan.py).

Models (configs from triton_repo/configs.py):
  encoder   python backend running the TensorRT plan (triton_repo/encoder_trt, runtime/engines/trt_runner.py: the container has no
            TensorRT backend), KIND_GPU, max_batch_size = the engine profile's max windows; the plan is moved to
            encoder/1/model.plan (parameter plan_file, resolved against the model's version directory).
            Inputs [W, 128, T] with T each request's frame bucket (runtime/stages/lengths.py); dynamic batching on (queue
            delay encoder_queue_delay_us): Triton merges requests of equal T only, so the GPU batches per bucket.
  decoder   backend tensorrtllm with the 1.2 backend's parameters (decoder_parameters); the prompt table is declared
            in the engine's dtype (read from the engine's config.json, never assumed), e.g. TYPE_BF16 for AF3.
  fusion    sends prompt_table_extra_ids when KV-cache reuse is on (runtime/stages/prompt.py: table_extra_ids).
  preprocess, postprocess: the python models of the CPU target, unchanged.

What the 1.2 backend (triton_backend/inflight_batcher_llm/src/model_instance_state.cc) requires of the parameters:
  - gpt_model_type is read without a default (v1 | inflight_batching | inflight_fused_batching);
  - tokenizer_dir, xgrammar_tokenizer_info_path and guided_decoding_backend are read without a default: missing,
    the model fails to load. Empty values turn guided decoding off; a build turns it on (build/trtllm_guided.py);
  - enable_kv_cache_reuse defaults to TRUE when absent; with reuse on, a request with a prompt table and without
    prompt_table_extra_ids of the prompt's length is rejected;
  - gpt_model_path is opened as given (relative paths resolve against tritonserver's working directory): it is
    written absolute, as the engine will be seen at serving time;
  - executor_worker_path is used only in orchestrator mode (TRTLLM_ORCHESTRATOR=1).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from af3trt.build import trtllm_guided
from af3trt.build.plan import CheckpointFacts, ServingConfig
from af3trt.build.repository import render_repository, repo_spec
from af3trt.triton_repo.configs import DTYPES, RepoSpec

EXECUTOR_WORKER_PATH = "/opt/tritonserver/backends/tensorrtllm/trtllmExecutorWorker"
SCHEDULER_POLICIES = ("guaranteed_no_evict", "max_utilization")
BATCHING_TYPES = ("inflight_fused_batching", "inflight_batching")


class GpuRepoError(ValueError):
    """The engine, the checkpoint and the serving limits do not fit together."""


@dataclass(frozen=True)
class TrtllmOptions:
    """The tensorrtllm backend's runtime parameters (config.pbtxt `parameters`, all sent as strings)."""

    kv_cache_free_gpu_mem_fraction: float = 0.9
    batch_scheduler_policy: str = "guaranteed_no_evict"
    enable_kv_cache_reuse: bool = True  # the backend's own default; fusion then sends prompt_table_extra_ids
    enable_chunked_context: bool = True
    max_tokens_in_paged_kv_cache: int | None = None  # None: sized by kv_cache_free_gpu_mem_fraction
    exclude_input_in_output: bool = True
    cancellation_check_period_ms: int = 100
    executor_worker_path: str = EXECUTOR_WORKER_PATH
    max_beam_width: int = 1
    gpt_model_type: str = "inflight_fused_batching"

    def check(self) -> None:
        if not 0.0 < self.kv_cache_free_gpu_mem_fraction <= 1.0:
            raise GpuRepoError(f"kv_cache_free_gpu_mem_fraction must be in (0, 1], got "
                               f"{self.kv_cache_free_gpu_mem_fraction}")
        if self.batch_scheduler_policy not in SCHEDULER_POLICIES:
            raise GpuRepoError(f"batch_scheduler_policy must be one of {SCHEDULER_POLICIES}, got "
                               f"{self.batch_scheduler_policy!r}")
        if self.gpt_model_type not in BATCHING_TYPES:
            raise GpuRepoError(f"gpt_model_type must be one of {BATCHING_TYPES}, got {self.gpt_model_type!r}")
        if self.max_tokens_in_paged_kv_cache is not None and self.max_tokens_in_paged_kv_cache < 1:
            raise GpuRepoError(f"max_tokens_in_paged_kv_cache must be >= 1, got {self.max_tokens_in_paged_kv_cache}")
        if self.max_beam_width < 1 or self.cancellation_check_period_ms < 1:
            raise GpuRepoError("max_beam_width and cancellation_check_period_ms must be >= 1")
        if not os.path.isabs(self.executor_worker_path):
            raise GpuRepoError(f"executor_worker_path must be absolute, got {self.executor_worker_path!r}")


@dataclass(frozen=True)
class TrtllmEngineInfo:
    """What the repository needs to know about a TensorRT-LLM engine (or, before the build, its checkpoint)."""

    dtype: str  # "bfloat16" | "float16" | "float32": the prompt table's dtype
    vocab_size: int  # first fake id
    hidden_size: int
    max_batch_size: int | None = None  # build limits; None when read from a checkpoint
    max_input_len: int | None = None
    max_seq_len: int | None = None
    max_prompt_embedding_table_size: int | None = None
    paged_context_fmha: bool | None = None  # KV-cache reuse and chunked context need it
    source: str = ""


def read_decoder_engine(path: Path) -> TrtllmEngineInfo:
    """From an engine directory's config.json (trtllm-build: pretrained_config + build_config) or a TensorRT-LLM
    checkpoint's config.json (the same keys at top level, no build limits)."""
    cfg_path = Path(path) / "config.json"
    if not cfg_path.is_file():
        raise GpuRepoError(f"{path}: no config.json (expected a TensorRT-LLM engine or checkpoint directory)")
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    pretrained, build = cfg.get("pretrained_config", cfg), cfg.get("build_config") or {}
    missing = [k for k in ("dtype", "vocab_size", "hidden_size") if k not in pretrained]
    if missing:
        raise GpuRepoError(f"{cfg_path}: no {', '.join(missing)}")
    if pretrained["dtype"] not in DTYPES:
        raise GpuRepoError(f"{cfg_path}: dtype {pretrained['dtype']!r} is not one of {sorted(DTYPES)}")
    plugins = build.get("plugin_config") or {}
    return TrtllmEngineInfo(
        dtype=pretrained["dtype"], vocab_size=int(pretrained["vocab_size"]), hidden_size=int(pretrained["hidden_size"]),
        max_batch_size=build.get("max_batch_size"), max_input_len=build.get("max_input_len"),
        max_seq_len=build.get("max_seq_len"),
        max_prompt_embedding_table_size=build.get("max_prompt_embedding_table_size"),
        paged_context_fmha=plugins.get("use_paged_context_fmha"),
        source=f"{cfg_path} ({'engine' if 'pretrained_config' in cfg else 'checkpoint'})")


def backend_options(engine: TrtllmEngineInfo, base: TrtllmOptions = TrtllmOptions()) -> TrtllmOptions:
    """The tensorrtllm backend options this engine can serve: `base`, with KV-cache reuse and chunked context
    turned off when the engine was built without paged context FMHA (its config.json
    build_config.plugin_config.use_paged_context_fmha, which is what trtllm-build actually built, not what we asked).

    Facts (re-verify before relying on them):
    - TensorRT-LLM 1.2 tensorrt_llm/builder.py `build()` turns use_paged_context_fmha off for an INT8 KV cache
      ("Paged Context FMHA is disabled because it doesn't work with int8 kv cache currently") and for an FP8 KV cache
      unless the weights take the FP8 workflow (quant_algo FP8/W4A8_AWQ/NVFP4) on SM >= 89; the engine's
      config.json is written from that modified copy of the build config (EngineConfig.to_dict).
    - cpp/tensorrt_llm/batch_manager/trtGptModelInflightBatching.cpp: "Chunked context requires context FMHA, paged
      kv_cache and paged context FMHA all enabled at the same time." (TLLM_CHECK: the model fails to load).
    - KV-cache reuse: docs/source/advanced/kv-cache-reuse.md "KV cache reuse requires the model to be built for
      paged context attention" (older executors TLLM_CHECK "When KV cache block reuse is set, model has to be built
      with paged context FMHA support"); tensorrt_llm/plugin/plugin.py use_paged_context_fmha: "Allow advanced
      features like KV cache reuse and chunked context."
    - the backend passes enable_kv_cache_reuse / enable_chunked_context to the executor as they are
      (triton-inference-server/tensorrtllm_backend r26.04 docs/model_config.md lists both parameters).
    An engine without a plugin_config (not written by trtllm-build) is treated as having no paged context FMHA.
    """
    paged = bool(engine.paged_context_fmha)
    if paged:
        return base
    return replace(base, enable_kv_cache_reuse=False, enable_chunked_context=False)


def _bool(v: bool) -> str:
    return "true" if v else "false"


def decoder_parameters(gpt_model_path: str, options: TrtllmOptions) -> dict[str, str]:
    """The tensorrtllm backend's parameters; gpt_model_path as the server will see it (absolute)."""
    options.check()
    if not os.path.isabs(gpt_model_path):
        raise GpuRepoError(f"gpt_model_path must be absolute (the backend does not resolve it), got {gpt_model_path!r}")
    params = {
        "gpt_model_type": options.gpt_model_type,
        "gpt_model_path": gpt_model_path,
        "max_beam_width": str(options.max_beam_width),
        "kv_cache_free_gpu_mem_fraction": str(options.kv_cache_free_gpu_mem_fraction),
        "batch_scheduler_policy": options.batch_scheduler_policy,
        "enable_kv_cache_reuse": _bool(options.enable_kv_cache_reuse),
        "enable_chunked_context": _bool(options.enable_chunked_context),
        "exclude_input_in_output": _bool(options.exclude_input_in_output),
        "cancellation_check_period_ms": str(options.cancellation_check_period_ms),
        "executor_worker_path": options.executor_worker_path,
        "FORCE_CPU_ONLY_INPUT_TENSORS": "no",
        # read without a default by the 1.2 backend: present and empty = no guided decoding
        "tokenizer_dir": "", "xgrammar_tokenizer_info_path": "", "guided_decoding_backend": "",
    }
    if options.max_tokens_in_paged_kv_cache is not None:
        params["max_tokens_in_paged_kv_cache"] = str(options.max_tokens_in_paged_kv_cache)
    return params


def check_engine_fits(engine: TrtllmEngineInfo, checkpoint: CheckpointFacts, limits: ServingConfig,
                      options: TrtllmOptions) -> None:
    """GpuRepoError when the engine cannot serve the limits (sizes read from its build_config, when present)."""
    problems = []
    if engine.hidden_size != checkpoint.text_hidden_size:
        problems.append(f"engine hidden_size {engine.hidden_size} != checkpoint {checkpoint.text_hidden_size}")
    if engine.vocab_size < checkpoint.vocab_size:
        problems.append(f"engine vocab_size {engine.vocab_size} < checkpoint text vocab {checkpoint.vocab_size}")
    audio_rows = limits.max_batch_size * limits.window_tokens_per_request
    for what, have, need in (
            ("max_batch_size", engine.max_batch_size, limits.max_batch_size),
            ("max_input_len", engine.max_input_len, limits.max_input_len),
            ("max_seq_len", engine.max_seq_len, limits.max_input_len + limits.max_output_len),
            ("max_prompt_embedding_table_size", engine.max_prompt_embedding_table_size, audio_rows)):
        if have is not None and have < need:
            problems.append(f"engine {what} {have} < {need} needed by the serving limits")
    if engine.paged_context_fmha is False and (options.enable_kv_cache_reuse or options.enable_chunked_context):
        problems.append("the engine was built without use_paged_context_fmha: turn off enable_kv_cache_reuse and "
                        "enable_chunked_context, or rebuild it with --use_paged_context_fmha enable")
    if problems:
        raise GpuRepoError(f"{engine.source}: " + "; ".join(problems))


def gpu_repo_spec(checkpoint: CheckpointFacts, serving: ServingConfig, *, engine_dir: Path, tokenizer_dir: str,
                  encoder_max_windows: int, engine: TrtllmEngineInfo | None = None,
                  options: TrtllmOptions = TrtllmOptions(), engine_dir_at_serve: str | None = None,
                  gpu_kernels: bool = True, guided_decoding: bool = False) -> RepoSpec:
    """The RepoSpec of target "gpu": build/repository.repo_spec with the TensorRT encoder and the tensorrtllm decoder.

    engine_dir: the TensorRT-LLM engine directory (config.json read here unless `engine` is given).
    engine_dir_at_serve: its absolute path inside the serving container when that differs from engine_dir's.
    tokenizer_dir: for fusion/postprocess, absolute or relative to the build output (as on the CPU target).
    encoder_max_windows: the encoder engine profile's max (build/trt_encoder.encoder_max_windows).
    gpu_kernels: log-mel and prompt table on the GPU (af3trt.kernels; RepoSpec.gpu_kernels), else the CPU path.
    guided_decoding: the engine directory holds the xgrammar tokenizer info file (build/trtllm_guided.py): the backend's
    guided decoding on, and fusion compiling each guide before it reaches the decoder.
    """
    engine = engine or read_decoder_engine(engine_dir)
    check_engine_fits(engine, checkpoint, serving, options)
    if encoder_max_windows < serving.max_audio_windows:
        raise GpuRepoError(f"the encoder engine takes at most {encoder_max_windows} windows at once, but one request "
                           f"may bring {serving.max_audio_windows}")
    gpt_model_path = engine_dir_at_serve or str(Path(engine_dir).resolve())
    decoder_params = decoder_parameters(gpt_model_path, options)
    if guided_decoding:
        decoder_params.update(trtllm_guided.decoder_parameters(str(Path(gpt_model_path) / trtllm_guided.TOKENIZER_INFO)))
    spec = repo_spec(checkpoint, serving, target="gpu", decoder_dtype=engine.dtype, vocab_size=engine.vocab_size,
                     tokenizer_dir=tokenizer_dir, encoder_max_batch=encoder_max_windows, encoder_params={},
                     decoder_params=decoder_params,
                     prompt_table_extra_ids=options.enable_kv_cache_reuse, gpu_kernels=gpu_kernels)
    return replace(spec, fusion_params={**spec.fusion_params, "guide_check": True}) if guided_decoding else spec


def with_stub_caps(spec: RepoSpec, caps: dict[str, int] | None) -> RepoSpec:
    """The memory plan's caps of the python stubs on GPU 0 (build/memory_plan.py stub_caps) as each model's
    `cuda_memory_cap_bytes` parameter (applied in the stub by runtime/engines/gpus.py cap_cuda_memory)."""
    if not caps:
        return spec
    field = {"preprocess": "preprocess_params", "encoder": "encoder_params", "fusion": "fusion_params"}
    return replace(spec, **{field[m]: {**getattr(spec, field[m]), "cuda_memory_cap_bytes": int(b)}
                            for m, b in caps.items()})


def place_encoder_plan(repo_root: Path, plan: Path, *, copy: bool = False) -> Path:
    """Put the encoder engine at <repo>/encoder/1/model.plan: moved (a rename within one file system) unless
    `copy`. Returns the destination."""
    dest = Path(repo_root) / "encoder" / "1" / "model.plan"
    if not Path(plan).is_file():
        raise GpuRepoError(f"encoder plan {plan} does not exist")
    dest.parent.mkdir(parents=True, exist_ok=True)
    if copy:
        shutil.copy2(plan, dest)
    else:
        shutil.move(str(plan), dest)
    return dest


def render_gpu_repository(root: Path, spec: RepoSpec, *, encoder_plan: Path, copy_plan: bool = False) -> dict:
    """Render the repository (configs + python models, build/repository.py) and place the encoder plan in it."""
    if spec.target != "gpu":
        raise GpuRepoError(f"render_gpu_repository takes a gpu RepoSpec, got target {spec.target!r}")
    rendered = render_repository(root, spec)
    dest = place_encoder_plan(root, encoder_plan, copy=copy_plan)
    return {"configs": rendered, "encoder_plan": str(dest), "spec": asdict(spec)}
