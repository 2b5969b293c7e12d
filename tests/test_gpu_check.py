"""GPU acceptance without a GPU: what can run here does.

- golden answers are written by transformers at `--prepare-only` time and read back from the artifacts;
- the comparison logic and pass rules of `af3trt gpu-check`;
- gpu-check refuses clearly when there are no engines, no goldens, no GPU, or a head size without kernels;
- the goldens and the comparison against a real tritonserver: the CPU ensemble of the same checkpoint reproduces
  the goldens exactly (what the GPU ensemble is held to, within the pass rules).
The run on a GPU is tests/test_gpu_acceptance.py (skipped without one).
"""

from __future__ import annotations

import json

import pytest

from af3trt.build import gpu_check
from af3trt.runtime.engines.gpus import detect_gpu
from af3trt.build.gpu_check import Agreement, GpuCheckError, Verdict, preflight, read_goldens
from af3trt.export import synth
from af3trt.runtime import assets


@pytest.mark.slow
def test_goldens_are_written_at_prepare_time_and_read_back(prepared):
    m = json.loads((prepared / "manifest.json").read_text())
    assert m["goldens"]["path"] == "artifacts/goldens.json" and m["goldens"]["cases"] == 2
    g = read_goldens(prepared / "artifacts")
    assert g.max_tokens == 16 and "transformers" in g.reference and "language model float32" in g.reference
    assert [c.name for c in g.cases] == ["speech-what", "speech-describe"]
    for c in g.cases:
        assert c.audio.read_bytes() == assets.speech_path().read_bytes()  # the clip travels with the artifacts
        assert 0 < len(c.token_ids) <= g.max_tokens
    doc = json.loads((prepared / "artifacts" / "goldens.json").read_text())
    assert not any(c["token_ids"][-1:] == [e] for c in doc["cases"] for e in doc["end_ids"])  # end token left out


def test_agreement_and_pass_rules():
    same = Agreement("a", [1, 2, 3, 4, 5], [1, 2, 3, 4, 5])
    assert (same.prefix, same.positional) == (5, 1.0)
    late = Agreement("b", [1, 2, 3, 4, 9, 9], [1, 2, 3, 4, 5, 6])
    assert (late.prefix, late.positional) == (4, 4 / 6)
    early = Agreement("c", [1, 9, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6])
    short = Agreement("d", [1, 2], [1, 2, 3, 4])  # stopped early: the missing positions count as disagreement
    assert short.positional == 0.5

    assert Verdict("bf16", [same, late]).passed  # prefix 4 everywhere, 9/11 positions
    assert not Verdict("bf16", [same, early]).passed  # diverges at the second token
    assert Verdict("fp8", [same, early]).passed  # quantized: first token + half of the positions
    assert not Verdict("fp8", [Agreement("x", [7, 2, 3], [1, 2, 3])]).passed  # first token wrong
    assert not Verdict("bf16", []).passed  # nothing checked is not a pass
    assert Verdict("bf16", [Agreement("e", [], [])]).agreement == 1.0
    text = gpu_check.report("OUT", Verdict("bf16", [same, early]), predicted=0.9)
    assert text.splitlines()[-1].startswith("FAIL bf16 OUT: ") and "CPU fake-quant prediction 90%" in text


@pytest.mark.slow
def test_gpu_check_refuses_a_prepared_output_without_engines(prepared, capsys):
    assert gpu_check.main([str(prepared)]) == 2
    err = capsys.readouterr().err
    assert "the engines are not built" in err and f"af3trt build --from-prepared {prepared}" in err
    if detect_gpu() is None:
        assert "no NVIDIA GPU is visible" in err


