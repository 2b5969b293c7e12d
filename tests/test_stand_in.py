"""The serving-path benchmark's stand-ins (runtime/engines/stand_in.py): the decoder's request pattern at no model cost, and a
repository built with --stand-in-tokens-per-s that runs them in place of ONNX Runtime and the CPU decoder."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from af3trt.runtime.engines.decoder import DecodeError, GenerationRequest
from af3trt.runtime.engines.stand_in import StandInDecoder, StandInEncoder


def _lm(tmp_path, eos=(40, 41)):
    (tmp_path / "config.json").write_text(f'{{"vocab_size": 500, "hidden_size": 8, "eos_token_id": {list(eos)}}}')
    return tmp_path


def test_stand_in_decoder_streams_deterministic_tokens_to_max(tmp_path):
    with StandInDecoder(_lm(tmp_path), tokens_per_s=2000.0, max_batch_size=2) as eng:
        ids = np.arange(5, 12, dtype=np.int32)
        whole = eng.generate(GenerationRequest(input_ids=ids, max_new_tokens=70, end_id=40))
        assert len(whole) == 70 and not {40, 41} & set(whole)  # never an end id: runs to max_new_tokens
        assert eng.generate(GenerationRequest(input_ids=ids, max_new_tokens=70)) == whole  # deterministic
        other = eng.generate(GenerationRequest(input_ids=ids + 1, max_new_tokens=70))
        assert other != whole and sorted(set(other)) == sorted(set(whole))
        calls, done = [], threading.Event()
        eng.submit(GenerationRequest(input_ids=ids, max_new_tokens=4, streaming=True),
                   lambda new, final: (calls.append((new, final)), final and done.set()))
        assert done.wait(10)
        assert calls == [([t], i == 3) for i, t in enumerate(whole[:4])]  # one token per response, last final
        with pytest.raises(DecodeError, match="max_new_tokens"):
            eng.submit(GenerationRequest(input_ids=ids, max_new_tokens=0), lambda *a: None)


def test_stand_in_decoder_paces_its_steps(tmp_path):
    """R steps per second: 20 tokens at 200/s take about 0.1 s, never less than 19 intervals."""
    import time

    with StandInDecoder(_lm(tmp_path), tokens_per_s=200.0) as eng:
        t0 = time.monotonic()
        eng.generate(GenerationRequest(input_ids=np.array([1], np.int32), max_new_tokens=20))
        assert time.monotonic() - t0 >= 19 / 200.0


def test_stand_in_encoder_shapes():
    out = StandInEncoder(16).run(np.zeros((3, 128, 400), np.float32), np.ones((3, 400), np.int32))
    assert out.shape == (3, 100, 16) and out.dtype == np.float32


def test_the_build_flag_renders_the_stand_ins(tiny_ckpt, tmp_path):
    from af3trt.build import build_engines
    from af3trt.build.common import BuildError
    from af3trt.build.plan import make_plan

    argv = ["--hf-model", str(tiny_ckpt), "--out", str(tmp_path / "o"), "--stand-in-tokens-per-s", "250"]
    plan = make_plan(build_engines.options_from_args(build_engines.parser().parse_args(argv)))
    lm = {"dtype": plan.checkpoint.dtype, "vocab_size": plan.checkpoint.vocab_size}
    spec = build_engines.cpu_repo_spec(plan, lm, "artifacts/encoder.onnx")
    assert spec.decoder_params["stand_in_tokens_per_s"] == 250.0  # typed: the record renders it
    assert spec.encoder_params["stand_in_hidden_size"] == plan.checkpoint.text_hidden_size
    real = build_engines.cpu_repo_spec(make_plan(build_engines.options_from_args(
        build_engines.parser().parse_args(argv[:4]))), lm, "artifacts/encoder.onnx")
    assert not real.decoder_params.get("stand_in_tokens_per_s") and "stand_in_hidden_size" not in real.encoder_params
    with pytest.raises(BuildError, match="CPU target"):
        make_plan(build_engines.options_from_args(build_engines.parser().parse_args(
            argv + ["--target", "gpu", "--gpu", "h100"])))


def test_the_stand_in_decoder_model_answers_and_counts_its_requests(tiny_ckpt, tmp_path, monkeypatch):
    """The decoder adapter with the stand-in engine answers a streamed request through the response sender, and
    keeps the running-requests count the supervisor's drain reads (once missing on this path: every request failed
    with AttributeError 'running')."""
    import time

    from af3trt.build import build_engines
    from af3trt.build.plan import make_plan
    from af3trt.runtime.triton import context
    from af3trt.triton_repo import configs

    from fakes import pb_utils as fake_pb

    monkeypatch.setattr(context, "default_root", lambda: tmp_path / "ctx")
    argv = ["--hf-model", str(tiny_ckpt), "--out", str(tmp_path / "o"), "--stand-in-tokens-per-s", "2000"]
    plan = make_plan(build_engines.options_from_args(build_engines.parser().parse_args(argv)))
    lm = {"dtype": plan.checkpoint.dtype, "vocab_size": plan.checkpoint.vocab_size}
    spec = build_engines.cpu_repo_spec(plan, lm, "artifacts/encoder.onnx")
    spec.decoder_params["gpt_model_path"] = str(tiny_ckpt)  # the stand-in reads only config.json from it
    model = fake_pb.load_model("decoder", configs.decoder_config(spec), {"model_repository": str(tmp_path / "r")})
    req = fake_pb.Request({"input_ids": np.array([[5, 6, 7]], np.int32), "input_lengths": np.array([[3]], np.int32),
                           "request_output_len": np.array([[3]], np.int32), "streaming": np.array([[True]])},
                          request_id="r1")
    try:
        model.execute([req])
        deadline = time.monotonic() + 30
        while not any(flags for _, flags in req.sender.sent) and time.monotonic() < deadline:
            time.sleep(0.01)
        errors = [r.error for r, _ in req.sender.sent if r is not None and r.error is not None]
        assert not errors, errors
        tokens = [int(t) for r, _ in req.sender.sent if r is not None for t in r.outputs["output_ids"].as_numpy().reshape(-1)]
        assert len(tokens) == 3
        assert context.running_requests(0, tmp_path / "ctx") == {"decoder": 0}  # counted up, and down at the end
    finally:
        model.finalize() if hasattr(model, "finalize") else model.engine.stop()


def test_stand_in_decoder_bounds_its_queue_and_answers_every_request_at_stop(tmp_path):
    """The stand-in runs on the CPU decoder's skeleton (runtime/engines/decoder.py BatchingEngine): past
    max_queue_size a request is refused busy, and stop answers the running request and the queued one (the stand-in's
    own copy of the worker loop once left a queued request unanswered at stop)."""
    from af3trt.runtime.engines.decoder import ServerBusy

    eng = StandInDecoder(_lm(tmp_path), tokens_per_s=2000.0, max_batch_size=1, max_queue_size=1)
    held, release = threading.Event(), threading.Event()
    errors = {"a": threading.Event(), "b": threading.Event()}
    got = {}

    def hold(new, final):  # on the worker: its first token holds the worker (and so the queue) here
        if not held.is_set():
            held.set()
            assert release.wait(30)
            eng.stop()  # from the worker: does not wait

    def failed(name):
        return lambda exc: (got.setdefault(name, exc), errors[name].set())

    ids = np.array([1, 2, 3], np.int32)
    eng.submit(GenerationRequest(input_ids=ids, max_new_tokens=50, streaming=True), hold, failed("a"))
    assert held.wait(30)
    eng.submit(GenerationRequest(input_ids=ids, max_new_tokens=5), lambda *a: None, failed("b"))  # waits
    with pytest.raises(ServerBusy, match="server busy"):
        eng.submit(GenerationRequest(input_ids=ids, max_new_tokens=5), lambda *a: None)
    assert eng.stats["busy"] == 1
    release.set()
    assert errors["a"].wait(30) and errors["b"].wait(30)
    assert all(isinstance(got[k], DecodeError) and "stopped" in str(got[k]) for k in "ab")
    eng.stop()
    with pytest.raises(DecodeError, match="stopped"):
        eng.submit(GenerationRequest(input_ids=ids, max_new_tokens=5), lambda *a: None)
