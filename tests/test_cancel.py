"""The cancellation side channel (triton_repo/cancel, runtime/triton/context.py, the CPU decoder's probe, the clients):
Triton 2.51 does not pass a client's cancellation of the af3 ensemble on to the decoder inside it, so the clients
send the request id to the `cancel` model and the decoder polls the mark it leaves."""

from __future__ import annotations

import threading
import time
import uuid

import numpy as np
import pytest

from fakes import pb_utils as fake_pb
from af3trt.runtime.triton import context as context_mod
from af3trt.runtime.client.library import AF3Error, Request, send_cancel
from af3trt.runtime.triton.context import RequestContext, RunningRequests, running_requests
from af3trt.triton_repo import configs
from reference import MAX_TOKENS

LONG = 512  # the session repository's max_output_len (tests/conftest.py): far more than a cancellation lets run
SPEC = configs.RepoSpec(target="cpu", hidden_size=8, decoder_dtype="float32", vocab_size=100, end_id=1, pad_id=0)


@pytest.fixture
def ctx_root(tmp_path, monkeypatch):
    root = tmp_path / "ctx"
    monkeypatch.setattr(context_mod, "default_root", lambda: root)
    return root


def _req(request_id):
    value = None if request_id is None else np.array([request_id], dtype=np.object_)
    return fake_pb.Request({"request_id": value})


def test_cancel_model_marks_the_request_and_names_no_client_path(ctx_root):
    model = fake_pb.load_model(configs.CANCEL, configs.cancel_config(SPEC))
    hostile = "../../../../tmp/af3trt-owned"
    out = model.execute([_req(b"req-1"), _req(hostile.encode()), _req(None), _req(b"x" * 300), _req(b"\xff\xfe")])
    assert [r.has_error() for r in out] == [False, False, True, True, True]
    assert out[0].outputs["cancelled"].as_numpy().tolist() == [True]
    assert "request_id is required" in out[2].error.message() and "longer than" in out[3].error.message()
    assert "UTF-8" in out[4].error.message()
    ctx = RequestContext()
    assert ctx.is_cancelled("req-1") and ctx.is_cancelled(hostile) and not ctx.is_cancelled("req-2")
    names = sorted(p.name for p in ctx_root.iterdir())
    assert len(names) == 2 and all(n.endswith(".cancelled") and len(n) == 40 + len(".cancelled") for n in names)
    ctx.clear_cancel("req-1")
    assert not ctx.is_cancelled("req-1")


def test_cancel_config_is_a_plain_python_model_on_both_targets():
    for target in ("cpu", "gpu"):
        cfg = configs.all_configs(configs.RepoSpec(**{**SPEC.__dict__, "target": target,
                                                       "prompt_table_extra_ids": True}))[configs.CANCEL]
        assert cfg.backend == "python" and not cfg.model_transaction_policy.decoupled
        assert [(i.name, i.data_type, list(i.dims)) for i in cfg.input] == [("request_id", configs.T.TYPE_STRING, [1])]
        assert not cfg.HasField("dynamic_batching")  # never rejected as overload
    assert configs.CANCEL not in configs.STAGES  # not an ensemble step


def test_decoder_probe_reads_the_mark_and_the_end_clears_it(ctx_root):
    decoder = fake_pb.import_model("decoder").TritonPythonModel
    ctx = RequestContext()
    mine, other = fake_pb.Request({}, request_id="mine"), fake_pb.Request({}, request_id="other")
    probe = decoder._cancelled(mine, mine.sender, ctx)
    other_probe = decoder._cancelled(other, other.sender, ctx)
    assert not probe() and not other_probe()
    ctx.cancel("mine")
    assert probe() and not other_probe()
    anonymous = fake_pb.Request({})
    assert not decoder._cancelled(anonymous, anonymous.sender, ctx)()  # no id (perf_analyzer): no mark to read
    running = RunningRequests("decoder")
    running.add(2)  # what execute counts for the two requests
    decoder._emitter(mine.sender, ctx, "mine", running)([4], False)  # a token: still generating
    assert running.n == 1 + 1
    decoder._emitter(mine.sender, ctx, "mine", running)([5, 6], True)  # the request's last response
    assert not probe() and not ctx.is_cancelled("mine") and running.n == 1
    ctx.cancel("other")
    decoder._on_error(other.sender, ctx, "other", running)(RuntimeError("stopped"))
    assert not ctx.is_cancelled("other") and running_requests(0, ctx.root) == {"decoder": 0}
    other.sender.cancelled = True  # a direct-stream cancellation still counts
    assert other_probe()


# ------------------------------------------------------------------------------------------------ integration


def _cancel_line(server, request_id: str, timeout: float = 60.0) -> str:
    needle = f"(request id {request_id!r})"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = [x for x in server.log_tail(400).splitlines() if needle in x and "cancelled by the client" in x]
        if lines:
            return lines[-1]
        time.sleep(0.2)
    raise AssertionError(f"no decoder cancellation for {request_id} in the server log")


def _tokens(line: str) -> tuple[int, int]:
    """(tokens generated, max_tokens) from the decoder's "cancelled by the client after N of at most M" line."""
    words = line.split(" after ")[1].split()
    return int(words[0]), int(words[4])


@pytest.mark.integration
def test_a_cancel_sent_first_stops_the_request_in_the_decoder(server, client, speech_bytes):
    """Deterministic half: the mark is set before the request runs; the decoder, inside the real ensemble, stops it
    at its first check and the client gets the cancellation as the request's error."""
    rid = f"pre-cancelled-{uuid.uuid4().hex}"
    assert send_cancel(server.grpc_url, rid)
    with pytest.raises(AF3Error, match="cancelled"):
        client.ask("Tell a long story.", [speech_bytes], max_tokens=LONG, stream=True, request_id=rid)
    n, most = _tokens(_cancel_line(server, rid))
    assert most == LONG and n <= 2
    assert not send_cancel(server.grpc_url, rid, model="no_such_model")  # an older repository: logged, no raise


