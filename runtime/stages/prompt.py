"""Fusion: chat template + tokens + audio embeddings → the inputs of TensorRT-LLM's `tensorrtllm` backend.

No transformers at serve time: the checkpoint's own chat template is rendered with jinja2 and tokenized with
the `tokenizers` library from tokenizer.json. Each `<sound>` placeholder is expanded to one fake id per audio
token, `vocab_size + k`, where vocab_size is the decoder's embedding size (engine/checkpoint config, never the
tokenizer size); row k of the request's prompt table is the k-th valid audio embedding. The decoder embeds
ids ≥ vocab_size from that table: exactly AF3's masked_scatter of audio features into `<sound>` slots.

With TensorRT-LLM's KV-cache reuse on, fusion also sends prompt_table_extra_ids (table_extra_ids below).
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from af3trt.runtime.stages import lengths, sampling
from af3trt.runtime.stages.conversation import AUDIO_TOKEN, Conversation, PromptError, shorthand

__all__ = ["AUDIO_TOKEN", "FusionLimits", "PromptBuilder", "PromptError", "Sampling", "check_sampling",
           "table_extra_ids"]


@dataclass(frozen=True)
class FusionLimits:
    """What the prompt builder and the sampling checks read (fusion's parameters: runtime/stages/params.py
    FusionParams)."""

    vocab_size: int  # first fake id
    hidden_size: int
    dtype: str  # decoder dtype: "float32" | "float16" | "bfloat16"
    end_id: int
    pad_id: int
    max_input_len: int
    max_output_len: int
    default_max_tokens: int
    prompt_table_extra_ids: bool = False  # also emit prompt_table_extra_ids (TensorRT-LLM KV-cache reuse)
    stop_ids: tuple[int, ...] = ()  # the checkpoint's other end ids: stop_words_list (runtime/stages/stop_words.py)


def load_chat_template(tokenizer_dir: Path) -> str:
    """The processor's chat template, wherever the checkpoint keeps it."""
    d = Path(tokenizer_dir)
    if (d / "chat_template.jinja").exists():
        return (d / "chat_template.jinja").read_text(encoding="utf-8")
    for name in ("chat_template.json", "processor_config.json", "tokenizer_config.json"):
        f = d / name
        if f.exists():
            tpl = json.loads(f.read_text(encoding="utf-8")).get("chat_template")
            if isinstance(tpl, str):
                return tpl
    raise FileNotFoundError(f"no chat template in {d} (chat_template.jinja / *.json)")


