"""Structured output (docs/structured-output.md): guides checked once (runtime/stages/guided.py), compiled by xgrammar
and applied per batch row by the CPU decoder (runtime/engines/grammar.py), routed by fusion to the decoder of either
target, the GPU build's guided-decoding configuration (build/trtllm_guided.py) as TensorRT-LLM's backend reads it
(tests/fakes/trtllm_backend.py), and the OpenAI front's response_format and vLLM extras."""

from __future__ import annotations

import dataclasses
import json
import re
import threading

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from af3trt.build import trtllm_guided
from af3trt.build.gpu_repo import gpu_repo_spec
from af3trt.runtime.engines import grammar
from af3trt.runtime.engines.decoder import DecodeError, DecoderEngine, GenerationRequest
from af3trt.runtime.openai.chat import ChatRequest, build_job
from af3trt.runtime.openai.common import APIError
from af3trt.runtime.openai.triton import EnsembleInfo
from af3trt.runtime.stages import audio_cache, contract, guided
from af3trt.runtime.stages.guided import Guide, GuideError
from af3trt.triton_repo import configs

from fakes import pb_utils as fake_pb
from fakes.trtllm_backend import BackendLoadError, FakeTrtllmDecoder, guided_decoding_config
from helpers import encoder_max_windows, engine_config, write_engine

N_NEW = 48
SCHEMA = {"type": "object", "properties": {"label": {"type": "string", "maxLength": 6},
                                          "count": {"type": "integer", "minimum": 0, "maximum": 9},
                                          "kind": {"enum": ["speech", "music", "noise"]}},
          "required": ["label", "count", "kind"]}
GUIDES = {  # request (guide_type, guide) → what the decoder gets
    "json_schema": (("json_schema", json.dumps(SCHEMA)), Guide("json_schema", json.dumps(SCHEMA))),
    "json": (("json", ""), Guide("json")),
    "regex": (("regex", r"[0-9]{2}-[a-c]{1,3}"), Guide("regex", r"[0-9]{2}-[a-c]{1,3}")),
    "choice": (("choice", '["speech", "music", "a \\"quoted\\" one"]'),
               Guide("ebnf_grammar", 'root ::= "speech" | "music" | "a \\"quoted\\" one"')),
    "grammar": (("grammar", 'root ::= "yes" | "no"'), Guide("ebnf_grammar", 'root ::= "yes" | "no"')),
}


# ------------------------------------------------------------------------------------------ guides (pure)


@pytest.mark.parametrize("name", sorted(GUIDES))
def test_request_guides_become_the_backends_guide_types(name):
    (kind, text), want = GUIDES[name]
    assert guided.from_request(kind, text) == want
    assert want.kind in ("json", "json_schema", "regex", "ebnf_grammar")  # the backend ignores any other name


@pytest.mark.parametrize("kind, text, needle", [
    ("xml", "x", "guide_type must be one of"),
    (None, "x", "without guide_type"),
    ("json_schema", "{not json", "not JSON"),
    ("json_schema", "[1, 2]", "is an object"),
    ("json", "{}", "takes no guide text"),
    ("regex", "", "needs its guide text"),
    ("choice", '"speech"', "non-empty JSON list"),
    ("choice", '["a", ""]', "non-empty JSON list"),
    ("choice", "[]", "non-empty JSON list"),
])
def test_malformed_guides_are_refused_with_the_reason(kind, text, needle):
    with pytest.raises(GuideError, match=needle):
        guided.from_request(kind, text)


def test_unknown_decoder_guide_type_is_an_error_not_silence():
    # the tensorrtllm backend would run such a request unconstrained; ours refuses it where it enters
    with pytest.raises(GuideError, match="guided_decoding_guide_type must be one of"):
        Guide("choice", '["a"]')


@pytest.mark.parametrize("kw, needle", [({"thinking": True}, "thinking do not combine"),
                                        ({"ignore_eos": True}, "ignore_eos and a guide"),
                                        ({"min_tokens": 3}, "min_tokens and a guide")])
def test_what_does_not_combine_with_a_guide_is_refused(kw, needle):
    with pytest.raises(GuideError, match=needle):
        guided.check_combination(Guide("json"), **kw)
    guided.check_combination(None, **kw)  # without a guide: nothing to refuse


