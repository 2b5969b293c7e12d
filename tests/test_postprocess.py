"""Detokenization: byte-exact against the tokenizers library, incremental UTF-8 for streams, AF3's prefix
stripping, and the postprocess adapter with the request context."""

from __future__ import annotations

import numpy as np
import pytest
from tokenizers import Tokenizer

from af3trt.runtime.triton.context import RequestContext
from af3trt.runtime.stages.detok import Detokenizer, StreamState, split_utf8, strip_transcription_prefix
from af3trt.triton_repo import configs

from fakes import pb_utils as fake_pb


@pytest.fixture(scope="module")
def tok(tiny_ckpt):
    return Tokenizer.from_file(str(tiny_ckpt / "tokenizer.json"))


def test_decode_equals_tokenizers(tiny_ckpt, tok):
    detok = Detokenizer(tiny_ckpt / "tokenizer.json")
    rng = np.random.default_rng(0)
    for _ in range(50):
        ids = rng.integers(0, tok.get_vocab_size(), 30).tolist()
        assert detok.decode(ids) == tok.decode(ids, skip_special_tokens=True)
    text = "Größe: 10 °C — naïve café, 日本語 🎵 <|im_end|>"
    ids = tok.encode(text).ids
    assert detok.decode(ids, skip_special=False) == text
    assert detok.decode(ids + [10**6, tok.get_vocab_size() + 5]) == tok.decode(ids, skip_special_tokens=True)


def test_split_utf8_keeps_incomplete_tails():
    data = "aé日🎵".encode()
    for cut in range(len(data) + 1):
        done, tail = split_utf8(data[:cut])
        done.decode("utf-8")  # raises if a character was cut
        assert done + tail == data[:cut]
        assert len(tail) <= 3


def test_stream_reassembles_multibyte_text(tiny_ckpt, tok):
    detok = Detokenizer(tiny_ckpt / "tokenizer.json")
    text = "naïve café 日本語 🎵 end"
    ids = tok.encode(text).ids
    state = StreamState()
    out = [state.feed(detok.to_bytes([i]), final=False) for i in ids]
    out.append(state.feed(b"", final=True))
    assert "".join(out) == text
    assert all("\ufffd" not in piece for piece in out)


@pytest.mark.parametrize("answer", [
    'The spoken content of the audio is "hello world, this is a test".',
    "The transcription of the audio is 'yes'.",
    "The content of the input audio is birds singing.",
    "A dog barks twice.",
    "The spoken content",
])
def test_streamed_strip_equals_whole_strip(answer):
    whole = strip_transcription_prefix(answer)
    for step in (1, 3, 7):
        state = StreamState(strip_prefix=True)
        pieces = [state.feed(answer[i:i + step].encode(), final=False) for i in range(0, len(answer), step)]
        pieces.append(state.feed(b"", final=True))
        assert "".join(pieces) == whole, (answer, step)
    assert strip_transcription_prefix('The spoken content of the audio is "hi".') == "hi"


def test_context_roundtrip(tmp_path):
    ctx = RequestContext(tmp_path)
    ctx.put("req-1", {"notices": ["x"], "stream": True})
    assert ctx.get("req-1") == {"notices": ["x"], "stream": True}
    ctx.drop("req-1")
    assert ctx.get("req-1") == {}
    ctx.put("", {"a": 1})  # no request id: nothing stored
    assert list(tmp_path.iterdir()) == []


def test_context_survives_its_root_being_removed(tmp_path):
    """The root is made once, not per put: a put after it was removed makes it again; no temporary file is left."""
    import shutil

    root = tmp_path / "ctx"
    ctx = RequestContext(root)
    ctx.put("a", {"k": 1})
    shutil.rmtree(root)
    ctx.put("b", {"k": 2})
    ctx.update("b", extra=3)
    assert ctx.get("b") == {"k": 2, "extra": 3} and ctx.get("a") == {}
    assert [p.name for p in root.iterdir()] == [ctx._path("b").name]