class PromptBuilder:
    """Chat template + tokenizer for fusion. The token ids of a rendered conversation are kept in a small LRU keyed
    by the Conversation itself (hashable; audio parts are clip references, not audio): requests that share their
    text (a fixed instruction with new audio each time, a retry) skip rendering and tokenizing. Exact: the template
    is rendered with nothing but (messages, add_generation_prompt) — no globals such as the date — and the tokenizer
    is deterministic, so a hit returns what a miss computes."""

    TEXT_CACHE_ENTRIES = 1024
    TEXT_CACHE_MAX_CHARS = 8192  # longer conversations (long multi-turn histories) are tokenized every time

    def __init__(self, tokenizer_dir: Path, limits: FusionLimits):
        import jinja2
        from tokenizers import Tokenizer

        self.limits = limits
        self.tokenizer = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
        self.audio_token_id = self.tokenizer.token_to_id(AUDIO_TOKEN)
        if self.audio_token_id is None:
            raise ValueError(f"{AUDIO_TOKEN} is not a token of {tokenizer_dir}/tokenizer.json")
        env = jinja2.Environment(undefined=jinja2.StrictUndefined, trim_blocks=False, lstrip_blocks=False)
        self.template = env.from_string(load_chat_template(tokenizer_dir))
        self._text_ids: OrderedDict[Conversation, np.ndarray] = OrderedDict()
        self.text_cache_stats = {"hits": 0, "misses": 0}

    def render(self, prompt: str, system_prompt: str | None, n_audio: int) -> str:
        """The chat text of the one-turn shorthand: one user turn, its clips before the prompt."""
        return self.render_conversation(shorthand(prompt, system_prompt, n_audio))

    def render_conversation(self, conv: Conversation) -> str:
        return self.template.render(messages=conv.template_messages(), add_generation_prompt=True)

    def build(self, prompt: str, system_prompt: str | None, audio_embeds: np.ndarray, mask: np.ndarray,
              audio_windows: list[int]):
        """The one-turn shorthand (text_input + system_prompt): see build_conversation."""
        return self.build_conversation(shorthand(prompt, system_prompt, len(audio_windows)), audio_embeds, mask,
                                       audio_windows)

    def build_conversation(self, conv: Conversation, audio_embeds: np.ndarray, mask: np.ndarray,
                           audio_windows: list[int]):
        """(input_ids int32 [L], prompt table [N, H] float32 numpy) for one request.

        audio_embeds: [W, T/4, H] encoder output; mask: [W, T] the windows' mel masks (T: the request's frame
        bucket); audio_windows: windows of each clip in order (windows past their sum are placeholders for text-only
        requests). The table holds every clip's valid rows in clip order; each audio part becomes a run of fake ids
        addressing its clip's rows.
        """
        rows = window_rows(mask, audio_windows)
        ids = self.build_ids(conv, rows, audio_windows)
        # Valid rows of each window, in order: [N, H] (af3trt.kernels.table does the same on the device).
        parts = [audio_embeds[w, :n] for w, n in enumerate(rows)]
        table = np.concatenate(parts, 0) if parts else np.zeros((0, self.limits.hidden_size), np.float32)
        return ids, table

    def text_ids(self, conv: Conversation) -> np.ndarray:
        """The rendered conversation's token ids, <sound> placeholders included: int32 [L'], read-only (shared by
        the requests of one conversation through the LRU)."""
        ids = self._text_ids.get(conv)
        if ids is not None:
            self._text_ids.move_to_end(conv)
            self.text_cache_stats["hits"] += 1
            return ids
        self.text_cache_stats["misses"] += 1
        text = self.render_conversation(conv)
        ids = np.asarray(self.tokenizer.encode(text, add_special_tokens=False).ids, np.int32)
        ids.flags.writeable = False
        if len(text) <= self.TEXT_CACHE_MAX_CHARS:
            self._text_ids[conv] = ids
            if len(self._text_ids) > self.TEXT_CACHE_ENTRIES:
                self._text_ids.popitem(last=False)
        return ids

    def build_ids(self, conv: Conversation, rows: list[int], audio_windows: list[int]) -> np.ndarray:
        """input_ids int32 [L] for a request whose windows keep rows[w] table rows each (window_rows)."""
        ids = self.text_ids(conv)  # [L'] with <sound> placeholders
        per_clip, w = [], 0
        for n_win in audio_windows:
            per_clip.append(sum(rows[w: w + n_win]))
            w += n_win
        first_row = np.concatenate([[0], np.cumsum(per_clip)]).astype(int)  # [clips + 1]

        at = np.flatnonzero(ids == self.audio_token_id)  # the placeholders' positions
        runs = self._placeholder_runs(conv, len(at))
        # Expand the k-th <sound> into the fake ids of its clips: vocab_size + (row of that clip's table rows).
        parts, start = [], 0
        for k, pos in enumerate(at):
            parts.append(ids[start:pos])
            parts += [np.arange(self.limits.vocab_size + first_row[clip],
                                self.limits.vocab_size + first_row[clip] + per_clip[clip]) for clip in runs[k]]
            start = pos + 1
        parts.append(ids[start:])
        out = np.concatenate(parts).astype(np.int32)
        n_audio = sum(per_clip[c] for run in runs for c in run)
        if len(out) > self.limits.max_input_len:
            raise PromptError(f"prompt too long: {len(out)} tokens ({len(out) - n_audio} text + {n_audio} audio) "
                              f"> max_input_len {self.limits.max_input_len}")
        return out

    @staticmethod
    def _placeholder_runs(conv: Conversation, n_placeholders: int) -> list[list[int]]:
        """The clips each rendered <sound> stands for. A template that writes one <sound> per audio part maps them
        one to one; AF3's writes one per message that has audio, which then stands for that message's clips in
        order (their placeholder runs back to back)."""
        order = conv.audio_order()
        if n_placeholders == len(order):
            return [[k] for k in order]
        per_message = conv.audio_per_message()
        if n_placeholders == len(per_message):
            runs, i = [], 0
            for n in per_message:
                runs.append(order[i: i + n])
                i += n
            return runs
        raise PromptError(f"the chat template placed {n_placeholders} audio placeholders for {len(order)} audio "
                          f"parts in {len(per_message)} messages")


