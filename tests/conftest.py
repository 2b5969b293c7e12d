"""Shared fixtures, one of each per session: the tiny synthetic AF3 checkpoint (and a bf16 one), the bundled clip,
transformers' AF3 on them (`ref`, `bf16_ref`: load a model nowhere else), the CPU builds (`tiny_repo`, `bf16_repo`:
a test that only needs a built repository takes one of these), the GPU target's prepare-only output, the tiny
ensemble on a real tritonserver; and the fast tier's rules (`scripts/test.sh --fast`). Helpers that several test
modules share are in tests/helpers.py, the fakes in tests/fakes/: test modules never import one another."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from af3trt.runtime import assets

# Tests press Ctrl-C on the processes they start (af3trt batch, serve): a runner that starts the suite with SIGINT
# ignored (a background job of a non-interactive shell: `bash .ci/run &`) passes SIG_IGN on to every child through
# exec, and Python then never installs its KeyboardInterrupt handler there, so the child runs on. A handler of our
# own here is reset to the default in each child at exec.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A complete HF AF3 directory (tiny preset, fixed seed), written once per test session."""
    from af3trt.export.synth import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "af3-tiny", "tiny", seed=0)


@pytest.fixture(scope="session")
def speech_bytes() -> bytes:
    """The bundled 5-s speech clip (FLAC, 16 kHz mono), as a client would send it."""
    return assets.speech_path().read_bytes()


@pytest.fixture(scope="session")
def lm_dir(tiny_ckpt, tmp_path_factory) -> Path:
    """The tiny checkpoint's language model extracted as a standalone Qwen2ForCausalLM directory."""
    from af3trt.export.extract_lm import extract_language_model

    out = tmp_path_factory.mktemp("lm") / "qwen2"
    extract_language_model(tiny_ckpt, out)
    return out


@pytest.fixture(scope="session")
def tiny_repo(tiny_ckpt, tmp_path_factory) -> Path:
    """The tiny checkpoint built once per session for the CPU target (OUT with OUT/model_repository), shared by
    the integration, deployment and multi-replica tests."""
    from af3trt.build.build_engines import BuildOptions, ServingConfig, build

    out = tmp_path_factory.mktemp("build") / "af3-tiny"
    # max_output_len 512: room for a long answer that a cancellation must cut short (tests/test_cancel.py)
    build(BuildOptions(hf_model=tiny_ckpt, out=out,
                       serving=ServingConfig(max_text_len=512, max_output_len=512, default_max_tokens=16)))
    return out


@pytest.fixture(scope="session")
def checkpoint(tiny_ckpt) -> dict:
    """The build's facts about the tiny checkpoint (test_repo_configs, test_gpu_encoder)."""
    from af3trt.build.plan import inspect_checkpoint

    return inspect_checkpoint(tiny_ckpt)


@pytest.fixture(scope="session")
def limits(tiny_ckpt, tmp_path_factory) -> dict:
    """Serving limits of a 4-request, 512-text-token build of the tiny checkpoint (test_repo_configs,
    test_gpu_encoder)."""
    from af3trt.build.plan import ServingConfig

    return ServingConfig(max_batch_size=4, max_text_len=512, max_output_len=64, default_max_tokens=16)


@pytest.fixture(scope="session")
def prepared(tiny_ckpt, tmp_path_factory) -> Path:
    """`af3trt build --target gpu --prepare-only` of the tiny checkpoint, the export side's half (test_container_half,
    test_gpu_check)."""
    from af3trt.build.build_engines import main as build_main

    out = tmp_path_factory.mktemp("prepared") / "af3-gpu"
    build_main(["--hf-model", str(tiny_ckpt), "--out", str(out), "--target", "gpu", "--precision", "bf16",
                "--gpu", "h100", "--prepare-only", "--no-accuracy-report", "--max-audio-seconds", "30",
                "--max-batch-size", "2"])
    return out


