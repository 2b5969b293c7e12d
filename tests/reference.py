"""transformers' AF3 as the reference the served ensemble is compared with, token for token.

`Reference.generate` / `generate_conversation` feed AudioFlamingo3Processor.apply_chat_template to
AudioFlamingo3ForConditionalGeneration.generate (greedy). The processor takes one audio per conversation; for more,
`model_inputs` builds the model's inputs from the processor's parts: its rendered text (tokenize=False), its
features of each clip (one single-clip call each), each <sound> replaced by the placeholder runs of its message's
clips, the clips' windows concatenated in that order (what the model's masked_scatter fills the runs from).
Audio is decoded here independently of af3trt (soundfile, scipy resampling). TensorRT-LLM stops on one end id and
leaves it out of output_ids; the reference's trailing end token is dropped before comparing.
"""

from __future__ import annotations

import io
import threading
from typing import Callable

import numpy as np
import soundfile as sf

MAX_TOKENS = 24


def wav_bytes(wave: np.ndarray, sr: int, fmt: str = "WAV") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wave, sr, format=fmt)
    return buf.getvalue()


def mono16k(data: bytes) -> np.ndarray:
    """The reference's own decoding: soundfile, channel mean, scipy polyphase resampling to 16 kHz."""
    from math import gcd

    from scipy.signal import resample_poly

    wave, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    wave = wave.mean(axis=1)
    if sr != 16000:
        g = gcd(16000, sr)
        wave = resample_poly(wave, 16000 // g, sr // g).astype(np.float32)
    return wave


def hf_conversation(messages: list[dict], waves: list[np.ndarray]) -> list[dict]:
    """Our `messages` (audio parts by audio_index) → the processor's conversation (audio parts carry the wave)."""
    out = []
    for m in messages:
        content = m["content"]
        if not isinstance(content, str):
            content = [{"type": "audio", "audio": waves[p["audio_index"]]} if p["type"] == "audio" else dict(p)
                       for p in content]
        out.append({"role": m["role"], "content": content})
    return out


class Reference:
    def __init__(self, ckpt, think: bool = False):
        """think: AF3's thinking mode as users load it (AF3 README, stage 3.5; docs/thinking.md): think/'s
        non_lora_trainables.bin into the model with strict=False, then PeftModel.from_pretrained(model, ckpt,
        subfolder="think"). Prompts are not changed here: a test writes the think suffix into its own prompt."""
        import torch
        from transformers import AudioFlamingo3ForConditionalGeneration, AutoProcessor

        self.torch = torch
        self.processor = AutoProcessor.from_pretrained(ckpt)
        self.model = AudioFlamingo3ForConditionalGeneration.from_pretrained(ckpt).eval()
        if think:
            from pathlib import Path

            from peft import PeftModel

            state = torch.load(Path(ckpt) / "think" / "non_lora_trainables.bin", weights_only=True)
            missing_or_unexpected = self.model.load_state_dict(state, strict=False)
            assert not missing_or_unexpected.unexpected_keys, missing_or_unexpected.unexpected_keys
            self.model = PeftModel.from_pretrained(self.model, str(ckpt), subfolder="think").eval()
        # Our CPU encoder backend computes in float32 whatever the checkpoint dtype (the exported ONNX graph);
        # the embeddings enter the language model in its own dtype. The reference does the same.
        af3 = self.model.get_base_model() if think else self.model
        af3.model.audio_tower.float()
        af3.model.multi_modal_projector.float()
        self.end_id = self.model.generation_config.eos_token_id[0]
        self.eos_ids = list(self.model.generation_config.eos_token_id)  # generate stops on any (and so do we)
        self.lock = threading.Lock()

    def generate(self, prompt: str, wave: np.ndarray | None = None, system: str | None = None,
                 max_new_tokens: int = MAX_TOKENS, guide: tuple[str, str] | None = None) -> list[int]:
        """guide: (kind, text) in TensorRT-LLM's guide types: generate with xgrammar's own transformers logits
        processor for it (grammar_processor)."""
        content = ([{"type": "audio", "audio": wave}] if wave is not None else []) + [{"type": "text", "text": prompt}]
        conv = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
        return self._generate(self.processor.apply_chat_template(conv, tokenize=True, return_dict=True,
                                                                 add_generation_prompt=True), max_new_tokens,
                              self.grammar_processors(*guide) if guide else None)

    def grammar_processors(self, kind: str, text: str) -> list:
        """xgrammar's transformers integration (xgrammar.contrib.hf.LogitsProcessor) for a guide, over xgrammar's own
        reading of the processor's tokenizer (TokenizerInfo.from_huggingface, the model's vocab size, its end ids as
        stop tokens), compiled as docs/structured-output.md says the server compiles it: JSON compact, strict; for
        JSON guides also a processor that forbids the tokens holding a raw control byte (the server's workaround for
        xgrammar issue #800, written here from its documented rule, not from the server's code)."""
        import xgrammar as xgr
        from xgrammar.contrib.hf import LogitsProcessor

        if not hasattr(self, "_compiler"):
            self._grammar_vocab = xgr.TokenizerInfo.from_huggingface(
                self.processor.tokenizer, vocab_size=self.model.config.text_config.vocab_size,
                stop_token_ids=self.eos_ids)
            self._compiler = xgr.GrammarCompiler(self._grammar_vocab)
        compile_ = {"json": lambda: self._compiler.compile_json_schema('{"type": ["object", "array"]}',
                                                                       any_whitespace=False, strict_mode=False),
                    "json_schema": lambda: self._compiler.compile_json_schema(text, any_whitespace=False),
                    "regex": lambda: self._compiler.compile_regex(text),
                    "ebnf_grammar": lambda: self._compiler.compile_grammar(text)}[kind]
        processors = [LogitsProcessor(compile_())]
        if kind in ("json", "json_schema"):
            from transformers import LogitsProcessor as Base

            banned = self.torch.tensor([i for i, t in enumerate(self._grammar_vocab.decoded_vocab)
                                        if t and min(t) < 0x20 and i not in self.eos_ids], dtype=self.torch.long)

            class NoControlBytes(Base):
                def __call__(self, input_ids, scores):
                    return scores.index_fill(1, banned, -float("inf"))

            processors.append(NoControlBytes())
        return processors

    def generate_conversation(self, messages: list[dict], waves: list[np.ndarray],
                              max_new_tokens: int = MAX_TOKENS) -> list[int]:
        return self._generate(self.model_inputs(messages, waves), max_new_tokens)

    def model_inputs(self, messages: list[dict], waves: list[np.ndarray]) -> dict:
        """The model's inputs for a conversation: the processor's own when it has at most one audio part, else
        built from the processor's parts (module docstring)."""
        conv = hf_conversation(messages, waves)
        parts = [[p["audio_index"] for p in m["content"] if p["type"] == "audio"]
                 for m in messages if not isinstance(m["content"], str)]
        parts = [p for p in parts if p]  # clip indices of each message with audio
        if sum(map(len, parts)) <= 1:
            return self.processor.apply_chat_template(conv, tokenize=True, return_dict=True,
                                                      add_generation_prompt=True)
        token = self.processor.audio_token
        text = self.processor.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        assert text.count(token) == len(parts), "AF3's template writes one <sound> per message with audio"
        per_clip = [self.processor(text=token, audio=w) for w in waves]  # features + placeholder run of each clip
        runs = [int((c["input_ids"][0] == self.processor.audio_token_id).sum()) for c in per_clip]
        pieces = text.split(token)
        text = pieces[0] + "".join(token * sum(runs[k] for k in clips) + rest for clips, rest in zip(parts, pieces[1:]))
        order = [k for clips in parts for k in clips]
        inputs = dict(self.processor.tokenizer(text, return_tensors="pt"))
        inputs["input_features"] = self.torch.cat([per_clip[k]["input_features"] for k in order])
        inputs["input_features_mask"] = self.torch.cat([per_clip[k]["input_features_mask"] for k in order])
        return inputs

    def _generate(self, inputs, max_new_tokens: int, logits_processor=None) -> list[int]:
        with self.lock, self.torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                      eos_token_id=self.eos_ids, pad_token_id=self.end_id,
                                      **({"logits_processor": logits_processor} if logits_processor else {}))
        ids = out[0, inputs["input_ids"].shape[1]:].tolist()
        return ids[:-1] if ids and ids[-1] in self.eos_ids else ids


def run_alongside(good: Callable[[], list[int]], bad: dict[str, Callable[[], object]], n_good: int = 2):
    """Run `good` n_good times and every call of `bad` at once, each in its own thread. Returns the good calls'
    results by index and, by name, the message of the AF3Error each bad call raised ("no error" if none)."""
    from af3trt.runtime.client.library import AF3Error

    results: dict[int, list[int]] = {}
    errors: dict[str, str] = {}

    def run_good(i):
        results[i] = good()

    def run_bad(name, call):
        try:
            call()
            errors[name] = "no error"
        except AF3Error as e:
            errors[name] = str(e)

    threads = [threading.Thread(target=run_good, args=(i,)) for i in range(n_good)]
    threads += [threading.Thread(target=run_bad, args=item) for item in bad.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    return results, errors
