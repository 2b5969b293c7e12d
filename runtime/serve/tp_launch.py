"""How tritonserver is launched for a TensorRT-LLM engine built with tensor parallelism (world size = TP size).

TensorRT-LLM 1.2's `tensorrtllm` backend runs one MPI rank per GPU. In its *leader mode* (the default, and what
tensorrtllm_backend r26.04's README "Serving with Triton" / "Leader Mode" and TensorRT-LLM's
`triton_backend/scripts/launch_triton_server.py` do) one `mpirun` starts `world_size` tritonserver processes:

    mpirun --allow-run-as-root \
        -n 1 tritonserver --model-repository=R <ports> --disable-auto-complete-config \
             --backend-config=python,shm-region-prefix-name=prefix0_ : \
        -n 1 tritonserver --model-repository=R <ports> --model-control-mode=explicit --load-model=<trtllm model> \
             --disable-auto-complete-config --backend-config=python,shm-region-prefix-name=prefix1_ : …

Rank 0 (the leader) loads the whole repository and serves; every other rank loads only the tensorrtllm model and
never returns from its model-instance initialisation (so the shared ports never collide). Each rank gets its own
python-backend shared-memory prefix. World size 1 needs no MPI at all: the command is left as it is.

This module only builds the command line (pure, unit-tested); runtime/serve/server.py runs it.
"""

from __future__ import annotations

from af3trt.runtime.stages.contract import DECODER  # the tensorrtllm model of our ensemble
MPIRUN = "mpirun"
AUTO_COMPLETE_OFF = "--disable-auto-complete-config"  # every tritonserver we start (TritonServer.rank_command)


def shm_prefix_arg(prefix: str) -> str:
    """The python backend's shared-memory region prefix (distinct per rank and per server on one host)."""
    return f"--backend-config=python,shm-region-prefix-name={prefix}"


def leader_mode_command(rank_args: list[str], world_size: int, *, decoder_model: str = DECODER,
                        mpirun: str = MPIRUN, shm_prefix: str = "af3trt_rank") -> list[str]:
    """`rank_args` (tritonserver binary + its flags, as for one process) → the command for `world_size` ranks.

    world_size 1: the same arguments, no MPI. Otherwise one `mpirun` with an
    `-n 1 …` block per rank, separated by ':'; rank 0 keeps its model control (e.g. the supervisor's explicit mode,
    runtime/serve/supervisor.py), ranks ≥ 1 load only `decoder_model` (explicit model control, their own).
    """
    if world_size < 1:
        raise ValueError(f"world size must be >= 1, got {world_size}")
    if not rank_args:
        raise ValueError("rank_args must start with the tritonserver binary")
    # ranks >= 1 choose their own models, and take no CUDA memory pool on GPU 0: only rank 0 runs the ensemble
    rank0_only = ("--model-control-mode", "--load-model", "--cuda-memory-pool-byte-size")
    workers = [a for a in rank_args if not a.startswith(rank0_only)]

    def rank(i: int) -> list[str]:
        args = rank_args if i == 0 else [*workers, "--model-control-mode=explicit", f"--load-model={decoder_model}"]
        auto = [] if AUTO_COMPLETE_OFF in args else [AUTO_COMPLETE_OFF]  # TritonServer.rank_command has it already
        return [*args, *auto, shm_prefix_arg(f"{shm_prefix}{i}_")]

    if world_size == 1:
        return list(rank_args)
    cmd = [mpirun, "--allow-run-as-root"]
    for i in range(world_size):
        if i:
            cmd.append(":")
        cmd += ["-n", "1", *rank(i)]
    return cmd