# ------------------------------------------------------------------------------------------ the grammar engine


@pytest.fixture(scope="module")
def grammars(lm_dir):
    cfg = json.loads((lm_dir / "config.json").read_text())
    eos = tuple(json.loads((lm_dir / "generation_config.json").read_text())["eos_token_id"])
    return grammar.Grammars(lm_dir, cfg["vocab_size"], eos)


def _accepts(grammars, guide: Guide, text: str) -> bool:
    import xgrammar as xgr

    m = xgr.GrammarMatcher(grammars.compile(guide))
    return m.accept_string(text) and m.is_completed()


def test_tokenizer_info_is_xgrammars_own_reading_of_the_tokenizer(ref, lm_dir, grammars):
    """grammar.tokenizer_info reads tokenizer.json as TensorRT-LLM's executor reads the backend's info file; it must be
    the vocabulary xgrammar's own Hugging Face reading gives (what the parity reference uses)."""
    import xgrammar as xgr

    ours = grammar.tokenizer_info(lm_dir / "tokenizer.json", grammars.vocab_size, grammars.stop_ids)
    theirs = xgr.TokenizerInfo.from_huggingface(ref.processor.tokenizer, vocab_size=grammars.vocab_size,
                                                stop_token_ids=list(grammars.stop_ids))
    assert ours.vocab_type == theirs.vocab_type and ours.add_prefix_space == theirs.add_prefix_space
    assert ours.decoded_vocab == theirs.decoded_vocab and ours.vocab_size == theirs.vocab_size == 704
    assert ours.special_token_ids == theirs.special_token_ids and sorted(ours.stop_token_ids) == sorted(grammars.stop_ids)


def test_a_guide_is_compiled_once(lm_dir):
    g = grammar.Grammars(lm_dir, 704, (642, 640))
    for _ in range(3):
        g.matcher(Guide("regex", "[a-z]+"))
    g.matcher(Guide("regex", "[0-9]+"))
    assert g.stats["compiled"] == 2 and g.stats["hits"] == 2


@pytest.mark.parametrize("guide, needle", [
    (Guide("json_schema", '{"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}'), "cannot be compiled"),
    (Guide("regex", "(unclosed"), "cannot be compiled"),
    (Guide("ebnf_grammar", "root ::= missing_rule"), "cannot be compiled"),
    (Guide("regex", "[^\\x00-\\U0010ffff]"), ""),  # no character at all: refused, by the compiler or as unanswerable
    (Guide("ebnf_grammar", "root ::= root"), "admits no answer"),
])
def test_a_guide_the_engine_cannot_use_is_refused(grammars, guide, needle):
    with pytest.raises(GuideError, match=needle) as e:
        grammars.matcher(guide)
    assert "/project/cpp" not in str(e.value)  # xgrammar's log prefix is not the client's business


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(choices=st.lists(st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=6),
                        min_size=1, max_size=4, unique=True))
def test_a_choice_grammar_accepts_exactly_its_choices(grammars, choices):
    guide = guided.from_request("choice", json.dumps(choices))
    for c in choices:
        assert _accepts(grammars, guide, c), c
    assert not _accepts(grammars, guide, choices[0] + "\u2603x")
    assert not _accepts(grammars, guide, "")


