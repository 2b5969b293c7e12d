"""Guided decoding on the CPU: each request's guide (runtime/stages/guided.py) compiled once per distinct guide by
xgrammar, and a per-row matcher that masks the row's logits before sampling and follows the tokens it accepts.

xgrammar is the grammar engine of both targets: TensorRT-LLM 1.2's C++ runtime runs it for the `tensorrtllm`
backend's guided decoding and refuses llguidance there (NVIDIA/TensorRT-LLM cpp/tensorrt_llm/batch_manager/
guidedDecoder.cpp, GuidedDecoder::GuidedDecoder: "LLGuidance is not supported for guided decoding in C++ runtime."),
so the CPU decoder compiles each guide as that GuidedDecoder does (GuidedDecoder::build, indexed commits 000a01de and
2a9abd95) but for JSON's whitespace (below): json → an object or an array, json_schema → compile_json_schema (strict
mode: no property or item the schema does not name), regex → compile_regex, ebnf_grammar → compile_grammar; one
matcher per request, fed each generated token, the mask filled before every token the request samples. The stop
tokens a completed grammar allows are the decoder's end ids (the checkpoint's generation_config). Why xgrammar and not
llguidance, as measured on this project's CPU: docs/structured-output.md ("Choosing the grammar engine").

    grammars = Grammars(lm_dir, vocab_size=704, stop_ids=(642, 640))   # nothing imported until the first guide
    matcher = grammars.matcher(Guide("json_schema", schema))          # GuideError: cannot compile / admits nothing
    mask_rows(logits, [matcher, None, ...])                           # logits [B, V], in place, guided rows only
    ended = matcher.advance(token)                                    # GuideError if the grammar rejects it

The tokenizer comes from the decoder's own directory (tokenizer.json, written beside the language model by the build),
read as the GPU target's executor reads its tokenizer info file (`tokenizer_info`), with the model's vocab_size (the
logits' width, padded past the tokenizer). The same code runs with xgrammar 0.1.25, the version TensorRT-LLM 1.2.1's
image holds (its requirements.txt), where fusion compiles guides on the GPU target.
"""

from __future__ import annotations

import re
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

from af3trt.runtime.stages.guided import EBNF, JSON, JSON_SCHEMA, REGEX, Guide, GuideError

if TYPE_CHECKING:  # pragma: no cover
    import torch


class Grammars:
    """The compiled guides of one tokenizer, at most `max_entries` of them (least recently used dropped)."""

    def __init__(self, tokenizer_dir: Path, vocab_size: int, stop_ids: tuple[int, ...], max_entries: int = 256):
        self.tokenizer_dir, self.vocab_size, self.stop_ids = Path(tokenizer_dir), int(vocab_size), tuple(stop_ids)
        self.max_entries = max_entries
        self._compiler = None
        self._json_tokens = None  # int32 bitmask [1, ceil(V / 32)]: the tokens compact JSON may contain
        self._compiled: OrderedDict[Guide, object] = OrderedDict()
        self._lock = threading.Lock()
        self.stats = {"compiled": 0, "hits": 0, "compile_seconds": 0.0}

    def compiler(self):
        """xgrammar's GrammarCompiler for this tokenizer (built on first use: it imports xgrammar and reads the
        vocabulary, 0.2-5.5 s at AF3's 151,672 ids on this project's shared CPU: perf/results/latest/structured.md)."""
        with self._lock:
            return self._compiler or self._load()

    def _load(self):
        if self._compiler is None:
            import xgrammar as xgr

            path = self.tokenizer_dir / "tokenizer.json"
            if not path.is_file():
                raise GuideError(f"guided decoding needs the tokenizer ({path} is missing)")
            if not self.stop_ids:
                raise GuideError("guided decoding needs the model's end ids (generation_config eos_token_id)")
            info = tokenizer_info(path, self.vocab_size, self.stop_ids)
            self._json_tokens = json_token_mask(info.decoded_vocab, self.vocab_size, self.stop_ids)
            # our own LRU holds the compiled guides: xgrammar's cache off, one thread (the decoder's step is the
            # parallel work on these cores)
            self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        return self._compiler

    def ready(self, guide: Guide) -> bool:
        """True when the guide is compiled already (its next request costs no compilation). Takes no lock: it must
        answer while another guide compiles."""
        return self._compiler is not None and guide in self._compiled

    def compile(self, guide: Guide):
        """The guide's xgrammar CompiledGrammar, compiled on its first request and then reused."""
        with self._lock:
            hit = self._compiled.get(guide)
            if hit is not None:
                self._compiled.move_to_end(guide)
                self.stats["hits"] += 1
                return hit
        compiler = self.compiler()
        t0 = time.perf_counter()
        try:  # outside the lock: xgrammar releases the GIL while it compiles, and other guides' hits go on
            compiled = _compile(compiler, guide)
        except (RuntimeError, ValueError, TypeError) as e:  # xgrammar's parse and conversion errors
            raise GuideError(f"the {guide.kind} guide cannot be compiled: {_first_line(e)}") from None
        with self._lock:
            self.stats["compile_seconds"] += time.perf_counter() - t0
            self.stats["compiled"] += 1
            self._compiled[guide] = compiled
            if len(self._compiled) > self.max_entries:
                self._compiled.popitem(last=False)
        return compiled

    def matcher(self, guide: Guide) -> Matcher:
        """A new matcher for one request; GuideError when the guide cannot compile or admits no answer at all."""
        compiled = self.compile(guide)
        m = Matcher(compiled, self.vocab_size, self._json_tokens if guide.kind in (JSON, JSON_SCHEMA) else None)
        if not m.fill().any():
            raise GuideError(f"the {guide.kind} guide admits no answer (no token can start it, and it is not complete "
                             f"when empty)")
        return m