def pytest_ignore_collect(collection_path, config):
    """`scripts/test.sh --fast` (AF3TRT_TESTS_FAST=1): a test module whose module-level `pytestmark` makes every test
    integration, slow or gpu is not even imported (its imports cost seconds; -m would deselect all of it anyway)."""
    import ast
    import os

    if (os.environ.get("AF3TRT_TESTS_FAST") != "1" or collection_path.suffix != ".py"
            or not collection_path.name.startswith("test_")):
        return None
    for node in ast.parse(collection_path.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "pytestmark" for t in node.targets):
            marks = {n.attr for n in ast.walk(node.value) if isinstance(n, ast.Attribute)}
            if marks & {"integration", "slow", "gpu"}:
                return True
    return None


@pytest.fixture(autouse=True)
def _fast_tier_starts_no_server(monkeypatch):
    """`scripts/test.sh --fast` (AF3TRT_TESTS_FAST=1) promises no tritonserver: a test that starts one there fails,
    naming the marker it lacks."""
    import os

    if os.environ.get("AF3TRT_TESTS_FAST") == "1":
        from af3trt.runtime.serve.server import TritonServer

        def refuse(self, *a, **k):
            pytest.fail("this test starts tritonserver: mark it `integration` (the fast tier runs none)")

        monkeypatch.setattr(TritonServer, "start", refuse)


@pytest.fixture(scope="session", autouse=True)
def _modelopt_sees_the_real_tensorrt():
    """modelopt.onnx decides at import whether TensorRT is installed. Import it before any test puts a fake
    `tensorrt` module in sys.modules (test_trt_encoder, test_gpu_build), so it never mistakes the fake for one."""
    import modelopt.onnx.trt_utils  # noqa: F401


# The tiny ensemble on a real tritonserver, shared by every integration module (one build, one server per session).

@pytest.fixture(scope="session")
def repo(tiny_repo):
    return tiny_repo


@pytest.fixture(scope="session")
def server(repo):
    from af3trt.runtime.serve.server import TritonServer

    srv = TritonServer(repo / "model_repository", log_path=repo / "tritonserver.log")
    srv.start(timeout=300)
    try:
        yield srv
    finally:
        srv.stop()
        assert srv.proc.poll() is not None
        print(f"--- tail of {srv.log_path}\n{srv.log_tail(30)}")


@pytest.fixture(scope="session")
def client(server):
    from af3trt.runtime.client.library import AF3Client

    return AF3Client(server.grpc_url, timeout=120)


@pytest.fixture(scope="session")
def ref(tiny_ckpt):
    """transformers' AF3 on the tiny checkpoint (tests/reference.py), loaded once per session, offline
    (HF_HUB_OFFLINE=1: a synthetic checkpoint needs nothing from the hub). Every test that wants transformers' model
    or processor for the tiny checkpoint takes `ref.model` / `ref.processor` from here; none may modify them (a
    test that needs another dtype deep-copies first)."""
    from reference import Reference

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        return Reference(tiny_ckpt)


@pytest.fixture(scope="session")
def bf16_ckpt(tmp_path_factory) -> Path:
    """A bfloat16 tiny checkpoint (like the real AF3's dtype), seed 1."""
    from af3trt.export.synth import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("ckpt-bf16") / "af3-tiny-bf16", "tiny", seed=1, dtype="bfloat16")


@pytest.fixture(scope="session")
def bf16_repo(bf16_ckpt, tmp_path_factory) -> Path:
    """The bf16 checkpoint built once for the CPU target (OUT with OUT/model_repository; 90-s audio, so a 70-s clip
    fits). Tests that change its configs work on a copy."""
    from af3trt.build.build_engines import BuildOptions, ServingConfig, build

    out = tmp_path_factory.mktemp("build-bf16") / "out"
    build(BuildOptions(hf_model=bf16_ckpt, out=out,
                       serving=ServingConfig(max_audio_seconds=90, max_text_len=512, max_output_len=32)))
    return out


@pytest.fixture(scope="session")
def bf16_ref(bf16_ckpt):
    """transformers' AF3 on the bf16 checkpoint (tests/reference.py), loaded once per session."""
    from reference import Reference

    return Reference(bf16_ckpt)