def test_the_matcher_refuses_a_token_its_mask_excludes(grammars):
    from tokenizers import Tokenizer

    m = grammars.matcher(Guide("regex", "[0-9]"))
    a = Tokenizer.from_file(str(grammars.tokenizer_dir / "tokenizer.json")).token_to_id("a")
    assert not (int(m.fill()[0, a // 32]) >> (a % 32)) & 1  # the mask excludes a letter
    with pytest.raises(GuideError, match="admits no continuation after 0 tokens"):
        m.advance(a)


# ------------------------------------------------------------------------------------------ the CPU decoder


@pytest.fixture(scope="module")
def engine(lm_dir):
    with DecoderEngine(lm_dir, max_batch_size=8) as eng:
        yield eng


def _prompt_ids(ref, text: str) -> np.ndarray:
    inputs = ref.processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": text}]}],
                                               tokenize=True, add_generation_prompt=True, return_dict=True)
    return np.asarray(inputs["input_ids"][0], np.int32)


def _hf(ref, ids: np.ndarray, guide: Guide | None, n: int = N_NEW) -> list[int]:
    """transformers' greedy generate, with xgrammar's own transformers logits processor for the guide."""
    return ref._generate({"input_ids": torch.as_tensor(ids[None], dtype=torch.long)}, n,
                         ref.grammar_processors(guide.kind, guide.text) if guide else None)


def _run_together(engine, requests: list[GenerationRequest]) -> list:
    """All requests in one continuous batch (the worker is held at the first admission until all are queued)."""
    out, done, queued = [None] * len(requests), threading.Semaphore(0), threading.Event()
    tokens = [[] for _ in requests]

    def callbacks(i):
        def emit(new, final):
            tokens[i].extend(new)
            if final:
                out[i] = tokens[i]
                done.release()

        def on_error(exc):
            out[i] = exc
            done.release()
        return emit, on_error

    for i, r in enumerate(requests):
        engine.submit(r, *callbacks(i), cancelled=(lambda: not queued.wait(60)) if i == 0 else None)
    queued.set()
    for _ in requests:
        assert done.acquire(timeout=120)
    return out


def _strip_end(ids: list[int], eos) -> list[int]:
    """The decoder keeps a stop id in its output (postprocess trims it); the reference drops its last end id."""
    return ids[:-1] if ids and ids[-1] in eos else ids


def test_guided_greedy_equals_transformers_with_xgrammars_processor_in_a_mixed_batch(engine, ref):
    """Rows with a guide equal transformers' greedy generate with xgrammar's own logits processor; rows without one in
    the same batch are unchanged (equal to the plain reference, and to the same request run alone)."""
    prompts = ["Describe the sound as JSON.", "What is said in the audio?", "Pick one.", "Say a code.",
               "Tell me about the music."]
    guides = [GUIDES["json_schema"][1], None, GUIDES["choice"][1], GUIDES["regex"][1], None]
    ids = [_prompt_ids(ref, p) for p in prompts]
    reqs = [GenerationRequest(input_ids=i, max_new_tokens=N_NEW, end_id=ref.end_id, stop_words=((640,),),
                              guide=g) for i, g in zip(ids, guides)]
    together = _run_together(engine, reqs)
    for i, g, got in zip(ids, guides, together):
        assert not isinstance(got, BaseException), got
        assert _strip_end(got, ref.eos_ids) == _hf(ref, i, g), g
    plain_alone = engine.generate(dataclasses.replace(reqs[1]))
    assert together[1] == plain_alone
    answer = ref.processor.tokenizer.decode(_strip_end(together[0], ref.eos_ids))
    import jsonschema

    jsonschema.validate(json.loads(answer), SCHEMA)
    assert ref.processor.tokenizer.decode(_strip_end(together[2], ref.eos_ids)) in ("speech", "music",
                                                                                    'a "quoted" one')


def test_a_guide_cut_by_max_tokens_returns_what_it_has(engine, ref):
    """max_tokens too small to close the JSON: the answer stops at max_tokens (finish_reason "length" in the OpenAI
    front, tests/test_structured_output_server.py); nothing else changes."""
    ids = _prompt_ids(ref, "JSON please")
    got = engine.generate(GenerationRequest(input_ids=ids, max_new_tokens=3, end_id=ref.end_id,
                                            guide=GUIDES["json_schema"][1]))
    assert len(got) == 3 and got == _hf(ref, ids, GUIDES["json_schema"][1], n=3)


def test_a_bad_guide_is_refused_at_submit_and_the_batch_runs_on(engine, ref):
    ids = _prompt_ids(ref, "Hello")
    plain = GenerationRequest(input_ids=ids, max_new_tokens=8, end_id=ref.end_id)
    with pytest.raises(GuideError, match="cannot be compiled"):
        engine.submit(dataclasses.replace(plain, guide=Guide("regex", "(")), lambda *a: None)
    with pytest.raises(DecodeError, match="needs an end id"):
        engine.submit(dataclasses.replace(plain, end_id=None, guide=Guide("json")), lambda *a: None)
    assert engine.generate(plain) == _hf(ref, ids, None, 8)


def test_the_engine_counts_its_guided_rows_and_mask_time(engine, ref):
    before = dict(engine.stats)
    engine.generate(GenerationRequest(input_ids=_prompt_ids(ref, "x"), max_new_tokens=6, end_id=ref.end_id,
                                      guide=GUIDES["regex"][1]))
    assert engine.stats["guided_rows"] > before["guided_rows"]
    assert engine.stats["guide_seconds"] > before["guide_seconds"]


# bounded schemas: every answer of the test model completes within max_tokens (an unbounded string never closes with
# random weights); integers with a range, strings with maxLength, enums (any text), arrays with maxItems, objects
_KEY = st.from_regex(r"[a-z][a-z0-9_]{0,5}", fullmatch=True)
_LEAF = st.one_of(
    st.just({"type": "boolean"}), st.just({"type": "null"}),
    st.builds(lambda lo, span: {"type": "integer", "minimum": lo, "maximum": lo + span},
              st.integers(-99, 99), st.integers(0, 99)),
    st.builds(lambda lo, extra: {"type": "string", "minLength": lo, "maxLength": lo + extra},
              st.integers(0, 2), st.integers(0, 5)),
    st.lists(st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=5),
             min_size=1, max_size=3, unique=True).map(lambda xs: {"enum": xs}),
)
_VALUES = st.recursive(_LEAF, lambda inner: st.one_of(
    st.builds(lambda items, lo, extra: {"type": "array", "items": items, "minItems": lo, "maxItems": lo + extra},
              inner, st.integers(0, 2), st.integers(0, 2)),
    st.dictionaries(_KEY, inner, min_size=1, max_size=3).map(
        lambda props: {"type": "object", "properties": props, "required": sorted(props)}),
), max_leaves=5)
# an answer is an object of named fields (what a program reads), any of the values above in each
SCHEMAS = st.dictionaries(_KEY, _VALUES, min_size=1, max_size=4).map(
    lambda props: {"type": "object", "properties": props, "required": sorted(props), "additionalProperties": False})


@pytest.mark.slow  # hypothesis: 30 schemas, each compiled and answered by the decoder
@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                                      HealthCheck.too_slow])
@given(schema=SCHEMAS, prompt=st.sampled_from(["Answer in JSON.", "Describe the audio.", "List the sounds."]))
def test_every_answer_under_a_generated_schema_parses_and_validates(engine, ref, schema, prompt):
    import jsonschema

    guide = guided.from_request("json_schema", json.dumps(schema))
    got = engine.generate(GenerationRequest(input_ids=_prompt_ids(ref, prompt), max_new_tokens=256,
                                            end_id=ref.end_id, stop_words=((640,),), guide=guide))
    assert got and got[-1] in ref.eos_ids or len(got) < 256, f"the answer did not complete: {schema}"
    answer = json.loads(ref.processor.tokenizer.decode(_strip_end(got, ref.eos_ids)))
    jsonschema.validate(answer, schema)


