"""Several end ids (Qwen2.5-style generation_config): generation stops on any of them, as transformers' generate
does, on the CPU decoder and through the real ensemble on tritonserver; TensorRT-LLM's stop_words_list format."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from af3trt.runtime.stages.stop_words import (StopWordsError, end_and_stop_ids, ends_with_stop_word, parse_stop_words_list,
                                       stop_words_list, trim_stop_token)

PROMPT = "Describe the sound."
MAX_NEW = 24


def test_stop_words_list_format_round_trips():
    """TensorRT-LLM's [2, L] layout: ids concatenated, exclusive end offsets padded with -1."""
    arr = stop_words_list([[5], [7, 8], [9]])
    assert arr.tolist() == [[5, 7, 8, 9], [1, 3, 4, -1]] and arr.dtype == np.int32
    assert parse_stop_words_list(arr[None]) == ((5,), (7, 8), (9,))
    assert end_and_stop_ids([11, 12, 11]) == (11, [12])
    assert ends_with_stop_word([1, 7, 8], [(7, 8)]) and not ends_with_stop_word([8], [(7, 8)])
    assert trim_stop_token(np.array([3, 4, 12]), [12]).tolist() == [3, 4]
    assert trim_stop_token(np.array([3, 12, 4]), [12]).tolist() == [3, 12, 4]
    with pytest.raises(StopWordsError):
        parse_stop_words_list(np.array([[5, 6], [2, 1]]))


def _chat_ids(processor, text):
    conv = [{"role": "user", "content": [{"type": "text", "text": text}]}]
    return processor.apply_chat_template(conv, tokenize=True, add_generation_prompt=True, return_dict=True,
                                         return_tensors="pt")


@pytest.fixture(scope="module")
def two_end_ids_ckpt(tiny_ckpt, ref, tmp_path_factory):
    """The tiny checkpoint with a generation_config naming two end ids, the second one a token its greedy answer
    reaches (found by generating with the first end id only): everything else is the tiny checkpoint, so the
    session's transformers model (conftest `ref`) is its model."""
    ckpt = tmp_path_factory.mktemp("two-eos") / "af3-tiny"
    shutil.copytree(tiny_ckpt, ckpt)
    gen_path = ckpt / "generation_config.json"
    gen = json.loads(gen_path.read_text())
    first = gen["eos_token_id"][0] if isinstance(gen["eos_token_id"], list) else gen["eos_token_id"]
    model = ref.model
    inputs = _chat_ids(ref.processor, PROMPT)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=first,
                             pad_token_id=first)
    answer = out[0, inputs["input_ids"].shape[1]:].tolist()
    # the first token that is not the end id and first appears at position >= 2: greedy reaches it mid-answer
    second = next(t for i, t in enumerate(answer) if i >= 2 and t != first and t not in answer[:i])
    gen["eos_token_id"] = [first, second]
    gen_path.write_text(json.dumps(gen))
    return ckpt, first, second


@pytest.fixture(scope="module")
def generate_ref(two_end_ids_ckpt, ref):
    """transformers' greedy answer with the checkpoint's own generation_config (stops on either end id): the
    session's model (same weights) generating with the generation_config read from the new checkpoint."""
    from transformers import AutoProcessor, GenerationConfig

    ckpt, first, second = two_end_ids_ckpt
    generation_config = GenerationConfig.from_pretrained(ckpt)
    inputs = _chat_ids(AutoProcessor.from_pretrained(ckpt), PROMPT)
    assert generation_config.eos_token_id == [first, second]
    with torch.no_grad():
        out = ref.model.generate(**inputs, generation_config=generation_config, max_new_tokens=MAX_NEW,
                                 do_sample=False)
    answer = out[0, inputs["input_ids"].shape[1]:].tolist()
    assert answer[-1] == second and len(answer) < MAX_NEW  # it did stop on the second end id
    return inputs, answer


def test_cpu_decoder_stops_on_every_end_id(two_end_ids_ckpt, generate_ref, tmp_path):
    """The CPU decoder with end_id + the other end ids as stop words: the tokens generate produced, the stop token
    kept (as TensorRT-LLM's executor keeps stop words); trimming it gives generate's answer minus its end token."""
    from af3trt.build.plan import inspect_checkpoint
    from af3trt.export.extract_lm import extract_language_model
    from af3trt.runtime.engines.decoder import DecoderEngine, GenerationRequest

    ckpt, first, second = two_end_ids_ckpt
    inputs, want = generate_ref
    info = inspect_checkpoint(ckpt)
    end_id, stop_ids = end_and_stop_ids(info.eos_ids)
    assert (end_id, stop_ids) == (first, [second])
    lm = tmp_path / "lm"
    extract_language_model(ckpt, lm)
    ids = inputs["input_ids"][0].numpy().astype(np.int32)
    with DecoderEngine(lm, max_batch_size=2) as eng:
        words = parse_stop_words_list(stop_words_list([i] for i in stop_ids))
        got = eng.generate(GenerationRequest(input_ids=ids, max_new_tokens=MAX_NEW, end_id=end_id,
                                             stop_words=words))
        assert got == want  # stop token included, like output_ids of the tensorrtllm backend
        streamed = eng.generate(GenerationRequest(input_ids=ids, max_new_tokens=MAX_NEW, end_id=end_id,
                                                  stop_words=words, streaming=True))
        assert streamed == want
        only_end = eng.generate(GenerationRequest(input_ids=ids, max_new_tokens=MAX_NEW, end_id=end_id))
        assert len(only_end) > len(want)  # without the stop words it runs past the second end id (today's bug)
    assert trim_stop_token(np.array(got), stop_ids).tolist() == want[:-1]


@pytest.mark.integration
def test_ensemble_stops_on_the_second_end_id(two_end_ids_ckpt, generate_ref, tmp_path):
    """Through the real ensemble on tritonserver (CPU backends): the answer's token ids equal generate's minus the
    end token, streamed and not."""
    from af3trt.build.build_engines import BuildOptions, ServingConfig, build
    from af3trt.runtime.client.library import AF3Client
    from af3trt.runtime.serve.server import TritonServer
    from af3trt.triton_repo import configs

    ckpt, first, second = two_end_ids_ckpt
    _, want = generate_ref
    out = build(BuildOptions(hf_model=ckpt, out=tmp_path / "out",
                             serving=ServingConfig(max_audio_seconds=30, max_text_len=256, max_output_len=64)))
    fusion = configs.parse((out / "model_repository" / "fusion" / "config.pbtxt").read_text())
    assert fusion.parameters["stop_ids"].string_value == str(second)
    with TritonServer(out / "model_repository", log_path=out / "tritonserver.log") as srv:
        client = AF3Client(srv.grpc_url, timeout=120)
        got = client.ask(PROMPT, [], max_tokens=MAX_NEW, stream=False)
        streamed = client.ask(PROMPT, [], max_tokens=MAX_NEW, stream=True)
    assert got.token_ids == want[:-1]
    assert streamed.token_ids == want[:-1]
