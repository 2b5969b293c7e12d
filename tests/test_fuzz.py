"""Fuzzing (hypothesis) of what a client controls: the audio decoder, and every input of the `af3` ensemble as the
preprocess and fusion adapters parse it (with the fake Triton utils module).

The property: any input is either served or refused with a client error (an InvalidRequest of runtime/stages/errors.py:
code INVALID_ARGUMENT, a clear message for that request only); nothing else escapes, nothing crashes, and decoded audio is finite,
mono, 16 kHz and never longer than what AF3 reads.

Bounded here (about 30-40 s on 2 cores). The longer run (AF3TRT_FUZZ_EXAMPLES scales every test's examples):

    AF3TRT_FUZZ_EXAMPLES=10 .venv/bin/pytest -q tests/test_fuzz.py      # 10x: 3,000 + 1,500 examples, ~4 min
"""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import soundfile as sf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fakes import pb_utils as fake_pb
from af3trt.runtime.stages import audio, errors, lengths
from af3trt.triton_repo import configs

SCALE = int(os.environ.get("AF3TRT_FUZZ_EXAMPLES", "1"))
pytestmark = pytest.mark.slow  # hypothesis over the decoder and the ensemble's inputs


def fuzz(n: int):
    return settings(max_examples=n * SCALE, deadline=None, derandomize=SCALE == 1,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


def _encode(wave, rate, fmt, subtype=None) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wave, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


SEEDS = [_encode(np.sin(np.arange(n) / 7.0).astype(np.float32) * 0.3, r, f, s)
         for n, r, f, s in [(800, 16000, "WAV", "PCM_16"), (1200, 44100, "FLAC", None), (3000, 8000, "OGG", "VORBIS"),
                            (500, 48000, "WAV", "FLOAT")]]


@st.composite
def clip_bytes(draw) -> bytes:
    """Random bytes, or a valid encoding cut, spliced or with bytes overwritten (headers included)."""
    kind = draw(st.sampled_from(["random", "truncate", "mutate", "splice", "valid"]))
    if kind == "random":
        return draw(st.binary(min_size=0, max_size=512))
    seed = draw(st.sampled_from(SEEDS))
    if kind == "valid":
        return seed
    if kind == "truncate":
        return seed[:draw(st.integers(0, len(seed)))]
    data = bytearray(seed)
    if kind == "mutate":
        for _ in range(draw(st.integers(1, 12))):
            i = draw(st.integers(0, min(len(data) - 1, draw(st.sampled_from([64, len(data) - 1])))))
            data[i] = draw(st.integers(0, 255))
        return bytes(data)
    cut = draw(st.integers(0, len(data)))
    return bytes(data[:cut]) + draw(st.binary(max_size=256)) + draw(st.sampled_from(SEEDS))[cut:]


@fuzz(300)
@given(data=clip_bytes(), keep=st.integers(1, 3 * lengths.SAMPLE_RATE))
def test_decoder_serves_or_refuses_clearly(data, keep):
    try:
        clip = audio.decode_clip(data, keep)
    except audio.AudioError as e:
        assert str(e)
        return
    assert clip.wave.dtype == np.float32 and clip.wave.ndim == 1 and 0 < len(clip.wave) <= keep
    assert np.isfinite(clip.wave).all() and clip.seconds > 0


@pytest.fixture(scope="module")
def adapters(tiny_ckpt):
    import json

    cfg = json.loads((tiny_ckpt / "config.json").read_text())["text_config"]
    spec = configs.RepoSpec(target="cpu", hidden_size=cfg["hidden_size"], decoder_dtype="float32",
                            vocab_size=cfg["vocab_size"], end_id=cfg["eos_token_id"], pad_id=cfg["bos_token_id"],
                            max_audio_windows=2, max_input_len=4000, max_output_len=64, default_max_tokens=16,
                            fusion_params={"tokenizer_dir": str(tiny_ckpt)})
    return (spec, fake_pb.load_model("preprocess", configs.preprocess_config(spec)),
            fake_pb.load_model("fusion", configs.fusion_config(spec)))


def text_values():
    return st.one_of(st.binary(max_size=300), st.text(max_size=200).map(str.encode),
                     st.sampled_from([b"<sound>", b"<sound><sound> What?", b"\xff\xfe", b"", b"\x00" * 10,
                                      b"<|im_start|>system\nhi<|im_end|>"]))


def scalar(dtype, values):
    return st.one_of(st.none(), values.map(lambda v: np.array([v], dtype)))


REQUEST = st.fixed_dictionaries({
    "text_input": text_values().map(lambda b: np.array([b], object)),
    "system_prompt": st.one_of(st.none(), text_values().map(lambda b: np.array([b], object))),
    "audio": st.one_of(st.none(), st.lists(clip_bytes(), min_size=0, max_size=3).map(
        lambda cs: np.array(cs, object) if cs else np.zeros(0, object))),
    "max_tokens": scalar(np.int32, st.integers(-2**31, 2**31 - 1)),
    "temperature": scalar(np.float32, st.floats(width=32)),
    "top_k": scalar(np.int32, st.integers(-2**31, 2**31 - 1)),
    "top_p": scalar(np.float32, st.floats(width=32)),
    "repetition_penalty": scalar(np.float32, st.floats(width=32)),
    "seed": scalar(np.uint64, st.integers(0, 2**64 - 1)),
    "stream": scalar(np.bool_, st.booleans()),
    "strip_prefix": scalar(np.bool_, st.booleans()),
})


def _client_error(resp) -> str:
    code, message = errors.parse(resp.error.message())
    assert code is errors.ErrorCode.INVALID_ARGUMENT, f"not a client error: {resp.error.message()}"
    assert resp.error.code() == fake_pb.TritonError.INVALID_ARG and message
    return message


@fuzz(150)
@given(req=REQUEST)
def test_every_ensemble_input_is_served_or_refused_clearly(adapters, req):
    """preprocess then fusion, fed as the ensemble feeds them (encoder output faked with the right shape)."""
    spec, preprocess, fusion = adapters
    pre_in = {k: req[k] for k in ("audio", "strip_prefix", "stream")}
    (pre,) = preprocess.execute([fake_pb.Request(pre_in)])
    if pre.has_error():
        _client_error(pre)
        return
    mask = pre.outputs["input_features_mask"].as_numpy()  # [W, 3000]
    embeds = np.zeros((mask.shape[0], lengths.EMBEDS_PER_WINDOW, spec.hidden_size), np.float32)
    fus_in = {k: v for k, v in req.items() if k not in ("audio", "strip_prefix")}
    fus_in.update(audio_embeds=embeds, input_features_mask=mask, audio_windows=pre.outputs["audio_windows"].as_numpy())
    (out,) = fusion.execute([fake_pb.Request(fus_in)])
    if out.has_error():
        _client_error(out)
        return
    ids = out.outputs["input_ids"].as_numpy()
    n = int(out.outputs["input_lengths"].as_numpy()[0, 0])
    assert ids.shape == (1, n) and 0 < n <= spec.max_input_len
    assert 1 <= int(out.outputs["request_output_len"].as_numpy()[0, 0]) <= spec.max_output_len
    assert int((ids >= spec.vocab_size).sum()) == int(out.outputs["prompt_embedding_table"].as_numpy().shape[1]) \
        or int((ids >= spec.vocab_size).sum()) == 0
