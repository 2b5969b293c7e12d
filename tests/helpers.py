"""Helpers that several test modules use (fixtures shared the same way live in conftest.py): test modules never
import one another.

- fading_noise: a test signal whose loudness falls over time, with a silent second (audio and kernel tests).
- Rendered-repository helpers (test_repo_configs, test_gpu_encoder): the parts of a trtllm-build config.json the
  repository reads, a fake engine directory, the GPU RepoSpec of the tiny checkpoint, and every config.pbtxt of a
  rendered repository parsed back through model_config_pb2.
- peer_ports: the client ports of the TCP connections a local server port has open (connection-reuse tests).
- HTTPServer: `af3trt openai` as a subprocess in front of a running tritonserver (test_openai_server,
  test_structured_output_server).
- openai_front: the OpenAI front served by uvicorn in a thread of the test process (its app's state readable).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from af3trt.build.gpu_repo import TrtllmOptions, gpu_repo_spec
from af3trt.build.trt_encoder import encoder_max_windows
from af3trt.runtime.stages import lengths
from af3trt.triton_repo import configs

SR = lengths.SAMPLE_RATE
MODELS = ("preprocess", "encoder", "fusion", "decoder", "postprocess", "af3", "cancel")


def fading_noise(n: int, seed: int = 0) -> np.ndarray:
    """Noise whose loudness falls over time (each window gets its own peak) with a silent stretch."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / SR
    wave = rng.standard_normal(n) * 0.3 * np.exp(-t / 40.0)
    wave[(t > 2.0) & (t < 3.0)] = 0.0
    return wave.astype(np.float32)


def engine_config(dtype: str, *, vocab: int, hidden: int, mbs: int = 4, max_input_len: int = 16000,
                  max_seq_len: int = 16600, table: int | None = None, paged_context_fmha: bool = True) -> dict:
    """The parts of a trtllm-build config.json the repository and the backend fake (its executor's checks) read."""
    return {"version": "1.2.1",
            "pretrained_config": {"architecture": "Qwen2ForCausalLM", "dtype": dtype, "vocab_size": vocab,
                                  "hidden_size": hidden, "num_hidden_layers": 2, "num_attention_heads": 2,
                                  "num_key_value_heads": 1, "intermediate_size": 2 * hidden},
            "build_config": {"max_batch_size": mbs, "max_input_len": max_input_len, "max_seq_len": max_seq_len,
                             "max_prompt_embedding_table_size": mbs * 15000 if table is None else table,
                             "plugin_config": {"use_paged_context_fmha": paged_context_fmha}}}


def write_engine(root: Path, cfg: dict) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(cfg))
    (root / "rank0.engine").write_bytes(b"engine")
    return root


def gpu_spec(checkpoint, limits, tmp_path, dtype="bfloat16", options=TrtllmOptions(), **engine_kw):
    engine_dir = write_engine(tmp_path / f"engine-{dtype}",
                              engine_config(dtype, vocab=checkpoint.vocab_size + 8,
                                            hidden=checkpoint.text_hidden_size, **engine_kw))
    return gpu_repo_spec(checkpoint, limits, engine_dir=engine_dir, tokenizer_dir="artifacts/lm",
                         encoder_max_windows=encoder_max_windows(limits.max_batch_size, limits.max_audio_windows),
                         options=options), engine_dir


def rendered(root: Path) -> dict[str, mc.ModelConfig]:
    """Every config.pbtxt of a rendered repository, parsed back through model_config_pb2 (a GPU repository, whose
    decoder is the tensorrtllm backend, also has the decoder front in front of it)."""
    out = {}
    for name in MODELS:
        out[name] = configs.parse((root / name / "config.pbtxt").read_text())
        assert out[name].name == name
    names = (*MODELS, "decoder_front") if out["decoder"].backend == "tensorrtllm" else MODELS
    for name in names[len(MODELS):]:
        out[name] = configs.parse((root / name / "config.pbtxt").read_text())
    assert sorted(p.name for p in root.iterdir()) == sorted(names)
    return out


def peer_ports(port: int) -> set[int]:
    """Client-side ports of the ESTABLISHED TCP connections to local `port` (IPv4 and IPv6), from /proc/net/tcp*:
    what a server listening on `port` holds open right now."""
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, remote, state = line.split()[1:4]
            if state == "01" and int(local.rsplit(":", 1)[1], 16) == port:  # 01: TCP_ESTABLISHED
                out.add(int(remote.rsplit(":", 1)[1], 16))
    return out


