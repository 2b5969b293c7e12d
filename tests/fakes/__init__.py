"""The stand-ins for what this machine cannot run, in one place. Each module says what it reproduces and where that
fact was read (repository, branch or tag, path); re-read the source before relying on a new detail.

- fakes.tensorrt: TensorRT 10.14's Python module (builder and runtime). Importable from disk as `tensorrt` (the
  container env links it into its site-packages); `fakes.tensorrt.fresh(...)` is a private copy with its own call
  log and a scripted outcome (parser errors, a failed build, a refused timing cache, other network I/O).
- fakes.trtllm_build: TensorRT-LLM 1.2's `trtllm-build`; `install(bin_dir, python)` writes it as an executable.
- fakes.pb_utils: Triton's python-backend `triton_python_backend_utils`, enough to run our model.py adapters
  without a server (`load_model`, `Request`, `Logger`).

Strict: they make the checks upstream makes on what we feed them, not only its interfaces, each cited where made:
- fakes.trtllm_backend: TensorRT-LLM's `tensorrtllm` Triton backend behind Triton core's validation (names, types,
  shapes), its executor's checks (LoRA weights' dtype and host memory, the LoRA caches' pages in the engine's dtype
  against their sizes, the prompt table's dtype and the engine's profile limits, host memory for stop/streaming)
  and a stand-in generation.
- fakes.cuda_memory: a python stub's GPU memory, torch's allocator refused past the stub's cap and TensorRT's own
  allocations past the plan's share.
- fakes.ensemble: a rendered model repository's ensemble run in this process through the above.

These run in the container env too (tests/container_env.py): nothing here may import the export side
(transformers, onnx, modelopt) at module level.
"""
