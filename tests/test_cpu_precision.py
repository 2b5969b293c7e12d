"""The CPU decoder's precisions (af3trt/registry.py CPU_DECODER_PRECISIONS): a build writes the language model in the
record's dtype and records it; each precision passes its own accuracy gate against transformers' fp32 AF3, on the
tiny and the `af3` presets (decoder head_dim 128); and a bf16 decoder answers exactly as transformers' AF3 with its
language model in bf16 (the encoder fp32, as af3trt's ONNX encoder).

The gate (the record's fields): the reference's fp32 greedy answer is fed back (teacher forcing) through the
extracted language model of the precision; at least min_agreement of the answer positions pick the reference's
token, every logit is within max_logit_error x the standard deviation of the reference's logits at its position, and
a free-running answer of the engine (runtime/engines/decoder.py) keeps the reference's first exact_prefix tokens.
"""

from __future__ import annotations

import copy
import json
import threading

import numpy as np
import pytest
import torch

from af3trt.export.extract_lm import extract_language_model
from af3trt.registry import CPU_DECODER_PRECISIONS, cpu_decoder_precision
from af3trt.runtime.engines.decoder import DecoderEngine, GenerationRequest, load_model

N_NEW = 24
PROMPTS = [("Describe the sound.", 3.0), ("Transcribe the input speech.", 7.0), ("What is the weather tomorrow?", None),
           ("Please summarize the conversation, list the instruments.", 5.0)]


def _inputs(processor, text: str, seconds: float | None, seed: int):
    content = [{"type": "text", "text": text}]
    if seconds:
        wav = (0.1 * np.random.default_rng(seed).standard_normal(int(16000 * seconds))).astype(np.float32)
        content.insert(0, {"type": "audio", "audio": wav})
    return processor.apply_chat_template([{"role": "user", "content": content}], tokenize=True,
                                         add_generation_prompt=True, return_dict=True, return_tensors="pt")


def _prompt(model, inputs, dtype: torch.dtype) -> tuple[np.ndarray, torch.Tensor | None]:
    """The decoder's view of a prompt: audio positions as vocab_size + row, the table (fp32 encoder) in `dtype`."""
    ids = inputs["input_ids"][0].numpy().astype(np.int32)
    audio = np.flatnonzero(ids == model.config.audio_token_id)
    if not audio.size:
        return ids, None
    with torch.no_grad():
        table = model.get_audio_features(inputs["input_features"], inputs["input_features_mask"]).pooler_output
    ids[audio] = model.config.text_config.vocab_size + np.arange(audio.size)
    return ids, table.to(dtype)


def _generate(model, inputs, end_id: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=N_NEW, do_sample=False, eos_token_id=end_id,
                             pad_token_id=end_id)
    tokens = out[0, inputs["input_ids"].shape[1]:].tolist()
    return tokens[:tokens.index(end_id)] if end_id in tokens else tokens


def _teacher_forced_logits(lm, ids: np.ndarray, table, answer: list[int]) -> torch.Tensor:
    """Logits [len(answer), V] of `lm` (a Qwen2ForCausalLM) predicting each answer token from the prompt and the
    answer before it."""
    vocab = lm.config.vocab_size
    full = torch.from_numpy(np.concatenate([ids, np.asarray(answer, dtype=np.int32)]).astype(np.int64))
    embed = lm.get_input_embeddings()
    with torch.no_grad():
        x = embed(full.clamp(max=vocab - 1))  # [T, H]
        if table is not None:
            rows = full >= vocab
            x[rows] = table[full[rows] - vocab].to(x.dtype)
        logits = lm(inputs_embeds=x[None]).logits[0].float()  # [T, V]
    return logits[len(ids) - 1:len(ids) - 1 + len(answer)]


def gate_figures(ref, lm_dir, dtype: torch.dtype, int8_linear: bool = False) -> dict:
    """The gate's figures of the language model in `lm_dir` against `ref` (transformers' AF3, fp32), over PROMPTS."""
    model, processor, end_id = ref.model, ref.processor, ref.end_id
    ours = load_model(lm_dir, int8_linear)
    assert ours.dtype == dtype
    ref_lm = copy.deepcopy(model.model.language_model)  # transformers' own decoder, fp32, with AF3's lm_head
    figures = {"agree": 0, "positions": 0, "max_logit_error": 0.0, "prefixes": [], "requests": []}
    for k, (text, seconds) in enumerate(PROMPTS):
        inputs = _inputs(processor, text, seconds, seed=k)
        answer = _generate(model, inputs, end_id)
        ids, table = _prompt(model, inputs, torch.float32)
        want = _reference_logits(model, ref_lm, ids, table, answer)
        got = _teacher_forced_logits(ours, ids, table, answer)
        figures["agree"] += int((got.argmax(-1) == want.argmax(-1)).sum())
        figures["positions"] += len(answer)
        err = ((got - want).abs().amax(-1) / want.std(-1)).max().item()
        figures["max_logit_error"] = max(figures["max_logit_error"], err)
        figures["requests"].append((ids, None if table is None else table.to(dtype), answer))
    figures["agreement"] = figures["agree"] / figures["positions"]
    return figures


