"""AF3's thinking mode on the GPU target, checked through TensorRT-LLM 1.2's LoRA contract (facts and sources in
build/trtllm_lora.py): a --prepare-only build of a checkpoint with think/ carries the LoRA plugin flags in its
trtllm-build command (the plugin in the engine's dtype), the adapter converted in the backend's layout (names, shapes,
the engine's dtype, module ids, scale folded into B), the think encoder ONNX, and the repository wires the decoder's
LoRA cache, the decoder front's adapter, the encoder's think plan and fusion's task id. Served through the strict
fakes: tests/test_gpu_strict.py."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest


@pytest.fixture(scope="module")
def prepared_think(tiny_ckpt, tmp_path_factory):
    from af3trt.build.build_engines import main as build_main
    from af3trt.export.think import write_think

    ckpt = tmp_path_factory.mktemp("gpu-think") / "ckpt"
    shutil.copytree(tiny_ckpt, ckpt)
    write_think(ckpt, seed=0)
    out = tmp_path_factory.mktemp("gpu-think-out") / "af3-gpu"
    build_main(["--hf-model", str(ckpt), "--out", str(out), "--target", "gpu", "--precision", "bf16",
                "--gpu", "h100", "--prepare-only", "--no-accuracy-report", "--max-audio-seconds", "30",
                "--max-batch-size", "2"])
    return ckpt, out


def test_trtllm_build_gets_the_lora_plugin_flags(prepared_think):
    _, out = prepared_think
    plan = json.loads((out / "artifacts" / "gpu_build_plan.json").read_text())
    args = plan["trtllm_build_command"].split()
    i = args.index("--lora_target_modules")
    assert args[i + 1: i + 8] == ["attn_q", "attn_k", "attn_v", "attn_dense", "mlp_h_to_4h", "mlp_gate", "mlp_4h_to_h"]
    # the engine's dtype: the TensorRT-LLM checkpoint of the float32 tiny checkpoint is bf16 (export/quantize.py
    # default_dtype); its LoRA pages are bf16 (peftCacheManager.cpp), so is the plugin
    ckpt_dtype = json.loads((out / "artifacts" / "trtllm_checkpoint" / "config.json").read_text())["dtype"]
    assert ckpt_dtype == "bfloat16" and args[args.index("--lora_plugin") + 1] == ckpt_dtype
    assert args[args.index("--max_lora_rank") + 1] == "4"
    assert "--max_prompt_embedding_table_size" in args  # one engine: LoRA and the audio table together


def test_the_adapter_is_converted_to_the_backends_layout(prepared_think):
    """Rebuild each module's ΔW from the converted row and compare it with PEFT's scaling · B @ A: the in-weights
    [r, in] first, then the out-weights [out, r] times alpha/r, one row per (layer, module), in the engine's dtype
    (bf16, stored as its bits: numpy has no bf16), config rows [module_id, layer, r] with the backend's module ids."""
    import torch
    from safetensors.torch import load_file

    ckpt, out = prepared_think
    task = out / "artifacts" / "think" / "lora" / "1"
    bits, config = np.load(task / "model.lora_weights.npy"), np.load(task / "model.lora_config.npy")
    assert bits.dtype == np.uint16
    weights = torch.from_numpy(bits).view(torch.bfloat16).float().numpy()
    assert weights.ndim == 3 and weights.shape[:2] == (1, 14)
    assert config.dtype == np.int32 and config.shape == (1, 14, 3)
    assert config[0, :7].tolist() == [[1, 0, 4], [2, 0, 4], [3, 0, 4], [4, 0, 4], [5, 0, 4], [7, 0, 4], [6, 0, 4]]
    peft = load_file(ckpt / "think" / "adapter_model.safetensors")
    cfg = json.loads((ckpt / "think" / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    names = {1: "self_attn.q_proj", 2: "self_attn.k_proj", 3: "self_attn.v_proj", 4: "self_attn.o_proj",
             5: "mlp.gate_proj", 7: "mlp.up_proj", 6: "mlp.down_proj"}
    for row, (module, layer, r) in zip(weights[0], config[0]):
        key = f"base_model.model.model.language_model.layers.{layer}.{names[module]}"
        a, b = peft[f"{key}.lora_A.weight"].numpy(), peft[f"{key}.lora_B.weight"].numpy()
        n_in, n_out = a.size, b.size
        got_a = row[:n_in].reshape(r, a.shape[1]).astype(np.float32)
        got_b = row[n_in: n_in + n_out].reshape(b.shape[0], r).astype(np.float32)
        assert not row[n_in + n_out:].any()  # zero padding to the longest row
        bf16 = lambda x: torch.from_numpy(np.ascontiguousarray(x, np.float32)).to(torch.bfloat16).float().numpy()  # noqa: E731
        np.testing.assert_array_equal(got_a, bf16(a))  # the in-weights, rounded once to the engine's dtype
        np.testing.assert_array_equal(got_b, bf16(scale * b))  # the scale folded into the out-weights, then rounded
        np.testing.assert_allclose(got_b @ got_a, scale * b @ a, rtol=5e-2, atol=3e-2)  # ΔW within bf16's rounding


def test_the_repository_wires_both_modes(prepared_think):
    from af3trt.build import think
    from af3trt.build.gpu_repo import TrtllmOptions
    from af3trt.build.plan import inspect_checkpoint, ServingConfig
    from af3trt.build.repository import repo_spec
    from af3trt.triton_repo import configs

    _, out = prepared_think
    record = think.read_gpu(out / "artifacts")
    assert record["encoder_onnx"].startswith("artifacts/think/") and (out / record["encoder_onnx"]).exists()
    base = repo_spec(inspect_checkpoint(prepared_think[0]), ServingConfig(), target="gpu", decoder_dtype="bfloat16",
                     vocab_size=704, tokenizer_dir="artifacts/lm", encoder_max_batch=8, encoder_params={},
                     decoder_params={"gpt_model_path": "/engine", "enable_kv_cache_reuse": "false"})
    manifest = json.loads((out / "manifest.json").read_text())
    mem = manifest["gpu"]["memory_plan"]
    spec = think.gpu_spec(base, record, out / "artifacts", think.memory(_plan(mem), record))
    dec, enc, fus = configs.decoder_config(spec), configs.encoder_config(spec), configs.fusion_config(spec)
    params = {k: v.string_value for k, v in dec.parameters.items()}
    assert "lora_prefetch_dir" not in params  # a bf16 engine cannot preload it: the decoder front sends it
    front = {k: v.string_value for k, v in configs.decoder_front_config(spec).parameters.items()}
    assert front["lora_dir"] == str(out / "artifacts" / "think" / "lora") and front["lora_dtype"] == "bfloat16"
    assert front["lora_task"] == "1" and front["lora_preloaded"] == "false"
    assert params["lora_cache_max_adapter_size"] == "4"
    # the device cache: a fraction for the adapter at the least free memory, not the backend's 5 % (item 5)
    assert 0 < float(params["lora_cache_gpu_memory_fraction"]) < 1e-4
    assert float(params["lora_cache_gpu_memory_fraction"]) == mem["lora_cache_gpu_memory_fraction"]
    assert enc.parameters["think_plan_file"].string_value == think.THINK_PLAN
    assert fus.parameters["think_lora_task_id"].string_value == "1"
    assert "lora_task_id" in {o.name for o in fus.output} and "lora_task_id" in {i.name for i in dec.input}
    assert "lora_task_id" not in {o.name for o in configs.fusion_config(base).output}  # built without the adapter
    # the cache pages (peftCacheManager.cpp getPageManagerConfig): modules' in + out: q, o 64 + 64, k, v 64 + 32, gate,
    # up, down 64 + 128; a slot is the smallest (96 values of bf16); one rank-4 adapter of 2 layers needs
    # ceil(4 x 1024 x 2 / 96) slots; the host cache holds it twice
    pages = record["lora"]["pages"]
    assert pages["slot_bytes"] == 96 * 2 and pages["min_slots"] == -(-4 * 1024 * 2 // 96) == 86
    assert params["lora_cache_host_memory_bytes"] == str(2 * 86 * 96 * 2)
    assert mem["think_encoder_weights"] == mem["encoder_weights"] and mem["lora_device_cache"] > 0
    assert mem["total"] == sum(sum(p.values()) for p in mem["processes"].values())


def _plan(d: dict):
    """A manifest's memory plan back as a MemoryPlan."""
    from af3trt.build.memory_plan import MemoryPlan

    return MemoryPlan(**{k: v for k, v in d.items() if k != "processes"})


def test_gpu_check_goldens_cover_thinking(prepared_think):
    """The prepared goldens hold each case in both modes; gpu-check sends the thinking ones with thinking=True."""
    from af3trt.build.gpu_check import read_goldens

    _, out = prepared_think
    goldens = read_goldens(out / "artifacts")
    base = {c.name: c for c in goldens.cases if not c.thinking}
    think = {c.name: c for c in goldens.cases if c.thinking}
    assert set(think) == {f"think-{n}" for n in base} and base
    assert all(think[f"think-{n}"].prompt == c.prompt for n, c in base.items())  # the server adds the suffix
    assert any(think[f"think-{n}"].token_ids != c.token_ids for n, c in base.items())
    assert "PeftModel" in goldens.reference
