"""Synthetic AF3 checkpoints: the real architecture at toy size, written as a complete Hugging Face directory.

`AutoProcessor.from_pretrained(DIR)` and `AudioFlamingo3ForConditionalGeneration.from_pretrained(DIR)` load the
result offline. Weights come from a fixed seed, so their answers are meaningless: they exist to prove that every
stage of the pipeline computes exactly what transformers computes.

    af3trt synth --preset tiny --out /tmp/af3-tiny
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# Special tokens of AF3 (Qwen2.5 chat markup plus the audio placeholder).
ENDOFTEXT, IM_START, IM_END, SOUND = "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<sound>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END, SOUND]

# Qwen2's pre-tokenizer split (the same expression as Qwen2's tokenizer.json).
QWEN2_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# AF3's processor chat template: default system turn, one <sound> before the text of a user turn that carries audio.
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "{% for m in messages if m['content'] is not none %}"
    "<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}"
    "{% set state = namespace(has_audio=False, text='') %}"
    "{% for part in m['content'] %}"
    "{% if part.get('type') == 'audio' or 'audio' in part %}{% set state.has_audio = True %}"
    "{% elif part.get('type') == 'text' or 'text' in part %}{% set state.text = state.text + part['text'] %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if state.has_audio %}<sound>{% endif %}{{ state.text }}"
    "{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class Preset:
    bpe_vocab: int  # learned byte-level BPE vocabulary (special tokens come after it)
    text_vocab_pad: int  # embedding rows are rounded up to a multiple of this (AF3: 151672 rows > tokenizer size)
    enc_hidden: int
    enc_layers: int
    enc_heads: int
    enc_ffn: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    init_std: float  # larger than usual so random logits are well separated and greedy decoding is stable


PRESETS = {
    # a few MB: unit and integration tests
    "tiny": Preset(bpe_vocab=640, text_vocab_pad=64, enc_hidden=64, enc_layers=2, enc_heads=4, enc_ffn=128,
                   hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, init_std=0.25),
    # GPU acceptance (`af3trt gpu-check`): tiny, but with a decoder head size TensorRT-LLM can run. Its generation
    # attention kernels exist for head sizes 32…256 only (decoderMaskedMultiheadAttention{32,48,64,…,256}, see
    # build/gpu_check.py): the tiny preset's 16 builds an engine that fails at its first generated token.
    "tiny-gpu": Preset(bpe_vocab=640, text_vocab_pad=64, enc_hidden=64, enc_layers=2, enc_heads=4, enc_ffn=128,
                       hidden=256, layers=2, heads=4, kv_heads=2, intermediate=512, init_std=0.25),
    # tens of millions of parameters: CPU benchmarks with AF3's structure
    "small": Preset(bpe_vocab=4000, text_vocab_pad=128, enc_hidden=384, enc_layers=4, enc_heads=6, enc_ffn=1536,
                    hidden=512, layers=8, heads=8, kv_heads=2, intermediate=1536, init_std=0.08),
    # the benchmark default: AF3's compute split at toy size. Encoder FLOPs per 30-s window / decoder FLOPs per token
    # = 166 (real AF3, af3trt/reference/config.json: 2.30 TFLOP / 14.1 GFLOP = 163; `small` is 774, encoder-heavy),
    # decoder head_dim 128 as Qwen2.5-7B's; about 37M parameters, so it runs on 2 cores (tests/test_synth.py).
    "af3": Preset(bpe_vocab=4000, text_vocab_pad=128, enc_hidden=256, enc_layers=2, enc_heads=4, enc_ffn=1024,
                  hidden=512, layers=6, heads=4, kv_heads=2, intermediate=3072, init_std=0.08),
}

CORPUS = """\
Audio Flamingo listens to speech, music and everyday sounds, and answers questions about what it hears.
Transcribe the input speech. Describe the music in detail. What sounds can you hear in this recording?
The quick brown fox jumps over the lazy dog while the birds are singing in the garden.
A train arrives at the station; people talk, a door closes, and the engine hums quietly in the background.
The speaker says that the weather will be sunny tomorrow, with a light wind from the west and warm afternoons.
Numbers and times matter: 1, 2, 3, 10, 42, 100, 2025, 9:30 in the morning, 7 o'clock in the evening.
Please summarize the conversation, list the instruments, and tell me the mood of the song in one sentence.
The spoken content of the audio is "hello world, this is a test of the serving pipeline".
"""


def train_tokenizer(vocab_size: int):
    """Byte-level BPE with Qwen2's pre-tokenizer and AF3's special tokens appended after the learned vocabulary."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=1, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    # The corpus is repeated with variations so that merges exist up to the requested size.
    lines = CORPUS.splitlines()
    texts = lines + [f"{a} {b}" for a in lines for b in lines] + [w.lower() for w in " ".join(lines).split()]
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    return tok