def _reference_logits(model, ref_lm, ids, table, answer) -> torch.Tensor:
    """transformers' fp32 AF3 logits on the same teacher-forced sequence (its decoder and lm_head)."""
    class _Lm(torch.nn.Module):  # the Qwen2 body + AF3's lm_head, shaped like Qwen2ForCausalLM for the helper
        def __init__(self):
            super().__init__()
            self.config = model.config.text_config

        def get_input_embeddings(self):
            return ref_lm.get_input_embeddings()

        def forward(self, inputs_embeds):
            hidden = ref_lm(inputs_embeds=inputs_embeds).last_hidden_state
            return type("Out", (), {"logits": model.lm_head(hidden)})

    return _teacher_forced_logits(_Lm(), ids, table, answer)


def free_running_prefixes(lm_dir, figures: dict, end_id: int, int8_linear: bool = False) -> list[int]:
    """How many leading tokens of the engine's own greedy answer equal the reference's, per prompt."""
    out = []
    with DecoderEngine(lm_dir, max_batch_size=4, int8_linear=int8_linear) as eng:
        for ids, table, answer in figures["requests"]:
            got = eng.generate(GenerationRequest(input_ids=ids, prompt_table=table, max_new_tokens=N_NEW,
                                                 prompt_vocab_size=0 if table is None else table.shape[0],
                                                 end_id=end_id))
            out.append(next((i for i, (a, b) in enumerate(zip(got, answer)) if a != b), min(len(got), len(answer))))
    return out


def _check_gate(ref, tmp_path, name: str) -> dict:
    p = cpu_decoder_precision(name)
    ckpt = ref.model.name_or_path
    lm = extract_language_model(ckpt, tmp_path / f"lm-{name}", dtype=p.dtype)
    dtype = getattr(torch, lm["dtype"])
    figures = gate_figures(ref, tmp_path / f"lm-{name}", dtype, p.int8_linear)
    prefixes = free_running_prefixes(tmp_path / f"lm-{name}", figures, ref.end_id, p.int8_linear)
    answers = [len(a) for *_, a in figures["requests"]]
    print(f"{name}: agreement {figures['agreement']:.3f} over {figures['positions']} positions, max logit error "
          f"{figures['max_logit_error']:.4f} x std, free-running prefixes {prefixes} of {answers}")
    assert figures["agreement"] >= p.min_agreement
    assert figures["max_logit_error"] <= p.max_logit_error
    assert all(n >= min(p.exact_prefix, a) for n, a in zip(prefixes, answers))
    return figures


@pytest.fixture(scope="module")
def af3_ref(tmp_path_factory):
    """transformers' AF3 on the `af3` preset (37 M parameters, decoder head_dim 128), fp32."""
    from reference import Reference

    from af3trt.export.synth import write_checkpoint

    return Reference(write_checkpoint(tmp_path_factory.mktemp("ckpt-af3") / "af3", "af3", seed=0))


@pytest.mark.parametrize("name", ["fp32", "bf16", "int8_dyn"])
def test_gate_on_the_tiny_preset(ref, tmp_path, name):
    _check_gate(ref, tmp_path, name)


@pytest.mark.slow  # a 37 M-parameter checkpoint written, extracted and run in fp32 and the precision
@pytest.mark.parametrize("name", ["fp32", "bf16", "int8_dyn"])
def test_gate_on_the_af3_preset(af3_ref, tmp_path, name):
    _check_gate(af3_ref, tmp_path, name)


def test_bf16_gate_would_catch_a_wrong_cast(ref, tmp_path):
    """The gate fails a decoder that is not the checkpoint's: fp16-overflowing weights stand in for a bad cast."""
    lm = tmp_path / "lm-bad"
    extract_language_model(ref.model.name_or_path, lm, dtype="bfloat16")
    from safetensors.torch import load_file, save_file

    tensors = load_file(lm / "model.safetensors")
    for k in tensors:
        if k.endswith("o_proj.weight"):
            tensors[k] = -tensors[k]  # a wrong sign on every attention output: a plausible conversion bug
    save_file(tensors, lm / "model.safetensors", metadata={"format": "pt"})
    figures = gate_figures(ref, lm, torch.bfloat16)
    p = CPU_DECODER_PRECISIONS["bf16"]
    assert figures["agreement"] < p.min_agreement or figures["max_logit_error"] > p.max_logit_error


