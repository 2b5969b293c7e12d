"""Guided decoding on the GPU target: the xgrammar tokenizer info file TensorRT-LLM 1.2's `tensorrtllm` backend reads,
written from the checkpoint's tokenizer and checked, and the decoder parameters that turn it on.

    info = write_tokenizer_info(art / "lm", art / TOKENIZER_INFO, stop_ids=(end_id, *stop_ids), vocab_size=engine_vocab)
    params = decoder_parameters(info_path_at_serve)      # merged into the decoder's config.pbtxt parameters

Facts it is written against (re-read before relying on a detail):
- The backend reads three parameters, each without a default (a config without them does not load):
  `tokenizer_dir`, `xgrammar_tokenizer_info_path`, `guided_decoding_backend`. Guided decoding is off when the backend
  or the info path is empty; otherwise the file must exist (TLLM_CHECK "Xgrammar's tokenizer info path at %s does not
  exist."), is parsed as JSON for "encoded_vocab" (list of strings), "tokenizer_str" (string) and "stop_token_ids"
  (list of ints), and the backend must be "xgrammar" (TLLM_THROW "Guided decoding is currently supported with
  'xgrammar' backend. Invalid guided_decoding_backend parameter provided."); `tokenizer_dir` is not used by this C++
  workflow (a log line says so). NVIDIA/TensorRT-LLM triton_backend/inflight_batcher_llm/src/model_instance_state.cc
  ModelInstanceState::getGuidedDecodingConfigFromParams (indexed commit 0c8de69a); tensorrtllm_backend r26.04
  docs/guided_decoding.md ("C++ Backend": fill `xgrammar_tokenizer_info_path` and `guided_decoding_backend`).
- TensorRT-LLM's own writer (examples/generate_xgrammar_tokenizer_info.py → tensorrt_llm/llmapi/tokenizer.py
  _xgrammar_tokenizer_info): encoded_vocab = the tokens of get_vocab() sorted by id, tokenizer_str = the fast
  tokenizer's backend_tokenizer.to_str(), stop_token_ids = [eos_token_id]. It needs transformers; this module writes
  the same three fields with the `tokenizers` library from tokenizer.json (the serving container's Python has no
  transformers of ours), and lists every end id of the checkpoint as a stop token, as the CPU decoder does
  (runtime/engines/grammar.py), so that a completed grammar may end on any of them.
- The executor builds xgrammar's TokenizerInfo from encoded_vocab (its vocab type detected from tokenizer_str), with
  the engine's padded vocab size as the mask's width and stop_token_ids as what a completed grammar allows; each
  token's id is its position in encoded_vocab (cpp/tensorrt_llm/batch_manager/guidedDecoder.cpp,
  GuidedDecoder::GuidedDecoder, indexed commits 000a01de / 2a9abd95): so the ids must run 0…n-1 without a gap (a gap
  shifts every later token: checked here), and n must not exceed the engine's vocab_size.
- The mask is applied to logits in float32 or float16 only (GuidedDecoder::execute: TLLM_THROW "Unsupported logits
  data type."); the engine's logits dtype is its config.json's pretrained_config.logits_dtype (build/trtllm_engine.py
  builds with --logits_dtype float32): checked here.
- A guide the executor cannot compile throws inside its forward step, and Executor::Impl::forwardAsync answers it by
  terminating every active request ("Encountered an error in forwardAsync function: …", terminateActiveRequests;
  cpp/tensorrt_llm/executor/executorImpl.cpp, indexed commit b35ac1b6): fusion therefore compiles each guide first on
  this target (its `guide_check` parameter, triton_repo/fusion/model.py) and answers a bad one with a 400.
"""

from __future__ import annotations

import json
from pathlib import Path

TOKENIZER_INFO = "xgrammar_tokenizer_info.json"  # under artifacts/, beside the engine
BACKEND = "xgrammar"  # the only value the 1.2 C++ backend accepts
LOGITS_DTYPES = ("float32", "float16")  # GuidedDecoder::execute's kFLOAT / kHALF


class GuidedDecodingError(ValueError):
    """The tokenizer, the engine and the guided-decoding configuration do not fit together."""