# JSON guides are compiled compact (any_whitespace=False: ", " and ": " separators, no other whitespace). xgrammar's
# default allows any whitespace between tokens, and a model may then emit whitespace until max_tokens: seen with the
# test checkpoint, 150 of 200 tokens of "\n\r\t" inside a 6-field object. TensorRT-LLM 1.2's GuidedDecoder compiles
# with the defaults and its backend takes no option for it (docs/structured-output.md, "The two targets").
# json (TensorRT-LLM's kJSON: xgrammar's builtin JSON grammar, an object or an array) is the same language here.
ANY_JSON_SCHEMA = '{"type": ["object", "array"]}'


def tokenizer_info(tokenizer_json: Path, vocab_size: int, stop_ids: tuple[int, ...]):
    """xgrammar's TokenizerInfo of a tokenizer.json, read as TensorRT-LLM's executor reads the backend's tokenizer
    info file (build/trtllm_guided.py): each token at its id, the vocab type and prefix-space flag detected from the
    tokenizer's JSON, `vocab_size` (the model's logits) as the mask's width, `stop_ids` as what a completed grammar
    allows. The same vocabulary as xgrammar's TokenizerInfo.from_huggingface (tests/test_structured_output.py)."""
    import xgrammar as xgr
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    encoded = [""] * vocab_size
    for token, tid in tok.get_vocab(with_added_tokens=True).items():
        if tid < vocab_size:
            encoded[tid] = token
    meta = xgr.TokenizerInfo._detect_metadata_from_hf(tok.to_str())  # what the C++ FromHuggingFace detects
    return xgr.TokenizerInfo(encoded, meta["vocab_type"], vocab_size=vocab_size, stop_token_ids=list(stop_ids),
                             add_prefix_space=meta["add_prefix_space"])


