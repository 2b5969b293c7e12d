"""Several end ids: TensorRT-LLM's `stop_words_list` format and the stop-token trimming both backends share.

Qwen2.5-style generation configs list several end ids (AF3: `<|im_end|>` and `<|endoftext|>`), and transformers'
`generate` stops on any of them. TensorRT-LLM takes one `end_id` per request; the others go in `stop_words_list`.
The two end a sequence differently (TensorRT-LLM, 1.x line; re-verify before relying on a detail):

- end_id: the sampler does not count the end token in the sequence length, so it never appears in output_ids
  (runtime/engines/decoder.py mirrors that);
- stop words: the executor finishes the request with FinishReason STOP_WORDS and the stop tokens ARE in
  output_ids. tensorrt_llm/executor/result.py `_handle_sequence` shows it: for STOP_WORDS it cuts
  `output.token_ids[:-len(stop_ids)]` itself unless `include_stop_str_in_output`. The C++ `tensorrtllm` Triton
  backend returns the executor's tokens as they are.

So both our decoders return the stop token (the CPU decoder mirrors the executor), and postprocess trims a trailing
stop token as the LLM API does: the ensemble's answer is then what `generate` returns minus its end token.

Format (tensorrtllm backend input `stop_words_list`, INT32 [2, L] per request, [1, 2, L] with the batch dim):
row 0 holds the words' ids concatenated, row 1 the exclusive end offset of each word, padded with -1.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from af3trt.runtime.stages.errors import InvalidRequest


class StopWordsError(InvalidRequest):
    pass


def end_and_stop_ids(eos_ids: Sequence[int]) -> tuple[int, list[int]]:
    """The checkpoint's end ids (generation_config order) → (end_id, the others as single-token stop words)."""
    ids = [int(i) for i in dict.fromkeys(eos_ids)]
    if not ids:
        raise StopWordsError("the checkpoint names no end id (generation_config.eos_token_id)")
    return ids[0], ids[1:]


def stop_words_list(words: Iterable[Sequence[int]]) -> np.ndarray:
    """int32 [2, L] in TensorRT-LLM's format for these stop words (each a sequence of token ids)."""
    flat, offsets = [], []
    for w in words:
        if len(w) == 0:
            raise StopWordsError("empty stop word")
        flat.extend(int(t) for t in w)
        offsets.append(len(flat))
    if not flat:
        raise StopWordsError("no stop words")
    out = np.full((2, len(flat)), -1, np.int32)
    out[0] = flat
    out[1, :len(offsets)] = offsets
    return out


def parse_stop_words_list(arr: np.ndarray) -> tuple[tuple[int, ...], ...]:
    """The stop words of a [2, L] (or [1, 2, L]) stop_words_list tensor."""
    a = np.asarray(arr)
    if a.ndim == 3 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 2 or a.shape[0] != 2:
        raise StopWordsError(f"stop_words_list must be [2, L] or [1, 2, L], got {list(np.shape(arr))}")
    words, start = [], 0
    for end in a[1]:
        end = int(end)
        if end < 0:
            break
        if not start < end <= a.shape[1]:
            raise StopWordsError(f"stop_words_list offsets must increase within 1..{a.shape[1]}, got {a[1].tolist()}")
        words.append(tuple(int(t) for t in a[0, start:end]))
        start = end
    return tuple(words)


def ends_with_stop_word(generated: Sequence[int], words: Iterable[Sequence[int]]) -> bool:
    """True when the generated tokens end with one of the stop words."""
    n = len(generated)
    return any(len(w) <= n and tuple(generated[n - len(w):]) == tuple(w) for w in words)


def trim_stop_token(tokens: np.ndarray, stop_ids: Iterable[int]) -> np.ndarray:
    """Drop a trailing single-token stop word from a response's tokens (what the LLM API does with
    include_stop_str_in_output False). A stop token ends generation, so it can only be the last token."""
    stop = set(int(i) for i in stop_ids)
    if len(tokens) and int(tokens[-1]) in stop:
        return tokens[:-1]
    return tokens
