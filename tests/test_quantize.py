"""TensorRT-LLM 1.2 checkpoints written on CPU from the tiny decoder, for every precision, pass the validator."""

from __future__ import annotations

import json

import pytest
import torch

from af3trt.export.trtllm_checkpoint import read_safetensors_header, validate_checkpoint
from af3trt.export.quantize import (CALIBRATION_TEXTS, QuantizeError, awq_block_size_for, hf_rope_scaling,
                                    modelopt_quant_config, patch_trtllm_config, write_trtllm_checkpoint)

pytest.importorskip("modelopt.torch.quantization")

CASES = {  # precision, kv cache -> quant_algo, kv_cache_quant_algo
    ("bf16", "auto"): (None, None),
    ("fp16", "auto"): (None, None),
    ("fp8", "auto"): ("FP8", None),
    ("int8_sq", "auto"): ("W8A8_SQ_PER_CHANNEL", None),
    ("int8_wo", "auto"): ("W8A16", None),
    ("int4_awq", "auto"): ("W4A16_AWQ", None),
    ("fp8", "fp8"): ("FP8", "FP8"),
    ("int8_wo", "int8"): ("W8A16", "INT8"),
}


@pytest.fixture(scope="module")
def checkpoints(lm_dir, tmp_path_factory):
    """Checkpoints written on demand, once per (precision, kv cache, tp)."""
    root, cache = tmp_path_factory.mktemp("ckpts"), {}

    def get(precision, kv_cache="auto", tp_size=1):
        key = (precision, kv_cache, tp_size)
        if key not in cache:
            cache[key] = write_trtllm_checkpoint(lm_dir, root / f"{precision}-{kv_cache}-tp{tp_size}",
                                                 precision=precision, kv_cache=kv_cache, tp_size=tp_size,
                                                 calib_size=2, seed=0)
        return cache[key]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("precision,kv_cache", list(CASES), ids=[f"{p}-{k}" for p, k in CASES])
def test_checkpoint_passes_validator(checkpoints, lm_dir, precision, kv_cache):
    summary = checkpoints(precision, kv_cache)
    ckpt = summary["checkpoint_dir"]
    config = json.loads((lm_dir / "config.json").read_text())
    written = json.loads(open(f"{ckpt}/config.json").read())

    # the qwen2 patch TensorRT-LLM's quantize.py applies after modelopt's export
    assert written["rotary_base"] == config["rope_theta"] == 1e6
    assert written["qwen_type"] == "qwen2"
    assert written["architecture"] == "Qwen2ForCausalLM"
    assert written["norm_epsilon"] == config["rms_norm_eps"]
    assert written["intermediate_size"] == config["intermediate_size"]
    assert written["rotary_scaling"] is None
    algo, kv = CASES[(precision, kv_cache)]
    assert written["quantization"]["quant_algo"] == algo
    assert written["quantization"]["kv_cache_quant_algo"] == kv
    assert written["dtype"] == ("float16" if precision == "fp16" else "bfloat16")

    report = validate_checkpoint(ckpt, hf_config=lm_dir)  # raises on any problem
    assert (report.quant_algo, report.kv_cache_quant_algo, report.tp_size) == (algo, kv, 1)
    assert summary["validation"]["rotary_base"] == 1e6
    assert set(summary["timings"]) == {"load_s", "calibrate_s", "export_s", "validate_s"}
    assert summary["calib_samples"] == (0 if (precision in ("bf16", "fp16", "int8_wo") and kv_cache == "auto") else 2)
    provenance = json.loads(open(f"{ckpt}/af3trt_quant.json").read())
    assert provenance["precision"] == precision and provenance["modelopt_version"]