# ------------------------------------------------------------------------------------------ fusion and the decoder model


def _text_request(extra: dict) -> fake_pb.Request:
    """A text-only request to fusion; `extra`: more request inputs (str → BYTES [1], else as given, in a [1])."""
    inputs = {"text_input": np.array([b"Classify the sound."], object),
              "audio_embeds": np.zeros((1, 750, 64), np.float32), "input_features_mask": np.zeros((1, 3000), np.int32),
              "audio_windows": np.zeros((0,), np.int32),
              "audio_digest": audio_cache.window_keys(audio_cache.audio_digest([]), 1)}  # read with KV-cache reuse
    for name, value in extra.items():
        inputs[name] = np.array([value.encode()], object) if isinstance(value, str) else np.array([value])
    return fake_pb.Request(inputs)


@pytest.fixture(scope="module")
def cpu_fusion(tiny_ckpt):
    spec = configs.RepoSpec(target="cpu", hidden_size=64, decoder_dtype="float32", vocab_size=704, end_id=642,
                            pad_id=640, max_batch_size=4, max_audio_windows=2, max_input_len=2000, max_output_len=64,
                            default_max_tokens=16, fusion_params={"tokenizer_dir": str(tiny_ckpt)}, stop_ids=(640,))
    return fake_pb.load_model("fusion", configs.fusion_config(spec))