@pytest.mark.integration
def test_closing_the_stream_stops_the_decoder_and_the_other_request_completes(server, client, speech_bytes):
    rid = f"closed-early-{uuid.uuid4().hex}"
    other: dict = {}

    def run_other():
        other["answer"] = client.ask("What is said?", [speech_bytes], max_tokens=MAX_TOKENS, stream=True)

    it = client.responses(Request("Tell a long story.", [speech_bytes], max_tokens=LONG, stream=True, request_id=rid))
    first = next(it)
    t = threading.Thread(target=run_other)
    t.start()
    it.close()  # stop_stream(cancel_requests=True), then the cancel model
    n, most = _tokens(_cancel_line(server, rid))
    t.join(120)
    assert len(first.token_ids) == 1 and most == LONG and n < LONG
    assert len(other["answer"].token_ids) == MAX_TOKENS


@pytest.mark.integration
def test_leaving_the_async_client_early_stops_the_decoder(server, speech_bytes):
    import asyncio

    from af3trt.runtime.client.library import AsyncAF3Client

    rid = f"async-closed-early-{uuid.uuid4().hex}"

    async def run():
        it = AsyncAF3Client(server.grpc_url, timeout=120).responses(
            Request("Tell a long story.", [speech_bytes], max_tokens=LONG, stream=True, request_id=rid))
        first = await it.__anext__()
        await it.aclose()  # cancels the call, then sends the cancel
        return first

    first = asyncio.run(run())
    n, most = _tokens(_cancel_line(server, rid))
    assert len(first.token_ids) == 1 and most == LONG and n < LONG


# ------------------------------------------------------------------ GPU target: the stop request to tensorrtllm

# the parameters the 1.2 backend reads without a default (guided decoding off), as build/gpu_repo.py writes them
GPU_SPEC = configs.RepoSpec(**{**SPEC.__dict__, "target": "gpu", "prompt_table_extra_ids": True, "decoder_params": {
    **SPEC.decoder_params, "tokenizer_dir": "", "xgrammar_tokenizer_info_path": "", "guided_decoding_backend": ""}})


@pytest.fixture
def trtllm(monkeypatch):
    """The GPU decoder as the tensorrtllm backend behind Triton's validation (tests/fakes/trtllm_backend.py),
    reachable by BLS under its model name."""
    from fakes.trtllm_backend import FakeTrtllmDecoder

    decoder = FakeTrtllmDecoder(configs.decoder_config(GPU_SPEC))
    monkeypatch.setitem(fake_pb.BLS_MODELS, "decoder", decoder)
    return decoder


def _generate(decoder, request_id):
    """A request the ensemble's decoder step enqueues (same id as the af3 request)."""
    ids = np.array([[5, 6, 7]], np.int32)
    assert decoder(request_id, {"input_ids": ids, "input_lengths": np.array([[3]], np.int32),
                                "request_output_len": np.array([[LONG]], np.int32)}) == []
    assert decoder.generating(request_id)


def test_gpu_cancel_stops_the_running_request_in_the_tensorrtllm_decoder(ctx_root, trtllm):
    """On the GPU target the cancel model sends the decoder `stop` = true with the af3 request id; the backend
    cancels the executor requests of that id only (handleStopRequest), and the request is marked as on CPU."""
    model = fake_pb.load_model(configs.CANCEL, configs.cancel_config(GPU_SPEC))
    _generate(trtllm, "req-a")
    _generate(trtllm, "req-b")
    out = model.execute([_req(b"req-a")])
    assert not out[0].has_error() and out[0].outputs["cancelled"].as_numpy().tolist() == [True]
    assert trtllm.stop_requests == 1
    assert not trtllm.generating("req-a") and trtllm.generating("req-b")
    assert RequestContext().is_cancelled("req-a")
    # an id the decoder does not know (finished already, or not there yet) is no error for the backend
    assert not model.execute([_req(b"req-gone")])[0].has_error() and trtllm.generating("req-b")


def test_gpu_cancel_needs_the_decoder_to_declare_stop(ctx_root, trtllm):
    """Triton refuses an input the decoder's config does not declare: without `stop` in the GPU decoder config the
    stop request could never reach the backend, and the cancel answers that error for its request only."""
    assert any(i.name == "stop" and i.optional for i in trtllm.config.input)
    model = fake_pb.load_model(configs.CANCEL, configs.cancel_config(GPU_SPEC))
    _generate(trtllm, "req-a")
    del trtllm.config.input[[i.name for i in trtllm.config.input].index("stop")]
    out = model.execute([_req(b"req-a")])
    assert out[0].has_error() and "unexpected inference input 'stop'" in out[0].error.message()
    assert trtllm.generating("req-a")


def test_cpu_cancel_sends_no_stop_request(ctx_root, trtllm):
    """The CPU decoder reads the mark; only the GPU target's cancel model names a stop model."""
    assert "stop_model" not in configs.cancel_config(SPEC).parameters
    assert configs.cancel_config(GPU_SPEC).parameters["stop_model"].string_value == "decoder"
    model = fake_pb.load_model(configs.CANCEL, configs.cancel_config(SPEC))
    _generate(trtllm, "req-a")
    assert not model.execute([_req(b"req-a")])[0].has_error()
    assert trtllm.stop_requests == 0 and trtllm.generating("req-a")