@pytest.mark.slow
def test_preflight_refusals(prepared, tmp_path):
    with pytest.raises(GpuCheckError, match="no manifest.json"):
        preflight(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"target": "cpu"}))
    with pytest.raises(GpuCheckError, match="gpu-check takes GPU builds"):
        preflight(tmp_path)
    with pytest.raises(GpuCheckError, match="goldens.json does not exist"):
        read_goldens(tmp_path)
    # a built output whose decoder has head size 16 (the tiny preset) is refused with the kernels' range
    out = tmp_path / "built"
    (out / "model_repository" / "encoder" / "1").mkdir(parents=True)
    (out / "model_repository" / "encoder" / "1" / "model.plan").write_bytes(b"PLAN")
    (out / "artifacts" / "engine").mkdir(parents=True)
    (out / "artifacts" / "engine" / "rank0.engine").write_bytes(b"E")
    engine_cfg = {"pretrained_config": {"hidden_size": 64, "num_attention_heads": 4}}
    (out / "artifacts" / "engine" / "config.json").write_text(json.dumps(engine_cfg))
    (out / "manifest.json").write_text((prepared / "manifest.json").read_text())
    with pytest.raises(GpuCheckError, match=r"head size is 16; .* 32…256 .* --preset tiny-gpu") as e:
        preflight(out)
    assert "goldens.json does not exist" in str(e.value)  # every problem at once


def test_acceptance_preset_has_a_head_size_trtllm_can_run():
    """TensorRT-LLM generation kernels: head sizes 32…256 (build/gpu_check.TRTLLM_HEAD_SIZES, with its source)."""
    head = lambda p: p.hidden // p.heads  # noqa: E731
    assert head(synth.PRESETS["tiny-gpu"]) == 64 in gpu_check.TRTLLM_HEAD_SIZES
    assert head(synth.PRESETS["tiny"]) not in gpu_check.TRTLLM_HEAD_SIZES  # why tiny cannot be the GPU check
    config = synth.build_config(synth.PRESETS["tiny-gpu"], synth.train_tokenizer(640), "bfloat16")
    assert config.text_config.hidden_size // config.text_config.num_attention_heads == 64
    assert gpu_check.head_size({"hidden_size": 256, "num_attention_heads": 4, "head_size": 64}) == 64


@pytest.mark.integration
def test_goldens_hold_on_the_cpu_ensemble(tiny_repo, prepared, tmp_path):
    """gpu-check's serving and comparison path on a real tritonserver: the CPU ensemble of the same checkpoint
    (the session's CPU build) reproduces the goldens written at prepare time, token for token; and the serving
    exercises of the GPU acceptance run (a stream, a stop, a 10-minute clip, a cache fill) pass on it."""
    out = tiny_repo
    goldens = read_goldens(prepared / "artifacts")
    verdict, done = gpu_check.check_repository(out / "model_repository", goldens, "bf16",
                                               log_path=tmp_path / "srv.log", timeout=300)
    print(gpu_check.report(out, verdict))
    print("\n".join(e.line() for e in done))
    assert [c.got for c in verdict.cases] == [c.token_ids for c in goldens.cases]
    assert verdict.passed and verdict.agreement == 1.0
    assert [e.name for e in done] == ["stream", "stop", "10-minute clip", "cache fill"]
    assert all(e.passed for e in done), [e.line() for e in done]


def test_gpu_check_compares_gpu_features_with_the_cpu_reference():
    """gpu-check's first line: the preprocess device path against the CPU log-mel on the bundled clip (on CUDA on
    the GPU host; the same function on CPU here)."""
    from af3trt.build.gpu_check import check_features

    ok, line = check_features("cpu")
    assert ok and line.startswith("PASS features: log-mel on cpu") and "max |diff|" in line


def test_the_acceptance_run_fails_without_a_gpu_when_required(tmp_path):
    """Round 3, item 2: tests/test_gpu_acceptance.py skips on a machine without a GPU host, and with AF3TRT_REQUIRE_GPU=1
    fails instead (before any build), so an acceptance run cannot report green having checked nothing."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent

    def run(required: dict):
        env = {k: v for k, v in os.environ.items() if k != "AF3TRT_REQUIRE_GPU"} | required
        return subprocess.run([sys.executable, "-m", "pytest", "tests/test_gpu_acceptance.py", "-m", "gpu", "-q",
                               "-rs", "-p", "no:cacheprovider", "--basetemp", str(tmp_path / "base")],
                              cwd=root, env=env, capture_output=True, text=True, timeout=600)

    skipped = run({})
    assert skipped.returncode == 0 and "3 skipped" in skipped.stdout, skipped.stdout[-2000:]
    assert "AF3TRT_REQUIRE_GPU=1 makes this a failure" in skipped.stdout
    required = run({"AF3TRT_REQUIRE_GPU": "1"})
    assert required.returncode == 1 and "3 failed" in required.stdout, required.stdout[-2000:]
    assert "checked nothing" in required.stdout