def tokenizer_info(tokenizer_json: Path, stop_ids: tuple[int, ...]) -> dict:
    """The three fields the backend reads, from a Hugging Face tokenizer.json."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    vocab = tok.get_vocab(with_added_tokens=True)  # token → id
    by_id = sorted(vocab.items(), key=lambda kv: kv[1])
    gaps = [i for i, (_, tid) in enumerate(by_id) if tid != i]
    if gaps:
        i = gaps[0]
        raise GuidedDecodingError(f"{tokenizer_json}: token ids are not 0..{len(by_id) - 1} without gaps (position {i} "
                                  f"holds id {by_id[i][1]}): the backend takes a token's position as its id")
    return {"encoded_vocab": [t for t, _ in by_id], "tokenizer_str": tok.to_str(),
            "stop_token_ids": [int(i) for i in stop_ids]}


def check_tokenizer_info(info: dict, vocab_size: int, where: str = "tokenizer info") -> None:
    """GuidedDecodingError unless the backend can load `info` for an engine of `vocab_size` logits."""
    problems = []
    vocab, text, stops = info.get("encoded_vocab"), info.get("tokenizer_str"), info.get("stop_token_ids")
    if not (isinstance(vocab, list) and vocab and all(isinstance(t, str) for t in vocab)):
        problems.append("encoded_vocab must be a non-empty list of strings")
    elif len(vocab) > vocab_size:
        problems.append(f"encoded_vocab has {len(vocab)} tokens, more than the engine's vocab_size {vocab_size}")
    if not isinstance(text, str):
        problems.append("tokenizer_str must be a string (the tokenizer's JSON)")
    else:
        try:
            json.loads(text)
        except json.JSONDecodeError as e:
            problems.append(f"tokenizer_str is not a tokenizer's JSON: {e}")
    if not (isinstance(stops, list) and stops and all(isinstance(i, int) and not isinstance(i, bool) for i in stops)):
        problems.append("stop_token_ids must be a non-empty list of ints")
    elif not all(0 <= i < vocab_size for i in stops):
        problems.append(f"stop_token_ids {stops} must lie in 0..{vocab_size - 1}")
    if problems:
        raise GuidedDecodingError(f"{where}: " + "; ".join(problems))


def check_logits_dtype(engine_config: dict, where: str = "engine config.json") -> None:
    """The engine's logits dtype is one the backend can mask (a checkpoint config without one: float32, trtllm-build's
    PretrainedConfig default)."""
    pretrained = engine_config.get("pretrained_config", engine_config)
    dtype = pretrained.get("logits_dtype", "float32")
    if dtype not in LOGITS_DTYPES:
        raise GuidedDecodingError(f"{where}: logits_dtype {dtype!r}: TensorRT-LLM 1.2 applies guided-decoding masks to "
                                  f"{' or '.join(LOGITS_DTYPES)} logits only (rebuild with --logits_dtype float32)")


def write_tokenizer_info(tokenizer_dir: Path, dest: Path, *, stop_ids: tuple[int, ...], vocab_size: int) -> dict:
    """Write the backend's tokenizer info file at `dest` (checked before and after writing); returns a summary for the
    manifest."""
    info = tokenizer_info(Path(tokenizer_dir) / "tokenizer.json", stop_ids)
    check_tokenizer_info(info, vocab_size, str(dest))
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(info, ensure_ascii=False), encoding="utf-8")
    check_tokenizer_info(json.loads(dest.read_text(encoding="utf-8")), vocab_size, str(dest))
    return {"backend": BACKEND, "tokenizer_info": str(dest), "tokens": len(info["encoded_vocab"]),
            "stop_token_ids": info["stop_token_ids"], "vocab_size": vocab_size}


def decoder_parameters(info_path_at_serve: str) -> dict[str, str]:
    """The decoder's guided-decoding parameters (tokenizer_dir stays empty: the C++ workflow does not read it)."""
    if not Path(info_path_at_serve).is_absolute():
        raise GuidedDecodingError(f"xgrammar_tokenizer_info_path must be absolute (the backend opens it as given), "
                                  f"got {info_path_at_serve!r}")
    return {"guided_decoding_backend": BACKEND, "xgrammar_tokenizer_info_path": info_path_at_serve, "tokenizer_dir": ""}
