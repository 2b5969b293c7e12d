"""Synthetic checkpoints: complete HF directories that transformers loads offline, at the advertised sizes."""

from __future__ import annotations

import json

import torch

from af3trt.export import synth


def test_tiny_loads_offline_and_has_af3_tokens(tiny_ckpt, ref):
    processor, model = ref.processor, ref.model  # loaded by transformers with HF_HUB_OFFLINE=1 (conftest `ref`)
    tok = processor.tokenizer
    for t in synth.SPECIAL_TOKENS:
        assert len(tok.encode(t, add_special_tokens=False)) == 1
    assert model.config.audio_token_id == tok.convert_tokens_to_ids("<sound>")
    assert model.config.text_config.vocab_size >= len(tok) and model.config.text_config.vocab_size % 64 == 0
    fe = processor.feature_extractor
    assert (fe.feature_size, fe.sampling_rate, fe.chunk_length) == (128, 16000, 30)
    size = sum(p.stat().st_size for p in tiny_ckpt.iterdir())
    assert size < 5e6
    assert json.loads((tiny_ckpt / "af3trt_synth.json").read_text())["preset"] == "tiny"


def test_fixed_seed_is_reproducible(tmp_path):
    from safetensors.torch import load_file

    a = synth.write_checkpoint(tmp_path / "a", "tiny", seed=0)
    b = synth.write_checkpoint(tmp_path / "b", "tiny", seed=0)
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()


def test_small_preset_is_tens_of_millions_of_parameters():
    from transformers import AudioFlamingo3ForConditionalGeneration

    preset = synth.PRESETS["small"]
    config = synth.build_config(preset, synth.train_tokenizer(preset.bpe_vocab), "float32")
    with torch.device("meta"):
        model = AudioFlamingo3ForConditionalGeneration(config)
    n = sum(p.numel() for p in model.parameters())
    assert 10e6 < n < 100e6, n


def test_af3_preset_has_the_real_compute_split():
    """The benchmark default: encoder FLOPs per 30-s window over decoder FLOPs per token within 10 % of the real AF3's
    (0.65 B encoder + projector, 7.6 B Qwen2.5; af3trt/reference/config.json), decoder head_dim 128, small."""
    from af3trt.build import sizing
    from af3trt.perf import projection

    def split(config: dict) -> tuple[float, int]:
        dec, enc = sizing.dims_from_config(config)
        return projection.encoder_window_flops(enc) / projection.decoder_flops_per_token(dec), dec.head_dim

    from af3trt.registry import af3_reference_config

    want, want_head_dim = split(af3_reference_config())
    preset = synth.PRESETS["af3"]
    got, head_dim = split(synth.build_config(preset, synth.train_tokenizer(preset.bpe_vocab), "float32").to_dict())
    assert 150 < want < 175 and head_dim == want_head_dim == 128
    assert abs(got / want - 1) < 0.10, (got, want)
    small, _ = split(synth.build_config(synth.PRESETS["small"], synth.train_tokenizer(4000), "float32").to_dict())
    assert small > 3 * want  # why `small` is not the default: its encoder weighs 5x too much