UPLOAD_LIMIT = 2 * 2**20  # HTTPServer's --max-upload-bytes


@contextlib.contextmanager
def http_server(triton_url: str, log_dir: Path, api_key: str | None = None):
    """An HTTPServer listening (a module fixture's body): stopped on exit, its log's tail printed."""
    srv = HTTPServer(triton_url, log_dir / "openai.log", api_key=api_key)
    try:
        srv.wait_listening()
        yield srv
    finally:
        srv.stop()
        print(f"--- af3trt openai log\n{srv.log()[-3000:]}")


class HTTPServer:
    """`af3trt openai` as a subprocess on a free loopback port; stopped by its PID. api_key: required by the server
    (read from an environment variable), None for an open server."""

    def __init__(self, triton_url: str, log_path, api_key: str | None = None):
        from af3trt.runtime.serve.server import free_port

        self.port = free_port()
        env = dict(os.environ, AF3TRT_TEST_API_KEY=api_key or "")
        cmd = [sys.executable, "-m", "af3trt.runtime.openai.app", "--triton", triton_url, "--port", str(self.port),
               "--max-upload-bytes", str(UPLOAD_LIMIT)] + (["--api-key-env", "AF3TRT_TEST_API_KEY"] if api_key else [])
        self.log_path = log_path
        with open(log_path, "wb") as logf:
            self.proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_listening(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"af3trt openai exited:\n{self.log()}"
            try:
                urllib.request.urlopen(self.url + "/health", timeout=5)
                return
            except urllib.error.HTTPError:  # listening (503 while Triton is not ready)
                return
            except OSError:
                time.sleep(0.2)
        raise TimeoutError(f"af3trt openai not listening after {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@contextlib.contextmanager
def openai_front(settings):
    """The OpenAI front (runtime/openai/app.py create_app(settings)) on uvicorn in a thread of this process, on a free
    loopback port: yields (base URL, app); the test reads the app's state (e.g. its realtime sessions). Stopped on
    exit."""
    import uvicorn

    from af3trt.runtime.openai.app import create_app
    from af3trt.runtime.serve.server import free_port

    app = create_app(settings)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", ws="websockets-sansio"))
    thread = threading.Thread(target=server.run, name=f"openai-front-{port}", daemon=True)
    thread.start()
    started = threading.Event()
    while not started.wait(0.05):  # uvicorn says so only through this flag; the thread's death ends the wait
        assert thread.is_alive(), "the OpenAI front's server thread ended before it started"
        if server.started:
            started.set()
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(60)
        assert not thread.is_alive(), "the OpenAI front did not stop"


@contextlib.contextmanager
def stub_below(tmp_path: Path, model: str, depth: int = 1):
    """A process tree of the test's own with a python stub as Triton starts it (<...>/triton_python_backend_stub
    <repo>/<model>/<version>/model.py) `depth` bash levels below its root (1: a server's child; 2: below mpirun's
    rank). Yields (root pid, stub pid) once the stub runs; on exit the stub is released and the root must end 0.
    Synchronised by two fifos: the stub writes its pid into one, then blocks opening the other (no sleep)."""
    import shlex
    import signal

    path = tmp_path / "model_repository" / model / "1" / "model.py"
    path.parent.mkdir(parents=True)
    ready, go = tmp_path / "ready", tmp_path / "go"
    os.mkfifo(ready)
    os.mkfifo(go)
    path.write_text(f"import os\nopen({str(ready)!r}, 'w').write(str(os.getpid()))\nopen({str(go)!r}).read()\n")
    stub = tmp_path / "bin" / "triton_python_backend_stub"
    stub.parent.mkdir()
    stub.symlink_to(getattr(sys, "_base_executable", sys.executable))
    command = f"{shlex.quote(str(stub))} {shlex.quote(str(path))} & wait"
    for _ in range(depth - 1):
        command = f"bash -c {shlex.quote(command)} & wait"
    root = subprocess.Popen(["bash", "-c", command], start_new_session=True)
    try:
        with open(ready) as f:  # blocks until the stub has opened it
            stub_pid = int(f.read())
        yield root.pid, stub_pid
        with open(go, "w"):
            pass
        assert root.wait(timeout=60) == 0
    finally:
        if root.poll() is None:
            os.killpg(root.pid, signal.SIGKILL)  # our own process group (start_new_session), nothing else
            root.wait()