@pytest.mark.slow
def test_tensor_dtypes_per_precision(checkpoints):
    def tensors(precision, kv="auto"):
        return read_safetensors_header(f"{checkpoints(precision, kv)['checkpoint_dir']}/rank0.safetensors")

    qkv = "transformer.layers.0.attention.qkv"
    fp8 = tensors("fp8", "fp8")
    assert fp8[f"{qkv}.weight"][0] == "float8_e4m3fn"
    assert fp8[f"{qkv}.weights_scaling_factor"][:2] == ("float32", (1,))
    assert fp8[f"{qkv}.activation_scaling_factor"][:2] == ("float32", (1,))
    assert fp8["transformer.layers.1.attention.kv_cache_scaling_factor"][:2] == ("float32", (1,))
    assert fp8["lm_head.weight"][0] == "bfloat16"  # excluded from quantization
    sq = tensors("int8_sq")
    assert sq[f"{qkv}.weight"][:2] == ("int8", (128, 64))
    assert sq[f"{qkv}.weights_scaling_factor"][:2] == ("float32", (128,))
    assert sq[f"{qkv}.prequant_scaling_factor"][:2] == ("bfloat16", (64,))
    wo = tensors("int8_wo")  # TensorRT-LLM 1.2's int8_wo: bf16 weights, trtllm-build quantizes them
    assert wo[f"{qkv}.weight"][:2] == ("bfloat16", (128, 64))
    awq = tensors("int4_awq")
    assert awq[f"{qkv}.weight"][:2] == ("int8", (64, 64))  # int4 pairs: [out/2, in]
    assert awq[f"{qkv}.weights_scaling_factor"][1] == (128, 1)  # [out, in / group 64]


# The linear layers of a TensorRT-LLM Qwen2 checkpoint and the HF weights they hold (TensorRT-LLM names, see
# test_bf16_checkpoint_holds_the_hf_weights): qkv = cat(q, k, v), fc = gate_proj, proj = down_proj, dense = o_proj.
LINEARS = {"attention.qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "mlp.fc": ("mlp.gate_proj",),
           "mlp.proj": ("mlp.down_proj",), "attention.dense": ("self_attn.o_proj",)}


@pytest.mark.slow
def test_quantized_weights_are_the_hf_weights_rounded(checkpoints, lm_dir):
    """The dtype checks above would pass a quantizer that only casts: here every quantized linear weight must be the
    HF weight (in the checkpoint's bf16) really rounded, at the scale its own range gives.

    FP8 (per tensor; TensorRT-LLM's FP8 layout weight float8_e4m3fn + weights_scaling_factor [1]): scale =
    amax(W) / 448 (448: e4m3's largest finite value), so W_fp8 * scale = W within e4m3 rounding (half a step: 2^-4 of
    |W| for normal values, 2^-10 * scale in the subnormal range); most values are not representable exactly.
    INT8 SmoothQuant (per channel; layout int8 [out, in] + weights_scaling_factor [out] + prequant_scaling_factor
    [in] that multiplies the activations): the stored weight is W / s rounded per output row at scale
    amax_row(W / s) / 127, so each row's largest |q| is exactly 127 and |q * scale - W / s| <= scale / 2 plus the
    bf16 rounding of the smoothing (2^-7 of |W / s|); s is not all ones. Checked here: W / s fits, W * s does not.
    Both use more than half of their format's levels (a random-weight tiny model: measured 157-178 fp8 codes of 253,
    245-255 int8 levels of 255)."""
    from safetensors.torch import load_file
    from transformers import Qwen2ForCausalLM

    hf = Qwen2ForCausalLM.from_pretrained(lm_dir).state_dict()
    fp8 = load_file(f"{checkpoints('fp8', 'fp8')['checkpoint_dir']}/rank0.safetensors")
    sq = load_file(f"{checkpoints('int8_sq')['checkpoint_dir']}/rank0.safetensors")
    for layer in (0, 1):
        for trt_name, hf_names in LINEARS.items():
            where = f"layer {layer} {trt_name}"
            w = torch.cat([hf[f"model.layers.{layer}.{n}.weight"] for n in hf_names]).bfloat16().float()
            name = f"transformer.layers.{layer}.{trt_name}"

            q, scale = fp8[f"{name}.weight"].float(), fp8[f"{name}.weights_scaling_factor"].float()
            assert scale.item() == pytest.approx(w.abs().max().item() / 448, rel=1e-3), where
            err = (q * scale - w).abs()
            assert (err <= 2 ** -4 * w.abs() + 2 ** -10 * scale).all(), (where, err.max())
            assert (q * scale != w).float().mean() > 0.5, where  # really rounded, not stored as is
            assert torch.unique(q).numel() > 253 // 2, where

            q, scale = sq[f"{name}.weight"].float(), sq[f"{name}.weights_scaling_factor"].float()  # [out, in], [out]
            smooth = sq[f"{name}.prequant_scaling_factor"].float()  # [in]
            assert (smooth != 1).any(), where
            ws = w / smooth[None, :]
            assert (q.abs().amax(1) == 127).all(), where
            assert torch.allclose(scale, ws.abs().amax(1) / 127, rtol=1e-2), where
            err = (q * scale[:, None] - ws).abs()
            assert (err <= scale[:, None] / 2 + 2 ** -7 * ws.abs()).all(), (where, (err / scale[:, None]).max())
            assert torch.unique(q).numel() > 255 // 2, where