def test_bf16_decoder_equals_transformers_with_a_bf16_language_model(ref, tmp_path):
    """Exact where it is achievable: transformers' AF3 with its language model cast to bf16 (audio tower and
    projector fp32, as af3trt's ONNX encoder; the table enters the decoder in bf16) answers token for token as the
    CPU decoder built with --cpu-decoder-precision bf16, alone and in one continuous batch."""
    model, processor, end_id = ref.model, ref.processor, ref.end_id
    bf16 = copy.deepcopy(model)
    for param in [*bf16.model.language_model.parameters(), *bf16.lm_head.parameters()]:
        param.data = param.data.to(torch.bfloat16)  # parameters only: RoPE's inv_freq stays fp32, as from_pretrained
    lm = tmp_path / "lm-bf16"
    extract_language_model(model.name_or_path, lm, dtype=CPU_DECODER_PRECISIONS["bf16"].dtype)
    requests, want = [], []
    for k, (text, seconds) in enumerate(PROMPTS):
        inputs = _inputs(processor, text, seconds, seed=k)
        ids, table = _prompt(model, inputs, torch.bfloat16)
        requests.append(GenerationRequest(input_ids=ids, prompt_table=table, max_new_tokens=N_NEW, end_id=end_id,
                                          prompt_vocab_size=0 if table is None else table.shape[0]))
        # the audio rows come from its fp32 projector, cast into the bf16 embeddings by AF3's own masked_scatter
        want.append(_generate(bf16, inputs, end_id))
    with DecoderEngine(lm, max_batch_size=4) as eng:
        assert eng.dtype == torch.bfloat16
        alone = [eng.generate(r) for r in requests]
        together = _together(eng, requests)
        assert eng.stats["max_batch"] > 1
    assert alone == want
    assert together == want


def _together(eng, requests) -> list[list[int]]:
    """The requests submitted at once (the first holds the worker until all are queued): one continuous batch."""
    tokens, done, queued = [[] for _ in requests], threading.Semaphore(0), threading.Event()

    def emit_into(i):
        return lambda new, final: (tokens[i].extend(new), final and done.release())

    for i, r in enumerate(requests):
        eng.submit(r, emit_into(i), cancelled=(lambda: not queued.wait(60)) if i == 0 else None)
    queued.set()
    for _ in requests:
        assert done.acquire(timeout=120)
    return tokens


@pytest.mark.parametrize("name", ["bf16", "int8_dyn"])
def test_a_build_writes_and_records_the_decoder_precision(tiny_ckpt, tmp_path, name):
    from af3trt.build.build_engines import BuildOptions, ServingConfig, build
    from af3trt.triton_repo import configs

    p = CPU_DECODER_PRECISIONS[name]
    out = build(BuildOptions(hf_model=tiny_ckpt, out=tmp_path / "out", cpu_decoder_precision=name, think=False,
                             serving=ServingConfig(max_audio_seconds=30, max_text_len=256, max_output_len=16)))
    lm = json.loads((out / "artifacts" / "lm" / "config.json").read_text())
    assert lm["dtype"] == p.dtype
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["precisions"]["decoder_precision"] == name
    assert manifest["options"]["cpu_decoder_precision"] == name
    decoder = configs.parse((out / "model_repository" / "decoder" / "config.pbtxt").read_text())
    table = next(i for i in decoder.input if i.name == "prompt_embedding_table")
    # fusion casts the fp32 encoder's rows to the decoder's dtype
    assert configs.mc.DataType.Name(table.data_type) == {"bfloat16": "TYPE_BF16", "float32": "TYPE_FP32"}[p.dtype]
    # the decoder is told the precision by name and loads the weights as its record says (int8_linear for int8_dyn)
    from af3trt.runtime.stages.params import DecoderParams

    assert DecoderParams.parse({k: v.string_value for k, v in decoder.parameters.items()}).precision == name
    assert "int8_linear" not in decoder.parameters


def test_the_choice_is_checked_against_the_records(tiny_ckpt, tmp_path):
    from af3trt.build.common import BuildError
    from af3trt.build.plan import BuildOptions, check_options

    check_options(BuildOptions(hf_model=tiny_ckpt, out=tmp_path / "a", cpu_decoder_precision="bf16"))
    with pytest.raises(BuildError, match="auto, fp32, bf16"):
        check_options(BuildOptions(hf_model=tiny_ckpt, out=tmp_path / "b", cpu_decoder_precision="int3"))
    with pytest.raises(BuildError, match="for the CPU target"):
        check_options(BuildOptions(hf_model=tiny_ckpt, out=tmp_path / "c", target="gpu", cpu_decoder_precision="bf16"))


def test_int8_linear_and_a_lora_adapter_are_refused_together(lm_dir, tmp_path):
    from af3trt.runtime.engines.decoder import DecodeError

    with pytest.raises(DecodeError, match="LoRA"):
        DecoderEngine(lm_dir, int8_linear=True, lora_dir=tmp_path)


def test_a_build_refuses_int8_linear_with_a_think_adapter(tiny_ckpt, tmp_path):
    """The decoder cannot put the thinking adapter's LoRA rows on int8 layers: refused at build time, not when the
    server loads the decoder."""
    import shutil

    from af3trt.build.build_engines import BuildOptions, ServingConfig, build
    from af3trt.build.common import BuildError
    from af3trt.export.think import write_think

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, ckpt)
    write_think(ckpt, seed=0)
    with pytest.raises(BuildError, match="--no-think"):
        build(BuildOptions(hf_model=ckpt, out=tmp_path / "out", cpu_decoder_precision="int8_dyn",
                           serving=ServingConfig(max_audio_seconds=30, max_text_len=256, max_output_len=16)))
    assert not (tmp_path / "out").exists()
