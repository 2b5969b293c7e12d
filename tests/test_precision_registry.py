"""A decoder precision is one record in af3trt/registry.py: the build, sizing, the memory plan, quantization, the
engine build, gpu-check and every `--precision` choice look it up there.

The demonstration registers a precision af3trt does not ship — TensorRT-LLM 1.2's int4 weight-only ("int4_wo":
quant_algo W4A16, float weights that trtllm-build quantizes; trtllm-1.2-contracts.md, examples/quantization
quantize.py) — in a monkeypatched registry and checks that each consumer takes it with no other edit. W4A16 is a
quant_algo the checkpoint validator already checks, so the record alone is the whole change.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from af3trt import registry
from af3trt.registry import BF16_MIN_SM, DECODER_PRECISIONS, KNOWN_GPUS, DecoderPrecision, PrecisionError

ROOT = Path(__file__).resolve().parent.parent


def _int4_wo_bytes(o: int, i: int, d: int, g: int) -> int:  # packed int4 weights, per-channel scales (engine dtype)
    return o * i // 2 + d * o


INT4_WO = DecoderPrecision("int4_wo", "W4A16", None, None, _int4_wo_bytes, BF16_MIN_SM, 0.25, weight_only=True,
                           integer=True)


@pytest.fixture
def int4_wo(monkeypatch):
    monkeypatch.setitem(registry.DECODER_PRECISIONS, "int4_wo", INT4_WO)
    return INT4_WO


def _exits(main, argv) -> int:
    """The exit status of a CLI whose argv ends with --help: 0 when every choice before it was accepted."""
    with pytest.raises(SystemExit) as e:
        main(argv + ["--help"])
    return e.value.code


def test_every_cli_offers_a_registered_precision(int4_wo, capsys):
    from af3trt.build import build_engines, k8s
    from af3trt.export import quantize

    clis = [(build_engines.main, ["--hf-model", "m", "--out", "o", "--target", "gpu", "--precision"]),
            (quantize.main, ["--lm-dir", "l", "--out", "o", "--precision"]),
            (k8s.main, ["overlay", "--name", "x", "--out", "o", "--precision"])]
    for main, argv in clis:
        assert _exits(main, argv + ["int4_wo"]) == 0
        assert _exits(main, argv + ["int4_xx"]) == 2  # not registered: refused by the same choices
    assert "int4_wo" in capsys.readouterr().out


def test_plan_sizing_and_checks_take_a_registered_precision(int4_wo):
    from af3trt.build.plan import GpuOptions
    from af3trt.build.sizing import decoder_weight_bytes, dims_from_config, sizing_table

    GpuOptions(precision="int4_wo").check()
    assert registry.check_precision("int4_wo", "int8", KNOWN_GPUS["a100"]) == []
    with pytest.raises(PrecisionError, match="INT8/INT4 weights"):  # integer=True: refused on Blackwell
        registry.check_precision("int4_wo", "auto", KNOWN_GPUS["b200"])
    with pytest.raises(PrecisionError, match="bf16 tensor cores"):  # min_sm 80
        registry.check_precision("int4_wo", "auto", KNOWN_GPUS["t4"])

    config = registry.af3_reference_config()
    d, _ = dims_from_config(config)
    int4, int8, bf16 = (decoder_weight_bytes(d, p) for p in ("int4_wo", "int8_wo", "bf16"))
    assert int4 < int8 < bf16  # from the record's linear_bytes
    table = sizing_table(config)
    assert table["weights"]["int4_wo"] == int4
    assert {r["precision"] for r in table["fit"]} == set(DECODER_PRECISIONS)


def test_engine_build_memory_plan_and_gpu_check_take_a_registered_precision(int4_wo, tiny_ckpt):
    from af3trt.build.gpu_build import weight_only_shape_problems
    from af3trt.build.gpu_check import Verdict
    from af3trt.build.memory_plan import plan_for_config
    from af3trt.build.plan import ServingConfig
    from af3trt.build.trtllm_engine import plan_trtllm_build

    serving = ServingConfig(max_audio_seconds=30)
    plan = plan_trtllm_build("ckpt", "engine", serving, "int4_wo", "int8", gpu=KNOWN_GPUS["a100"])
    args = plan.args
    # not the FP8 workflow: the GEMM plugin follows the dtype, and an INT8 KV cache turns paged context FMHA off
    assert args[args.index("--gemm_plugin") + 1] == "auto"
    assert any("paged context FMHA is off for int4_wo" in n for n in plan.notes)
    with pytest.raises(PrecisionError):  # checked against the GPU like any precision
        plan_trtllm_build("ckpt", "engine", serving, "int4_wo", gpu=KNOWN_GPUS["b200"])
    memory = plan_for_config(registry.af3_reference_config(), precision="int4_wo", kv_cache="auto",
                             encoder_precision="fp16", tp_size=1, max_batch_size=8, max_audio_windows=1,
                             derived=plan.derived, gpu=KNOWN_GPUS["a100"])
    bf16 = plan_for_config(registry.af3_reference_config(), precision="bf16", kv_cache="auto",
                           encoder_precision="fp16", tp_size=1, max_batch_size=8, max_audio_windows=1,
                           derived=plan.derived, gpu=KNOWN_GPUS["a100"])
    assert memory.as_dict()["decoder_weights"] < bf16.as_dict()["decoder_weights"]
    # weight_only: trtllm-build's padding rules apply (the tiny model's 64-wide layers cannot split over 2 ranks)
    text = json.loads((tiny_ckpt / "config.json").read_text())["text_config"]
    assert weight_only_shape_problems(text, "int4_wo", 1) == []
    assert "padded to multiples of 128" in weight_only_shape_problems(text, "int4_wo", 2)[0]
    assert Verdict("int4_wo").thresholds == (1, 0.25)


def test_quantization_takes_a_registered_precision(int4_wo):
    from af3trt.export.quantize import default_dtype, patch_trtllm_config
    from af3trt.export.trtllm_checkpoint import CHECKED_QUANT_ALGOS

    text = {"rope_theta": 1e6, "rms_norm_eps": 1e-6, "intermediate_size": 128, "model_type": "qwen2",
            "dtype": "bfloat16"}
    config = {"quantization": {"quant_algo": None, "exclude_modules": ["lm_head"]}}
    patch_trtllm_config(config, text, "int4_wo", "auto")
    # no weight quantizer ran (no modelopt preset): trtllm-build quantizes, with TensorRT-LLM's default exclusions
    assert config["quantization"] == {"quant_algo": "W4A16", "kv_cache_quant_algo": None}
    assert default_dtype("int4_wo", text) == "bfloat16"
    # every registered precision writes a checkpoint the validator knows the tensors of
    assert {p.quant_algo for p in DECODER_PRECISIONS.values()} <= set(CHECKED_QUANT_ALGOS)


@pytest.mark.slow
def test_a_registered_precision_prepares_a_gpu_build(int4_wo, tiny_ckpt, tmp_path):
    """The GPU build's prepare half end to end (export, LM, TensorRT-LLM checkpoint, validation, engine plan)."""
    from af3trt.build.build_engines import main

    out = tmp_path / "prep"
    main(["--hf-model", str(tiny_ckpt), "--out", str(out), "--target", "gpu", "--precision", "int4_wo",
          "--gpu", "a100", "--prepare-only", "--no-accuracy-report", "--no-goldens", "--max-audio-seconds", "30"])
    m = json.loads((out / "manifest.json").read_text())
    # validate_checkpoint raises on any problem: its report is there, for the record's quant_algo
    assert m["trtllm_checkpoint"]["quant_algo"] == m["trtllm_checkpoint"]["validation"]["quant_algo"] == "W4A16"
    ckpt = json.loads((out / "artifacts" / "trtllm_checkpoint" / "config.json").read_text())
    assert ckpt["quantization"]["quant_algo"] == "W4A16"
    engine = json.loads((out / "artifacts" / "gpu_build_plan.json").read_text())
    assert engine["trtllm_build_command"].startswith("trtllm-build --checkpoint_dir")