@pytest.mark.slow
def test_int8_wo_config_leaves_default_exclusions(checkpoints):
    written = json.loads(open(f"{checkpoints('int8_wo')['checkpoint_dir']}/config.json").read())
    # exclude_modules absent = TensorRT-LLM's defaults (lm_head, vocab_embedding stay bf16)
    assert "exclude_modules" not in written["quantization"]


@pytest.mark.slow
def test_bf16_checkpoint_holds_the_hf_weights(checkpoints, lm_dir):
    """TensorRT-LLM names: qkv = cat(q, k, v), fc = gate_proj (activated), gate = up_proj, proj = down_proj."""
    from safetensors.torch import load_file
    from transformers import Qwen2ForCausalLM

    ckpt = load_file(f"{checkpoints('bf16')['checkpoint_dir']}/rank0.safetensors")
    hf = Qwen2ForCausalLM.from_pretrained(lm_dir).state_dict()

    def same(trt_name, tensor):
        assert torch.equal(ckpt[trt_name], tensor.to(torch.bfloat16)), trt_name

    p, q = "transformer.layers.1", "model.layers.1"
    same(f"{p}.attention.qkv.weight", torch.cat([hf[f"{q}.self_attn.{x}_proj.weight"] for x in "qkv"]))
    same(f"{p}.attention.qkv.bias", torch.cat([hf[f"{q}.self_attn.{x}_proj.bias"] for x in "qkv"]))
    same(f"{p}.attention.dense.weight", hf[f"{q}.self_attn.o_proj.weight"])
    same(f"{p}.mlp.fc.weight", hf[f"{q}.mlp.gate_proj.weight"])
    same(f"{p}.mlp.gate.weight", hf[f"{q}.mlp.up_proj.weight"])
    same(f"{p}.mlp.proj.weight", hf[f"{q}.mlp.down_proj.weight"])
    same(f"{p}.input_layernorm.weight", hf[f"{q}.input_layernorm.weight"])
    same(f"{p}.post_layernorm.weight", hf[f"{q}.post_attention_layernorm.weight"])
    same("transformer.vocab_embedding.weight", hf["model.embed_tokens.weight"])
    same("transformer.ln_f.weight", hf["model.norm.weight"])
    same("lm_head.weight", hf["lm_head.weight"])


@pytest.mark.slow
def test_tensor_parallel_checkpoint(checkpoints):
    summary = checkpoints("bf16", "auto", 2)
    report = summary["validation"]
    assert report["world_size"] == report["tp_size"] == 2 and len(report["n_tensors"]) == 2
    rank1 = read_safetensors_header(f"{summary['checkpoint_dir']}/rank1.safetensors")
    # 4 heads / 2 KV heads of 16 over 2 ranks: q 2 x 16 + k 16 + v 16 rows
    assert rank1["transformer.layers.0.attention.qkv.weight"][1] == (64, 64)
    assert rank1["transformer.layers.0.mlp.proj.weight"][1] == (64, 64)  # [hidden, intermediate / 2]
    assert rank1["lm_head.weight"][1] == (352, 64)  # vocab 704 / 2