def json_token_mask(decoded_vocab: list[bytes], vocab_size: int, stop_ids: tuple[int, ...]) -> torch.Tensor:
    """The tokens that may appear in compact JSON: those without a raw byte 0x00-0x1F (RFC 8259 section 7: a string
    must escape U+0000-U+001F, and compact JSON has no whitespace but the separators' spaces), and the stop ids.

    xgrammar 0.2.9 lowers a string with minLength / maxLength to a repetition of [^"\\\r\n], which lets a raw tab or
    any other control character into the string: invalid JSON (mlc-ai/xgrammar issue #800, open; fixes proposed in
    PRs #822 and #880). Seen here: hypothesis-generated schemas answered with a raw control character inside a bounded
    string (tests/test_structured_output.py). Masking these tokens as well never removes a valid continuation of
    compact JSON, and closes the hole on the CPU target (TensorRT-LLM's xgrammar on the GPU target keeps it:
    docs/structured-output.md)."""
    import torch
    import xgrammar as xgr

    allowed = torch.zeros(vocab_size + 31, dtype=torch.bool)
    for tid, text in enumerate(decoded_vocab[:vocab_size]):
        allowed[tid] = bool(text) and min(text) >= 0x20
    allowed[list(stop_ids)] = True
    bits = allowed[: -(-vocab_size // 32) * 32].view(-1, 32).to(torch.int64)  # [W, 32]
    words = (bits << torch.arange(32)).sum(dim=1)  # bit j of word w = token 32 w + j
    mask = xgr.allocate_token_bitmask(1, vocab_size)
    mask[0] = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return mask


def _compile(compiler, guide: Guide):
    import xgrammar as xgr

    if guide.kind == JSON:
        return compiler.compile_json_schema(ANY_JSON_SCHEMA, any_whitespace=False, strict_mode=False)
    if guide.kind == JSON_SCHEMA:
        return compiler.compile_json_schema(guide.text, any_whitespace=False)
    if guide.kind == REGEX:
        return compiler.compile_regex(guide.text)
    if guide.kind == EBNF:
        return compiler.compile_grammar(xgr.Grammar.from_ebnf(guide.text))
    raise GuideError(f"unknown guide kind {guide.kind!r}")  # Guide refuses it first


def _first_line(e: BaseException) -> str:
    """xgrammar's message without its log prefix ("[21:18:50] /project/cpp/json_schema_converter.cc:5082: ")."""
    text = (str(e).strip() or type(e).__name__).splitlines()[0]
    return re.sub(r"^\[[0-9:]+\] \S+:[0-9]+: ", "", text)[:500]


class Matcher:
    """One request's grammar state: the tokens it allows next (`fill`), and each token it is given (`advance`)."""

    def __init__(self, compiled, vocab_size: int, also: torch.Tensor | None = None):
        """also: a bitmask the allowed tokens are intersected with (json_token_mask for JSON guides)."""
        import xgrammar as xgr

        self._m = xgr.GrammarMatcher(compiled)
        self.bitmask = xgr.allocate_token_bitmask(1, vocab_size)  # int32 [1, ceil(V / 32)]
        self.also = also
        self.tokens = 0

    def fill(self) -> torch.Tensor:
        """This row's bitmask of the allowed next tokens (int32 [1, ceil(V / 32)], bit set = allowed)."""
        self._m.fill_next_token_bitmask(self.bitmask)
        if self.also is not None:
            self.bitmask &= self.also
        return self.bitmask

    def advance(self, token: int) -> bool:
        """Accept a generated token; True when the grammar is complete and has taken its stop token (the answer ends
        there). GuideError if the grammar does not allow the token (the row's mask allowed none: it admits no
        continuation)."""
        if not self._m.accept_token(int(token)):
            raise GuideError(f"the guide admits no continuation after {self.tokens} tokens (token {token} refused)")
        self.tokens += 1
        return self._m.is_terminated()


def mask_rows(logits: torch.Tensor, matchers: list[Matcher | None]) -> torch.Tensor:
    """logits [B, V]: the rows that have a matcher get -inf where their grammar allows no token (in place, in the
    logits' own dtype); rows without one are not touched. Returns logits."""
    import torch
    import xgrammar as xgr

    rows = [i for i, m in enumerate(matchers) if m is not None]
    if not rows:
        return logits
    bitmask = torch.cat([matchers[i].fill() for i in rows])  # [G, ceil(V / 32)]
    # the kernel indexes bitmask rows by the same indices as logits rows: scatter into a [B, …] mask
    full = torch.full((logits.shape[0], bitmask.shape[1]), -1, dtype=bitmask.dtype)
    full[rows] = bitmask
    xgr.apply_token_bitmask_inplace(logits, full, vocab_size=logits.shape[-1], indices=rows)
    return logits