@pytest.mark.parametrize("name", sorted(GUIDES))
def test_fusion_routes_the_guide_to_the_decoder(cpu_fusion, name):
    (kind, text), want = GUIDES[name]
    (r,) = cpu_fusion.execute([_text_request({"guide_type": kind, "guide": text})])
    assert not r.has_error(), r.error
    t, g = (r.outputs[n].as_numpy() for n in (contract.GUIDED_DECODING_GUIDE_TYPE, contract.GUIDED_DECODING_GUIDE))
    assert t.shape == g.shape == (1, 1)  # one string each: the backend reads a tensor's bytes as one string
    assert Guide(t[0, 0].decode(), g[0, 0].decode()) == want
    (plain,) = cpu_fusion.execute([_text_request({})])
    assert contract.GUIDED_DECODING_GUIDE_TYPE not in plain.outputs


@pytest.mark.parametrize("extra, needle", [
    ({"guide_type": "json", "thinking": np.bool_(True)}, "thinking do not combine"),
    ({"guide_type": "json", "ignore_eos": np.bool_(True)}, "ignore_eos and a guide"),
    ({"guide_type": "regex"}, "needs its guide text"),
])
def test_fusion_refuses_what_does_not_combine(cpu_fusion, extra, needle):
    (r,) = cpu_fusion.execute([_text_request(extra)])
    assert r.has_error() and needle in r.error.message()
    assert r.error.code() == fake_pb.TritonError.INVALID_ARG


def test_the_cpu_decoder_model_reads_the_guide_tensors(lm_dir):
    model = fake_pb.import_model("decoder").TritonPythonModel
    req = fake_pb.Request({contract.GUIDED_DECODING_GUIDE_TYPE: np.array([[b"regex"]], object),
                           contract.GUIDED_DECODING_GUIDE: np.array([[b"[0-9]+"]], object)})
    assert model.guide(req) == Guide("regex", "[0-9]+")
    assert model.guide(fake_pb.Request({})) is None
    with pytest.raises(GuideError):
        model.guide(fake_pb.Request({contract.GUIDED_DECODING_GUIDE_TYPE: np.array([[b"choice"]], object)}))


def _sent_final(req) -> bool:
    return any(flags for _, flags in req.sender.sent)


def test_a_new_guide_compiles_off_tritons_thread_and_holds_up_no_one(lm_dir, monkeypatch, tmp_path):
    """The decoder model hands a request whose guide is not compiled yet to its compile thread: execute returns at
    once and the requests after it are served while the guide compiles."""
    import time

    from af3trt.runtime.triton import context

    monkeypatch.setattr(context, "default_root", lambda: tmp_path / "ctx")
    spec = configs.RepoSpec(target="cpu", hidden_size=64, decoder_dtype="float32", vocab_size=704, end_id=642,
                            pad_id=640, max_batch_size=4, max_audio_windows=2, max_input_len=2000, max_output_len=64,
                            default_max_tokens=16, decoder_params={"gpt_model_path": str(lm_dir)})
    model = fake_pb.load_model("decoder", configs.decoder_config(spec), {"model_repository": str(tmp_path)})
    release, real = threading.Event(), grammar.Grammars.compile

    def slow_compile(self, guide):
        if guide.text == "[0-9]+":
            assert release.wait(120)
        return real(self, guide)

    monkeypatch.setattr(grammar.Grammars, "compile", slow_compile)

    def request(rid, **guide):
        inputs = {"input_ids": np.array([[5, 6, 7]], np.int32), "input_lengths": np.array([[3]], np.int32),
                  "request_output_len": np.array([[6]], np.int32), "end_id": np.array([[642]], np.int32)}
        inputs.update({k: np.array([[v.encode()]], object) for k, v in guide.items()})
        return fake_pb.Request(inputs, request_id=rid)

    guided = request("g", guided_decoding_guide_type="regex", guided_decoding_guide="[0-9]+")
    plain = request("p")
    try:
        t0 = time.monotonic()
        model.execute([guided, plain])
        assert time.monotonic() - t0 < 10  # not waiting for the compilation
        deadline = time.monotonic() + 60
        while not _sent_final(plain) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _sent_final(plain) and not _sent_final(guided)  # served while the guide still compiles
        release.set()
        while not _sent_final(guided) and time.monotonic() < deadline + 60:
            time.sleep(0.01)
        responses = [r for r, _ in guided.sender.sent if r is not None]
        assert responses and all(r.error is None for r in responses)
        ids = [int(t) for r in responses for t in r.outputs["output_ids"].as_numpy().reshape(-1)]
        from tokenizers import Tokenizer

        assert re.fullmatch("[0-9]+", Tokenizer.from_file(str(lm_dir / "tokenizer.json")).decode(ids))
    finally:
        release.set()
        model.finalize()