def _postprocess(tiny_ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr("af3trt.runtime.triton.context.default_root", lambda: tmp_path)
    spec = configs.RepoSpec(target="cpu", hidden_size=64, decoder_dtype="float32", vocab_size=704, end_id=642,
                            pad_id=640, postprocess_params={"tokenizer_dir": str(tiny_ckpt)})
    return configs.postprocess_config(spec), fake_pb.load_model("postprocess", configs.postprocess_config(spec))


def _resp(ids):
    a = np.asarray(ids, np.int32).reshape(1, 1, -1)
    return {"output_ids": a, "sequence_length": np.array([[a.shape[-1]]], np.int32)}


def test_postprocess_adapter_streams_and_reports_notices(tiny_ckpt, tok, tmp_path, monkeypatch):
    cfg, model = _postprocess(tiny_ckpt, tmp_path, monkeypatch)
    RequestContext(tmp_path).put("r1", {"stream": True, "notices": ["audio clip 0: truncated"]})
    ids = tok.encode("café 日本").ids
    outs = [model.execute([fake_pb.Request(_resp([i]), "r1")])[0] for i in ids]
    outs.append(model.execute([fake_pb.Request(_resp([]), "r1")])[0])  # TRT-LLM's empty final response
    assert {o.name for o in cfg.output} == set(outs[0].outputs)
    text = "".join(bytes(o.outputs["text_output"].as_numpy()[0]).decode() for o in outs)
    assert text == "café 日本"
    notices = [bytes(o.outputs["notice"].as_numpy()[0]).decode() for o in outs]
    assert notices[0] == '["audio clip 0: truncated"]' and set(notices[1:]) == {""}
    assert [int(x) for o in outs for x in o.outputs["output_ids"].as_numpy()] == ids


def test_postprocess_adapter_strips_whole_answers(tiny_ckpt, tok, tmp_path, monkeypatch):
    _, model = _postprocess(tiny_ckpt, tmp_path, monkeypatch)
    RequestContext(tmp_path).put("r2", {"stream": False, "strip_prefix": True})
    ids = tok.encode('The spoken content of the audio is "hello world".').ids
    (out,) = model.execute([fake_pb.Request(_resp(ids), "r2")])
    assert bytes(out.outputs["text_output"].as_numpy()[0]).decode() == "hello world"
    (plain,) = model.execute([fake_pb.Request(_resp(ids), "")])  # no id (perf_analyzer): defaults, no stripping
    assert bytes(plain.outputs["text_output"].as_numpy()[0]).decode().startswith("The spoken content")


@pytest.mark.parametrize("end", ["end_id", "max_tokens"])
def test_postprocess_adapter_streams_stripped_answers(tiny_ckpt, tok, tmp_path, monkeypatch, end):
    """strip_prefix on a stream: the text joined from its responses is the stripped whole answer. The last response
    is recognised as empty (the request ended on its end id) or as the one that reaches max_tokens (from fusion)."""
    _, model = _postprocess(tiny_ckpt, tmp_path, monkeypatch)
    answer = 'The spoken content of the audio is "hello world, café".'
    ids = tok.encode(answer).ids
    ctx = {"stream": True, "strip_prefix": True, "max_tokens": len(ids) if end == "max_tokens" else len(ids) + 5}
    RequestContext(tmp_path).put("r3", ctx)
    outs = [model.execute([fake_pb.Request(_resp([i]), "r3")])[0] for i in ids]
    if end == "end_id":
        outs.append(model.execute([fake_pb.Request(_resp([]), "r3")])[0])
    text = "".join(bytes(o.outputs["text_output"].as_numpy()[0]).decode() for o in outs)
    assert text == strip_transcription_prefix(answer) == "hello world, café"
    assert model.states == {}  # the stream's state is gone with its last response


def test_postprocess_drops_stale_streams_at_most_every_purge_interval(tiny_ckpt, tok, tmp_path, monkeypatch):
    """A stream whose responses stopped coming is dropped once stale; the scan over held streams runs at most once
    per PURGE_EVERY_S, not on every response."""
    import time

    from af3trt.runtime.triton.context import STALE_SECONDS

    _, model = _postprocess(tiny_ckpt, tmp_path, monkeypatch)
    for rid in ("old", "live"):
        RequestContext(tmp_path).put(rid, {"stream": True, "max_tokens": 100})
        model.execute([fake_pb.Request(_resp(tok.encode("a").ids), rid)])
    t, state, ctx = model.states["old"]
    model.states["old"] = (t - STALE_SECONDS - 1, state, ctx)  # its last response long ago
    model.execute([fake_pb.Request(_resp(tok.encode("b").ids), "live")])
    assert "old" in model.states  # purged at most every PURGE_EVERY_S: the first execute just scanned
    model._next_purge = time.monotonic() - 1  # the interval has passed
    model.execute([fake_pb.Request(_resp(tok.encode("c").ids), "live")])
    assert "old" not in model.states and "live" in model.states
    assert fake_pb.import_model("postprocess").PURGE_EVERY_S <= 60  # stale streams still go within a minute