def test_modelopt_configs():
    kv8 = modelopt_quant_config("int8_wo", "int8")
    assert kv8["quant_cfg"][0] == {"quantizer_name": "*", "enable": False}
    assert kv8["quant_cfg"][-1] == {"quantizer_name": "*[kv]_bmm_quantizer", "cfg": {"num_bits": 8, "axis": None}}
    assert modelopt_quant_config("int8_wo", "auto") is None  # nothing to calibrate: bf16 export + W8A16
    assert modelopt_quant_config("int8_wo", "auto", simulate=True) is not None
    assert modelopt_quant_config("bf16") is None
    fp8kv = modelopt_quant_config("fp8", "fp8")
    assert fp8kv["quant_cfg"][-1]["quantizer_name"] == "*[kv]_bmm_quantizer"
    awq = modelopt_quant_config("int4_awq", awq_block_size=64)
    assert [e for e in awq["quant_cfg"] if e.get("quantizer_name") == "*weight_quantizer"][0]["cfg"][
        "block_sizes"][-1] == 64
    import modelopt.torch.quantization as mtq
    assert [e for e in mtq.INT4_AWQ_CFG["quant_cfg"] if e.get("quantizer_name") == "*weight_quantizer"][0]["cfg"][
        "block_sizes"][-1] == 128  # the preset is not mutated
    with pytest.raises(QuantizeError):
        modelopt_quant_config("int3", "auto")
    with pytest.raises(QuantizeError):
        modelopt_quant_config("fp8", "fp4")


def test_awq_block_size():
    af3 = {"hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28}
    assert awq_block_size_for(af3) == 128
    assert awq_block_size_for(af3, tp_size=2) == 128
    assert awq_block_size_for({"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4}) == 64
    with pytest.raises(QuantizeError):
        awq_block_size_for({"hidden_size": 96, "intermediate_size": 96, "num_attention_heads": 4})


def test_patch_reads_either_rope_spelling():
    new_style = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "rms_norm_eps": 1e-6,
                 "intermediate_size": 128, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}
    config = {"quantization": {"quant_algo": None, "exclude_modules": ["lm_head"]}}
    patch = patch_trtllm_config(config, new_style, "int8_wo", "auto")
    assert config["rotary_base"] == patch["rotary_base"] == 1e6 and config["rotary_scaling"] is None
    assert config["quantization"] == {"quant_algo": "W8A16", "kv_cache_quant_algo": None}
    legacy = {"model_type": "qwen2", "rms_norm_eps": 1e-5, "intermediate_size": 8, "rope_theta": 5e5,
              "rope_scaling": {"type": "linear", "factor": 2.0}}
    config = {}
    patch_trtllm_config(config, legacy, "fp8", "fp8")
    assert config["rotary_base"] == 5e5 and config["architecture"] == "Qwen2ForCausalLM"
    assert config["rotary_scaling"] == {"type": "linear", "factor": 2.0}
    assert config["quantization"] == {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8"}
    assert hf_rope_scaling({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}}) == {
        "type": "yarn", "factor": 4.0}
    with pytest.raises(QuantizeError):
        patch_trtllm_config({}, {"rms_norm_eps": 1e-6, "intermediate_size": 8}, "bf16", "auto")


def test_bad_requests_are_refused(lm_dir, tmp_path):
    with pytest.raises(QuantizeError):
        write_trtllm_checkpoint(lm_dir, tmp_path / "x", precision="int2")
    with pytest.raises(QuantizeError):
        write_trtllm_checkpoint(lm_dir, tmp_path / "x", precision="bf16", dtype="float16")
    with pytest.raises(QuantizeError):
        write_trtllm_checkpoint(lm_dir, tmp_path / "x", precision="fp8", dtype="float32")
    with pytest.raises(QuantizeError):
        write_trtllm_checkpoint(lm_dir, tmp_path / "x", precision="bf16", tp_size=3)


def test_calibration_set_is_chat_shaped():
    assert len(CALIBRATION_TEXTS) >= 16 and len(set(CALIBRATION_TEXTS)) == len(CALIBRATION_TEXTS)
    assert sum("<|im_start|>assistant" in t for t in CALIBRATION_TEXTS) >= 16