def window_rows(mask: np.ndarray, audio_windows: list[int]) -> list[int]:
    """Valid encoder rows of each of the request's windows (the first sum(audio_windows) rows of mask [W, T])."""
    return [lengths.embeds_valid_per_window(int(mask[w].sum())) for w in range(sum(audio_windows))]


def table_extra_ids(ids: np.ndarray, keys: np.ndarray, vocab_size: int, rows: list[int]) -> np.ndarray:
    """TensorRT-LLM's prompt_table_extra_ids for one request: uint64 [L], 0 for text tokens and, for every fake id
    (>= vocab_size), one id >= 1 that identifies the audio row it addresses.

    With KV-cache reuse, TensorRT-LLM keys each cached block by its (token id, extra id) pairs (generated tokens get
    0), chained over the blocks before it; the extra id is per token (NVIDIA/TensorRT-LLM a98a9061
    cpp/tests/unit_tests/executor/serializeUtilsTest.cpp, BlockKeyBasic: a BlockKey of UniqueToken{id, extra id}).
    Fake ids are the same in every request (vocab_size + row), so the extra id is what tells two tables apart: each
    window's rows get 64 bits of BLAKE2b over the window's key (audio_digest, by its content, computed once in
    preprocess: runtime/stages/audio_cache.py) and its first row. Two prompts then share blocks exactly as far as
    they hold the same tokens and the same windows at the same rows: the same clip asked again with another
    question, or a clip that starts with the same windows (a live session's turn sent ahead,
    runtime/openai/realtime_session.py); different audio never does. The table itself (215 MB for 10 min of AF3
    audio) is neither copied nor hashed.
    ids: [L] int32 prompt; keys: uint64 [W, 2], the request's window keys; rows: valid rows of each window
    (window_rows), in table order.
    """
    fake = ids >= vocab_size
    out = np.zeros(len(ids), np.uint64)
    if fake.any():
        first = np.concatenate([[0], np.cumsum(rows, dtype=np.int64)])  # [W + 1]: each window's first row
        per_window = np.array([int.from_bytes(hashlib.blake2b(
            np.ascontiguousarray(keys[w], np.uint64).tobytes() + int(first[w]).to_bytes(8, "little"),
            digest_size=8).digest(), "little") or 1 for w in range(len(rows))], np.uint64)  # [W]
        window_of_row = np.repeat(np.arange(len(rows)), rows)  # [N]
        out[fake] = per_window[window_of_row[ids[fake] - vocab_size]]
    return out


@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    top_k: int
    top_p: float
    temperature: float
    repetition_penalty: float
    seed: int
    stream: bool
    min_tokens: int = 0  # the end id is not chosen before this many tokens (TensorRT-LLM's minTokens)
    ignore_eos: bool = False  # no end id (end_id -1) and no stop words: exactly max_tokens tokens


def check_sampling(limits: FusionLimits, max_tokens=None, temperature=None, top_k=None, top_p=None,
                   repetition_penalty=None, seed=None, stream=None, min_tokens=None, ignore_eos=None) -> Sampling:
    """Validate a request's generation parameters and map them to the decoder's (TensorRT-LLM's) semantics
    (runtime/stages/sampling.py): greedy unless asked otherwise; temperature 0 means greedy (runtime_top_k = 1)."""
    mt = limits.default_max_tokens if max_tokens is None else int(max_tokens)
    if not 1 <= mt <= limits.max_output_len:
        raise PromptError(f"max_tokens must be in [1, {limits.max_output_len}], got {mt}")
    try:
        p = sampling.from_request(temperature, top_k, top_p, repetition_penalty, seed)
    except sampling.SamplingError as e:
        raise PromptError(str(e)) from None
    least = 0 if min_tokens is None else int(min_tokens)
    if not 0 <= least <= mt:
        raise PromptError(f"min_tokens must be in [0, max_tokens = {mt}], got {least}")
    return Sampling(mt, p.top_k, p.top_p, p.temperature, p.repetition_penalty, p.seed, bool(stream), least,
                    bool(ignore_eos))