# ------------------------------------------------------------------------------------------ GPU target


def test_the_tokenizer_info_file_is_what_the_backend_reads(tiny_ckpt, tmp_path, grammars):
    dest = tmp_path / "engine" / trtllm_guided.TOKENIZER_INFO
    summary = trtllm_guided.write_tokenizer_info(tiny_ckpt, dest, stop_ids=(642, 640), vocab_size=712)
    info = json.loads(dest.read_text())
    assert set(info) == {"encoded_vocab", "tokenizer_str", "stop_token_ids"} and info["stop_token_ids"] == [642, 640]
    assert summary["tokens"] == len(info["encoded_vocab"]) <= 712
    # loaded as the executor loads it (TokenizerInfo of encoded_vocab + metadata detected from tokenizer_str, the
    # engine's vocab as the width): the vocabulary the CPU decoder masks with
    import xgrammar as xgr

    meta = xgr.TokenizerInfo._detect_metadata_from_hf(info["tokenizer_str"])
    gpu = xgr.TokenizerInfo(info["encoded_vocab"], meta["vocab_type"], vocab_size=704,
                            stop_token_ids=info["stop_token_ids"], add_prefix_space=meta["add_prefix_space"])
    cpu = grammar.tokenizer_info(tiny_ckpt / "tokenizer.json", 704, (642, 640))
    n = len(info["encoded_vocab"])  # the ids past the tokenizer (padding rows of the model) decode to nothing
    assert gpu.decoded_vocab == cpu.decoded_vocab[:n] and set(cpu.decoded_vocab[n:]) <= {b""}
    assert gpu.vocab_type == cpu.vocab_type and gpu.special_token_ids == cpu.special_token_ids[:len(gpu.special_token_ids)]
    masks = []
    for ti in (gpu, cpu):
        m = xgr.GrammarMatcher(xgr.GrammarCompiler(ti).compile_json_schema(json.dumps(SCHEMA), any_whitespace=False))
        masks.append(xgr.allocate_token_bitmask(1, 704))
        m.fill_next_token_bitmask(masks[-1])
    assert torch.equal(*masks)  # the same tokens allowed


