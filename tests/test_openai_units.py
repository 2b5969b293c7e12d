"""Unit tests (no server) for the OpenAI front end's own logic, and the prompt length it reports as usage:
fusion records it in the request context, postprocess returns it with every response."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from fakes import pb_utils as fake_pb
from af3trt.runtime.audio import prepare_clips
from af3trt.runtime.context import RequestContext
from af3trt.runtime.openai_server import APIError, ChatRequest, EnsembleInfo, StopScanner, build_job
from af3trt.triton_repo import configs

INFO = EnsembleInfo(inputs=frozenset({"text_input", "messages", "audio"}), models=("af3",), default_max_tokens=16,
                    max_output_len=64, max_audio_seconds=600.0)


@pytest.mark.parametrize("stops,pieces,want", [
    (["END"], ["hello E", "N", "D more"], "hello "),
    (["xy", "b"], ["a", "xa", "ab"], "axaa"),
    ([], ["a", "b"], None),
    (["zz"], ["abc", "z"], None),  # never matched: everything comes out, the held 'z' at the end
])
def test_stop_scanner_cuts_at_the_first_stop(stops, pieces, want):
    scan = StopScanner(stops)
    out = "".join(scan.feed(p) for p in pieces)
    if want is None:
        assert not scan.stopped and out + scan.flush() == "".join(pieces)
    else:
        assert scan.stopped and out == want


def test_build_job_maps_parts_and_roles(speech_bytes):
    audio = {"type": "input_audio", "input_audio": {"data": base64.b64encode(speech_bytes).decode(), "format": "flac"}}
    req = ChatRequest(model="af3", max_completion_tokens=9, messages=[
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [audio, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "Speech."},
        {"role": "user", "content": [{"type": "text", "text": "And this?"}, audio]}])
    job = build_job(req, INFO)
    assert job.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "audio", "audio_index": 0}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "Speech."},
        {"role": "user", "content": [{"type": "text", "text": "And this?"}, {"type": "audio", "audio_index": 1}]}]
    assert list(job.audio) == [speech_bytes, speech_bytes] and job.max_tokens == 9
    default = build_job(ChatRequest(model="af3", messages=[{"role": "user", "content": "hi"}]), INFO)
    assert default.max_tokens == INFO.default_max_tokens  # known, so finish_reason "length" can be told apart


def test_build_job_without_messages_input_takes_one_turn():
    old = EnsembleInfo(**{**INFO.__dict__, "inputs": frozenset({"text_input", "system_prompt", "audio"})})
    job = build_job(ChatRequest(model="af3", messages=[{"role": "system", "content": "S"},
                                                       {"role": "user", "content": "Q"}]), old)
    assert (job.prompt, job.system_prompt, job.messages) == ("Q", "S", None)
    with pytest.raises(APIError, match="messages"):
        build_job(ChatRequest(model="af3", messages=[{"role": "user", "content": "Q"},
                                                     {"role": "assistant", "content": "A"},
                                                     {"role": "user", "content": "Q2"}]), old)


@pytest.mark.parametrize("part,needle", [
    ({"data": "%%%", "format": "wav"}, "base64"),
    ({"data": base64.b64encode(b"x").decode(), "format": "aac"}, "format"),
    ({"data": "", "format": "wav"}, "empty"),
])
def test_bad_audio_parts_are_400(part, needle):
    req = ChatRequest(model="af3", messages=[{"role": "user", "content": [{"type": "input_audio",
                                                                          "input_audio": part}]}])
    with pytest.raises(APIError, match=needle) as e:
        build_job(req, INFO)
    assert e.value.status == 400


def test_n_above_one_is_refused():
    with pytest.raises(APIError, match="n=3"):
        build_job(ChatRequest(model="af3", n=3, messages=[{"role": "user", "content": "hi"}]), INFO)


def test_prompt_tokens_travel_from_fusion_to_postprocess(tiny_ckpt, speech_bytes, tmp_path, monkeypatch):
    monkeypatch.setattr("af3trt.runtime.context.default_root", lambda: tmp_path)
    spec = configs.RepoSpec(target="cpu", hidden_size=64, decoder_dtype="float32", vocab_size=704, end_id=642,
                            pad_id=640, max_input_len=2048, max_output_len=64, default_max_tokens=16,
                            fusion_params={"tokenizer_dir": str(tiny_ckpt)},
                            postprocess_params={"tokenizer_dir": str(tiny_ckpt)})
    fusion = fake_pb.load_model("fusion", configs.fusion_config(spec))
    post = fake_pb.load_model("postprocess", configs.postprocess_config(spec))
    batch = prepare_clips([speech_bytes])
    embeds = np.zeros((1, 750, spec.hidden_size), np.float32)
    RequestContext(tmp_path).put("r1", {"stream": True})  # what preprocess writes first
    (resp,) = fusion.execute([fake_pb.Request({"text_input": np.array([b"What is said?"], object),
                                               "audio_embeds": embeds, "input_features_mask": batch.mask,
                                               "audio_windows": np.array([1], np.int32),
                                               "stream": np.array([True])}, "r1")])
    n_prompt = int(resp.outputs["input_lengths"].as_numpy()[0, 0])
    assert n_prompt > batch.tokens_per_clip[0]  # text + audio tokens

    def out(ids, rid):
        a = np.asarray(ids, np.int32).reshape(1, 1, -1)
        (r,) = post.execute([fake_pb.Request({"output_ids": a, "sequence_length": np.array([[a.shape[-1]]], np.int32)},
                                             rid)])
        return int(r.outputs["prompt_tokens"].as_numpy()[0])

    assert [out([5], "r1"), out([6], "r1"), out([], "r1")] == [n_prompt] * 3
    assert out([5], "") == -1  # no request id (perf_analyzer): unknown, said so
