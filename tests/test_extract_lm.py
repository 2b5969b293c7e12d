"""The extracted language model is AF3's decoder, exactly, under Qwen2ForCausalLM names and a portable config."""

from __future__ import annotations

import json

import pytest
import torch

from af3trt.export.extract_lm import ExtractError, extract_language_model, lm_key, qwen2_config

TOKENIZER_INPUT = "hello <sound> world<|im_end|>"


@pytest.fixture(scope="module")
def extracted(tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("lm") / "qwen2"
    return out, extract_language_model(tiny_ckpt, out)


@pytest.fixture(scope="module")
def af3(ref):
    return ref.model  # transformers' AF3, loaded once per session (conftest)


def test_logits_equal_af3_language_model(extracted, af3):
    from transformers import Qwen2ForCausalLM

    lm_dir, _ = extracted
    qwen = Qwen2ForCausalLM.from_pretrained(lm_dir).eval()
    hidden = af3.config.text_config.hidden_size
    x = torch.randn(2, 11, hidden, generator=torch.Generator().manual_seed(0))  # inputs_embeds [B, S, H]
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, :3] = 0  # a left-padded row too
    with torch.no_grad():
        ref = af3.lm_head(af3.model.language_model(inputs_embeds=x, attention_mask=mask).last_hidden_state)
        got = qwen(inputs_embeds=x, attention_mask=mask).logits
    assert got.shape == ref.shape == (2, 11, af3.config.text_config.vocab_size)
    assert (got - ref).abs().max().item() <= 1e-5


def test_summary(extracted, af3):
    lm_dir, summary = extracted
    text = af3.config.text_config
    assert summary["dtype"] == "float32"
    assert summary["shards"] == ["model.safetensors"]
    assert summary["shapes"]["model.embed_tokens.weight"] == [text.vocab_size, text.hidden_size]
    assert summary["shapes"]["lm_head.weight"] == [text.vocab_size, text.hidden_size]
    lm_params = sum(p.numel() for p in af3.model.language_model.parameters()) + af3.lm_head.weight.numel()
    assert summary["n_params"] == lm_params
    assert len(summary["sha256"]) == 64
    assert (summary["vocab_size"], summary["hidden_size"], summary["rope_theta"]) == (text.vocab_size,
                                                                                      text.hidden_size, 1e6)


def test_config_for_transformers_5_4_and_trtllm(extracted, af3):
    from transformers import AutoConfig

    lm_dir, _ = extracted
    text = af3.config.text_config
    raw = json.loads((lm_dir / "config.json").read_text())
    # What TensorRT-LLM 1.2's QWenConfig.from_hugging_face reads (through transformers 4.57's Qwen2Config, which
    # keeps these top-level fields as they are in the json).
    assert raw["architectures"][0] == "Qwen2ForCausalLM"
    assert raw["model_type"] == "qwen2"
    assert "rope_theta" in raw, "QWenConfig falls back to rotary_base 1e5 when rope_theta is missing"
    assert raw["rope_theta"] == 1e6
    assert raw["rms_norm_eps"] == text.rms_norm_eps
    assert raw["hidden_act"] == "silu"
    assert raw["torch_dtype"] == raw["dtype"] == "float32"
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings"):
        assert raw[key] == getattr(text, key), key
    assert raw["tie_word_embeddings"] is False
    assert raw.get("rope_scaling") is None  # 4.57 passes it on as TRT-LLM's rotary_scaling
    # transformers 5.x
    cfg = AutoConfig.from_pretrained(lm_dir)
    assert type(cfg).__name__ == "Qwen2Config"
    assert cfg.rope_parameters["rope_theta"] == 1e6 and cfg.rope_parameters["rope_type"] == "default"