def test_the_tokenizer_info_checks(tiny_ckpt, tmp_path):
    with pytest.raises(trtllm_guided.GuidedDecodingError, match="more than the engine's vocab_size"):
        trtllm_guided.write_tokenizer_info(tiny_ckpt, tmp_path / "i.json", stop_ids=(642,), vocab_size=100)
    with pytest.raises(trtllm_guided.GuidedDecodingError, match="stop_token_ids"):
        trtllm_guided.write_tokenizer_info(tiny_ckpt, tmp_path / "i.json", stop_ids=(9999,), vocab_size=712)
    tok = json.loads((tiny_ckpt / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    last = max(vocab, key=vocab.get)
    vocab[last] += 5  # a gap in the ids
    (tmp_path / "gap").mkdir()
    (tmp_path / "gap" / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(trtllm_guided.GuidedDecodingError, match="without gaps"):
        trtllm_guided.tokenizer_info(tmp_path / "gap" / "tokenizer.json", (642,))
    trtllm_guided.check_logits_dtype({"pretrained_config": {"logits_dtype": "float32"}})
    with pytest.raises(trtllm_guided.GuidedDecodingError, match="logits"):
        trtllm_guided.check_logits_dtype({"pretrained_config": {"logits_dtype": "bfloat16"}})
    with pytest.raises(trtllm_guided.GuidedDecodingError, match="absolute"):
        trtllm_guided.decoder_parameters("engine/" + trtllm_guided.TOKENIZER_INFO)


def test_the_gpu_build_refuses_an_engine_whose_logits_the_backend_cannot_mask(tiny_ckpt, tmp_path):
    from types import SimpleNamespace

    from af3trt.build.common import BuildError
    from af3trt.build.gpu_build import write_guided_decoding

    art = tmp_path / "artifacts"
    (art / "lm").mkdir(parents=True)
    (art / "lm" / "tokenizer.json").write_bytes((tiny_ckpt / "tokenizer.json").read_bytes())
    cfg = engine_config("bfloat16", vocab=712, hidden=64)
    cfg["pretrained_config"]["logits_dtype"] = "bfloat16"  # trtllm-build --logits_dtype bfloat16
    write_engine(art / "engine", cfg)
    plan = SimpleNamespace(checkpoint=SimpleNamespace(end_id=642, stop_ids=[640]))
    with pytest.raises(BuildError, match="guided decoding: .*logits_dtype 'bfloat16'"):
        write_guided_decoding(plan, art, 712)
    write_engine(art / "engine", engine_config("bfloat16", vocab=712, hidden=64))  # float32 logits: written
    assert write_guided_decoding(plan, art, 712)["stop_token_ids"] == [642, 640]
    assert (art / "engine" / trtllm_guided.TOKENIZER_INFO).is_file()


@pytest.fixture(scope="module")
def gpu_guided(tiny_ckpt, checkpoint, limits, tmp_path_factory):
    """A GPU repository spec with guided decoding on (the info file in the engine directory), and its fusion model."""
    tmp = tmp_path_factory.mktemp("gpu-guided")
    engine_dir = write_engine(tmp / "engine", engine_config("bfloat16", vocab=checkpoint.vocab_size + 8,
                                                            hidden=checkpoint.text_hidden_size))
    trtllm_guided.write_tokenizer_info(tiny_ckpt, engine_dir / trtllm_guided.TOKENIZER_INFO,
                                       stop_ids=(checkpoint.end_id, *checkpoint.stop_ids),
                                       vocab_size=checkpoint.vocab_size + 8)
    spec = gpu_repo_spec(checkpoint, limits, engine_dir=engine_dir, tokenizer_dir="artifacts/lm",
                         encoder_max_windows=encoder_max_windows(limits.max_batch_size, limits.max_audio_windows),
                         guided_decoding=True)
    fusion_spec = dataclasses.replace(spec, fusion_params={"tokenizer_dir": str(tiny_ckpt), "guide_check": True})
    return spec, fake_pb.load_model("fusion", configs.fusion_config(fusion_spec))


def test_the_gpu_decoder_loads_with_guided_decoding_on(gpu_guided):
    spec, _ = gpu_guided
    assert spec.fusion_params["guide_check"] is True
    decoder = FakeTrtllmDecoder(configs.decoder_config(spec))
    assert decoder.guided_config is not None and decoder.guided_config["stop_token_ids"][0] == spec.end_id
    p = dict(spec.decoder_params)
    assert guided_decoding_config({**p, "guided_decoding_backend": "", "xgrammar_tokenizer_info_path": ""}) is None
    with pytest.raises(BackendLoadError, match="does not exist"):
        guided_decoding_config({**p, "xgrammar_tokenizer_info_path": "/nowhere/info.json"})
    with pytest.raises(BackendLoadError, match="'xgrammar' backend"):
        guided_decoding_config({**p, "guided_decoding_backend": "llguidance"})


@pytest.mark.parametrize("name", sorted(GUIDES))
def test_every_guide_fusion_sends_reaches_the_gpu_executor(gpu_guided, name):
    """What fusion sends is a guide the backend builds GuidedDecodingParams from: never silently unconstrained."""
    spec, fusion = gpu_guided
    decoder = FakeTrtllmDecoder(configs.decoder_config(spec))
    (kind, text), want = GUIDES[name]
    (r,) = fusion.execute([_text_request({"guide_type": kind, "guide": text})])
    assert not r.has_error(), r.error
    decoder("rid", {n: t.as_numpy() for n, t in r.outputs.items() if n != "prompt_embedding_table"})  # bf16: no numpy
    (executed,) = decoder.executor.values()
    assert executed["guide"] == (want.kind, want.text)


@pytest.mark.parametrize("kind, text", [("json_schema", '{"type": "object", "properties": {"a": {"$ref": "#/x"}}}'),
                                        ("regex", "(unclosed"), ("grammar", "root ::= nothing_defined")])
def test_gpu_fusion_refuses_a_guide_that_would_fail_the_executors_batch(gpu_guided, kind, text):
    _, fusion = gpu_guided
    (r,) = fusion.execute([_text_request({"guide_type": kind, "guide": text})])
    assert r.has_error() and "cannot be compiled" in r.error.message()
    assert r.error.code() == fake_pb.TritonError.INVALID_ARG


# ------------------------------------------------------------------------------------------ the OpenAI front

INFO = EnsembleInfo(inputs=frozenset(s.name for s in contract.REQUEST_INPUTS), models=("af3",),
                    default_max_tokens=16, max_output_len=64, max_audio_seconds=600.0)
BODY = {"model": "af3", "messages": [{"role": "user", "content": "Classify."}]}


@pytest.mark.parametrize("extra, want", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA, "strict": True}}},
     ("json_schema", json.dumps(SCHEMA))),
    ({"response_format": {"type": "json_object"}}, ("json_schema", '{"type": "object"}')),
    ({"response_format": {"type": "text"}}, (None, None)),
    ({"structured_outputs": {"choice": ["yes", "no"]}}, ("choice", '["yes", "no"]')),
    ({"structured_outputs": {"regex": "[0-9]+"}}, ("regex", "[0-9]+")),
    ({"structured_outputs": {"json": SCHEMA}}, ("json_schema", json.dumps(SCHEMA))),
    ({"structured_outputs": {"grammar": 'root ::= "a"'}}, ("grammar", 'root ::= "a"')),
    ({"guided_json": json.dumps(SCHEMA)}, ("json_schema", json.dumps(SCHEMA))),
    ({"guided_choice": ["yes", "no"]}, ("choice", '["yes", "no"]')),
    ({"guided_regex": "a+"}, ("regex", "a+")),
    ({"guided_grammar": 'root ::= "a"'}, ("grammar", 'root ::= "a"')),
])
def test_the_front_maps_response_format_and_vllm_extras(extra, want):
    job = build_job(ChatRequest(**BODY, **extra), INFO)
    assert (job.guide_type, job.guide) == want