# ---------------------------------------------------------------------------------------------- no string branches

PRECISION_ONLY_NAMES = set(DECODER_PRECISIONS) - set(registry.GPU_ENCODER_PRECISIONS) - set(registry.KV_CACHES)


def _branches_on_precision_names(tree: ast.AST) -> list[int]:
    """Lines comparing with a decoder-precision name, or a dict keyed by decoder-precision names."""
    def names(node) -> set[str]:
        elts = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else [node]
        return {e.value for e in elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}

    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and any(names(c) & PRECISION_ONLY_NAMES for c in node.comparators):
            lines.append(node.lineno)
        elif isinstance(node, ast.Dict) and len(names(ast.Tuple(elts=[k for k in node.keys if k]))
                                                & set(DECODER_PRECISIONS)) >= 3:
            lines.append(node.lineno)
    return lines


def test_no_module_branches_on_a_decoder_precision_name():
    """Before the records this found 15 lines in 7 modules (quantize 6, sizing 2, trtllm_engine 2, gpu_build 2,
    gpu_check, onnx_quant and memory_plan one precision-keyed table each)."""
    found = {}
    for folder in ("af3trt", "build", "export", "runtime", "triton_repo", "kernels", "perf"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path == ROOT / "af3trt" / "registry.py":
                continue
            lines = _branches_on_precision_names(ast.parse(path.read_text(encoding="utf-8")))
            if lines:
                found[str(path.relative_to(ROOT))] = lines
    assert found == {}