def test_tokenizer_files_portable(extracted, tiny_ckpt):
    from transformers import AutoTokenizer

    lm_dir, _ = extracted
    assert (lm_dir / "tokenizer.json").read_bytes() == (tiny_ckpt / "tokenizer.json").read_bytes()
    assert json.loads((lm_dir / "generation_config.json").read_text()) == json.loads(
        (tiny_ckpt / "generation_config.json").read_text())
    assert (lm_dir / "chat_template.jinja").exists()
    tok_cfg = json.loads((lm_dir / "tokenizer_config.json").read_text())
    assert "processor_class" not in tok_cfg
    assert tok_cfg["tokenizer_class"] == "PreTrainedTokenizerFast"  # 4.57 knows no TokenizersBackend
    assert not isinstance(tok_cfg.get("extra_special_tokens"), list)  # 4.57 expects a dict there
    assert "<sound>" in tok_cfg["additional_special_tokens"]
    ours, theirs = AutoTokenizer.from_pretrained(lm_dir), AutoTokenizer.from_pretrained(tiny_ckpt)
    assert ours(TOKENIZER_INPUT).input_ids == theirs(TOKENIZER_INPUT).input_ids
    assert (ours.eos_token, ours.pad_token) == (theirs.eos_token, theirs.pad_token)


def test_sharded_source_and_output(extracted, af3, tiny_ckpt, tmp_path):
    from safetensors.torch import load_file

    lm_dir, summary = extracted
    src = tmp_path / "af3-sharded"
    af3.save_pretrained(src, max_shard_size="300KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (src / name).write_bytes((tiny_ckpt / name).read_bytes())
    assert (src / "model.safetensors.index.json").exists()

    out = tmp_path / "qwen2-sharded"
    sharded = extract_language_model(src, out, max_shard_bytes=200_000)
    assert len(sharded["shards"]) > 1
    assert sharded["sha256"] == summary["sha256"]  # same bytes whatever the sharding, on either side
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == sharded["shards"]
    merged = {}
    for shard in sharded["shards"]:
        merged.update(load_file(out / shard))
    single = load_file(lm_dir / "model.safetensors")
    assert merged.keys() == single.keys()
    assert all(torch.equal(merged[k], single[k]) for k in single)


@pytest.mark.parametrize("af3_name, qwen_name", [
    ("language_model.model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.up_proj.weight"),  # hub layout
    ("language_model.lm_head.weight", "lm_head.weight"),
    ("model.language_model.norm.weight", "model.norm.weight"),  # transformers 5 in-memory layout
    ("lm_head.weight", "lm_head.weight"),
    ("language_model.model.model.embed_tokens.weight", "model.embed_tokens.weight"),  # 5.10–5.23 doubled prefix
    ("audio_tower.conv1.weight", None),
    ("multi_modal_projector.linear_1.bias", None),
    ("model.audio_tower.layer_norm.bias", None),
])
def test_key_names(af3_name, qwen_name):
    assert lm_key(af3_name) == qwen_name


def test_unknown_key_is_an_error():
    with pytest.raises(ExtractError, match="unexpected tensor"):
        lm_key("vision_tower.patch_embed.weight")


def test_rope_theta_sources():
    base = {"vocab_size": 8, "hidden_size": 4, "num_attention_heads": 2, "model_type": "qwen2"}
    legacy = qwen2_config({"text_config": {**base, "rope_theta": 5e5}}, "bfloat16")
    assert legacy["rope_theta"] == legacy["rope_parameters"]["rope_theta"] == 5e5
    assert legacy["torch_dtype"] == legacy["dtype"] == "bfloat16"
    scaled = qwen2_config({"text_config": {**base, "rope_parameters": {"rope_type": "yarn", "factor": 4.0,
                                                                       "rope_theta": 1e6}}}, "bfloat16")
    assert scaled["rope_theta"] == 1e6
    assert scaled["rope_scaling"] == {"type": "yarn", "factor": 4.0}  # the 4.x spelling for legacy readers
    with pytest.raises(ExtractError, match="rope"):
        qwen2_config({"text_config": base}, "bfloat16")
    with pytest.raises(ExtractError, match="text_config"):
        qwen2_config({"model_type": "qwen2"}, "bfloat16")
