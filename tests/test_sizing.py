"""The sizing table, computed from the real AF3 config values (written here) and checked against tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from af3trt.build.sizing import (decoder_params, decoder_weight_bytes, dims_from_config, encoder_params,
                                 encoder_weight_bytes, kv_bytes_per_token, main, max_concurrent, prompt_table_bytes,
                                 render_markdown, sizing_table)

# AF3 (nvidia/audio-flamingo-3-hf): Qwen2.5-7B decoder, Whisper-large-v3 encoder.
REFERENCE = Path(__file__).resolve().parent.parent / "docs" / "af3-reference"
AF3_CONFIG = json.loads((REFERENCE / "config.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def af3():
    return dims_from_config(AF3_CONFIG)


def test_decoder_weights(af3):
    dec, _ = af3
    assert (dec.head_dim, dec.kv_heads) == (128, 4)
    params = decoder_params(dec)
    assert params["embedding"] == params["lm_head"] == 151672 * 3584
    assert params["total"] == 7_612_806_656  # Qwen2.5-7B with AF3's 151,672-row vocabulary
    bf16 = decoder_weight_bytes(dec, "bf16")
    assert bf16 == 2 * params["total"] and 15.2e9 < bf16 < 15.25e9  # ~15.2 GB incl. embeddings and lm_head
    assert decoder_weight_bytes(dec, "fp16") == bf16
    fp8, wo, sq, awq = (decoder_weight_bytes(dec, p) for p in ("fp8", "int8_wo", "int8_sq", "int4_awq"))
    # embeddings and lm_head (2.17 GB) stay bf16; the layers' 6.53 B linear weights shrink to 1 or 0.5 byte
    assert 8.7e9 < fp8 < 8.72e9 and fp8 < wo < sq < bf16
    assert 5.4e9 < awq < 5.6e9
    with pytest.raises(ValueError):
        decoder_weight_bytes(dec, "int2")


def test_encoder_weights(af3):
    _, enc = af3
    p = encoder_params(enc)
    assert p["encoder"] == 636_968_960  # Whisper-large-v3's encoder
    assert p["projector"] == 1280 * 3584 + 3584 + 3584 * 3584 + 3584
    assert 1.30e9 < encoder_weight_bytes(enc) < 1.31e9


def test_kv_and_prompt_table(af3):
    dec, _ = af3
    assert kv_bytes_per_token(dec, "auto") == 2 * 28 * 4 * 128 * 2 == 57344
    assert kv_bytes_per_token(dec, "fp8") == kv_bytes_per_token(dec, "int8") == 28672
    assert prompt_table_bytes(dec, 750) == 750 * 3584 * 2 == 5_376_000  # 30 s
    assert prompt_table_bytes(dec, 15000) == 107_520_000  # 10 min


def test_fit_on_80gb(af3):
    dec, enc = af3
    bf16 = max_concurrent(dec, enc, "bf16", "auto", 600)
    fp8 = max_concurrent(dec, enc, "fp8", "fp8", 600)
    assert 40 <= bf16 <= 60  # ~1.1 GB of KV + prompt table per 10-min request next to 16.5 GB of weights
    assert fp8 > 1.8 * bf16
    assert max_concurrent(dec, enc, "bf16", "auto", 30) > 6 * bf16  # 2,816 vs 17,056 KV tokens
    assert max_concurrent(dec, enc, "bf16", "auto", 600, gpu_bytes=16 * 1024**3) == 0  # weights do not fit


def test_table_and_markdown(af3, tmp_path, capsys):
    table = sizing_table(AF3_CONFIG)
    assert table["audio_tokens"] == {"30s": 750, "600s": 15000}
    assert table["request_tokens"]["600s"] == 17056  # 15000 + 1024 + 1024, whole 32-token blocks
    assert len(table["fit"]) == 18
    md = render_markdown(table)
    assert "| bf16 | 15.23 GB | 16.53 GB |" in md and "| bf16/fp16 (auto) | 57,344 |" in md
    json.dumps(table)
    (tmp_path / "config.json").write_text(json.dumps(AF3_CONFIG))
    assert main(["--hf-model", str(tmp_path), "--gpu", "a100"]) == 0
    out = capsys.readouterr().out
    assert "A100" in out and "### Weights" in out


def test_formulas_match_real_models(tiny_ckpt):
    """Parameter counts equal those of the transformers models built from the same config (on the meta device)."""
    import torch
    from transformers import AudioFlamingo3Config, AudioFlamingo3ForConditionalGeneration

    config = json.loads((tiny_ckpt / "config.json").read_text())
    dec, enc = dims_from_config(config)
    with torch.device("meta"):
        model = AudioFlamingo3ForConditionalGeneration(AudioFlamingo3Config.from_pretrained(tiny_ckpt))
    count = {part: sum(p.numel() for n, p in model.named_parameters() if part in n)
             for part in ("audio_tower", "multi_modal_projector")}
    lm = sum(p.numel() for n, p in model.named_parameters() if "language_model" in n or n.startswith("lm_head"))
    assert decoder_params(dec)["total"] == lm
    assert encoder_params(enc)["encoder"] == count["audio_tower"]
    assert encoder_params(enc)["projector"] == count["multi_modal_projector"]
    # a bare Qwen2 config: no encoder
    assert dims_from_config(config["text_config"])[1] is None


def test_committed_sizing_doc_is_what_the_code_computes(capsys):
    """docs/sizing.md is generated (scripts/gen_docs.sh), never typed: it must equal the code's output."""
    for gpu in ("h100", "a100"):
        main(["--hf-model", str(REFERENCE), "--gpu", gpu])
    generated = capsys.readouterr().out
    committed = (REFERENCE.parent / "sizing.md").read_text(encoding="utf-8")
    assert generated in committed