@pytest.mark.parametrize("extra, param, needle", [
    ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice", "give one guide"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a"}}}, "response_format", "needs"),
    ({"guided_json": "{nope"}, "guided_json", "not JSON"),
    ({"guided_choice": []}, "guided_choice", "non-empty"),
    ({"guided_regex": "a", "reasoning_effort": "high"}, "guided_regex", "thinking do not combine"),
    ({"response_format": {"type": "json_object"}, "ignore_eos": True}, "response_format", "ignore_eos"),
])
def test_the_front_refuses_a_bad_guide_with_400_naming_the_parameter(extra, param, needle):
    with pytest.raises(APIError, match=needle) as e:
        build_job(ChatRequest(**BODY, **extra), INFO)
    assert e.value.status == 400 and e.value.param == param


def test_a_repository_before_structured_output_is_400():
    old = dataclasses.replace(INFO, inputs=INFO.inputs - {"guide_type", "guide"})
    with pytest.raises(APIError, match="predates structured output") as e:
        build_job(ChatRequest(**BODY, response_format={"type": "json_object"}), old)
    assert e.value.status == 400


# ------------------------------------------------------------------------------------------ figures


def test_the_committed_figures_are_rendered_from_their_record():
    from pathlib import Path

    from af3trt.perf import structured

    results = Path(__file__).resolve().parent.parent / "perf" / "results" / "latest"
    record = json.loads((results / "structured.json").read_text())
    page = (results / "structured.md").read_text()
    assert page == structured.render(record)
    assert "2 cores shared with other sessions" in page and record["machine"]["cpu"]["Model name"] in page
    assert {row["guided"] for row in record["decoder"]} == {False, True}
    assert set(record["engines"]) >= {"xgrammar", "llguidance", "apply_mask_us"}


def test_the_synthetic_vocabulary_has_the_size_asked():
    from af3trt.perf import structured

    tok = structured.synthetic_tokenizer(3000)
    assert tok.get_vocab_size() == 3000 and tok.token_to_id("<|im_end|>") is not None