def build_config(preset: Preset, tokenizer, dtype: str):
    from transformers import AudioFlamingo3Config, AudioFlamingo3EncoderConfig, Qwen2Config

    n_tokens = tokenizer.get_vocab_size()
    vocab_size = -(-n_tokens // preset.text_vocab_pad) * preset.text_vocab_pad
    text = Qwen2Config(
        vocab_size=vocab_size, hidden_size=preset.hidden, intermediate_size=preset.intermediate,
        num_hidden_layers=preset.layers, num_attention_heads=preset.heads, num_key_value_heads=preset.kv_heads,
        max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
        bos_token_id=tokenizer.token_to_id(ENDOFTEXT), eos_token_id=tokenizer.token_to_id(IM_END),
        initializer_range=preset.init_std, dtype=dtype, use_cache=True,
    )
    audio = AudioFlamingo3EncoderConfig(
        num_mel_bins=128, hidden_size=preset.enc_hidden, num_hidden_layers=preset.enc_layers,
        num_attention_heads=preset.enc_heads, intermediate_size=preset.enc_ffn, max_source_positions=1500,
        initializer_range=preset.init_std,
    )
    return AudioFlamingo3Config(audio_config=audio, text_config=text, audio_token_id=tokenizer.token_to_id(SOUND),
                                dtype=dtype)


def write_checkpoint(out: Path, preset_name: str = "tiny", seed: int = 0, dtype: str = "float32") -> Path:
    """Write a complete HF AF3 directory to `out` and return it."""
    import torch
    from transformers import (AudioFlamingo3ForConditionalGeneration, AudioFlamingo3Processor, GenerationConfig,
                              PreTrainedTokenizerFast, WhisperFeatureExtractor)

    preset = PRESETS[preset_name]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    log.info("training a %d-token byte-level BPE tokenizer", preset.bpe_vocab)
    tok = train_tokenizer(preset.bpe_vocab)
    config = build_config(preset, tok, dtype)

    log.info("initialising weights (seed %d)", seed)
    torch.manual_seed(seed)
    model = AudioFlamingo3ForConditionalGeneration(config)
    # Spread the embedding table so text tokens are as distinguishable as audio embeddings.
    # Damp the output rows of the special tokens and of the padding rows past the tokenizer, so that random
    # answers run for a while before an end token and rarely name an id the tokenizer does not have.
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0.0, 1.0)
        lm_head = model.get_output_embeddings().weight
        lm_head[[tok.token_to_id(t) for t in SPECIAL_TOKENS]] *= 0.2
        lm_head[tok.get_vocab_size():] *= 0.2
    model = model.to(getattr(torch, dtype)).eval()
    eos = [tok.token_to_id(IM_END), tok.token_to_id(ENDOFTEXT)]
    model.generation_config = GenerationConfig(
        bos_token_id=tok.token_to_id(ENDOFTEXT), eos_token_id=eos, pad_token_id=tok.token_to_id(ENDOFTEXT),
        do_sample=False,
    )
    model.save_pretrained(out)

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=IM_END, pad_token=ENDOFTEXT, unk_token=None, bos_token=None,
        additional_special_tokens=[IM_START, SOUND], model_max_length=32768, padding_side="left",
    )
    processor = AudioFlamingo3Processor(
        feature_extractor=WhisperFeatureExtractor(feature_size=128, sampling_rate=16000, chunk_length=30,
                                                  return_attention_mask=True),
        tokenizer=hf_tok, chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(out)

    (out / "af3trt_synth.json").write_text(json.dumps(
        {"preset": preset_name, "seed": seed, "dtype": dtype, "sizes": asdict(preset),
         "note": "synthetic AF3: random weights, meaningless answers; proves the pipeline only"}, indent=2))
    n_params = sum(p.numel() for p in model.parameters())
    log.info("wrote %s (%s preset, %.1fM parameters)", out, preset_name, n_params / 1e6)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(prog="af3trt synth", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    ap.add_argument("--think", action="store_true",
                    help="also write think/: AF3's thinking mode (PEFT LoRA + non_lora_trainables.bin, export/think.py)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = write_checkpoint(args.out, args.preset, args.seed, args.dtype)
    if args.think:
        from af3trt.export.think import write_think

        log.info("wrote %s", write_think(out, args.seed))


if __name__ == "__main__":
    main()
