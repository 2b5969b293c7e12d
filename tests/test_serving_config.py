"""One serving configuration for both targets (build/plan.ServingConfig): every `af3trt build` flag generated from
its fields reaches the rendered repository of each target it is for (both, or the CPU target for the CPU models'
instances, threads and streaming), and a CPU-only flag is refused on the GPU target.

The GPU repository is made by the GPU build's own engine half (build/gpu_build.build_engines_and_repository) from
a `--prepare-only` output, against the fake TensorRT module and the fake trtllm-build of tests/fakes (as in
test_gpu_build.py): each flag's plan builds its engines anew, so the repository is the one that flag would get.
Before ServingConfig, --max-queue-size, --queue-timeout-ms, --encoder-instances, --encoder-queue-delay-us and
--no-crop-frames changed the CPU repository only; the CPU models' thread, instance and streaming flags were written by
hand outside it, and --cpu-threads with --target gpu was silently ignored.
"""

from __future__ import annotations

import os
import sys

import pytest

from af3trt.build import build_engines, gpu_build, gpu_repo
from af3trt.build.build_engines import options_from_args, parser
from af3trt.build.common import BuildError, Progress, flag_fields
from af3trt.build.plan import BuildReport, ServingConfig, make_plan
from af3trt.build.repository import render_repository
from af3trt.registry import KNOWN_GPUS

from fakes import tensorrt as fake_tensorrt
from fakes import trtllm_build

# The serving flags `af3trt build` has had (a field removed from ServingConfig would silently drop its flag)
SERVING_FLAGS = ("--max-batch-size", "--max-audio-seconds", "--max-text-len", "--max-output-len",
                 "--default-max-tokens", "--max-queue-size", "--queue-timeout-ms", "--preprocess-instances",
                 "--encoder-instances", "--encoder-queue-delay-us", "--encoder-batching", "--no-encoder-batching",
                 "--no-crop-frames", "--fusion-instances", "--decoder-instances", "--encoder-max-batch", "--encoder-windows-per-run",
                 "--stream-interval-ms", "--cpu-threads", "--encoder-threads", "--decoder-threads",
                 "--preprocess-threads")
# A setting whose default is its target's (None): each of its two flags changes the target whose default differs
PER_TARGET = {"--encoder-batching": "cpu", "--no-encoder-batching": "gpu"}
# A setting that shows only beside another: the encoder's queue delay and (CPU) max batch are its dynamic batcher's
# (off on CPU by default)
CONTEXT = {"--encoder-queue-delay-us": ["--encoder-batching"], "--encoder-max-batch": ["--encoder-batching"]}


def flag_argv() -> dict[str, list[str]]:
    """Each generated serving flag with a value other than its default (halved, or 1 -> 2, None -> 3; booleans
    flip; a per-target boolean both ways)."""
    out = {}
    for f in flag_fields(ServingConfig):
        if f.default is None and f.metadata.get("type") is bool:
            out[f"--{f.name.replace('_', '-')}"] = out[f"--no-{f.name.replace('_', '-')}"] = []
        elif isinstance(f.default, bool):
            out[f"--no-{f.name.replace('_', '-')}" if f.default else f"--{f.name.replace('_', '-')}"] = []
        elif f.default is None:
            out[f"--{f.name.replace('_', '-')}"] = ["3"]
        else:
            value = f.default // 2 if f.default > 1 else f.default + 1
            out[f"--{f.name.replace('_', '-')}"] = [str(value)]
    return out


@pytest.fixture(scope="module")
def prepared(tiny_ckpt, tmp_path_factory):
    """A prepared GPU build (encoder ONNX in fp16, bf16 TensorRT-LLM checkpoint) that every flag's plan reuses."""
    out = tmp_path_factory.mktemp("serving") / "prep"
    build_engines.main(["--hf-model", str(tiny_ckpt), "--out", str(out), "--target", "gpu", "--precision", "bf16",
                        "--gpu", "h100", "--prepare-only", "--no-accuracy-report", "--no-goldens"])
    return out


@pytest.fixture
def fake_gpu_tools(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt.fresh())
    bindir = tmp_path / "bin"
    bindir.mkdir()
    trtllm_build.install(bindir, sys.executable)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")


def render(tiny_ckpt, prepared, root, name: str, flags: list[str], target: str) -> dict[str, str]:
    """{model: config.pbtxt} of the plan `af3trt build --target <target> ... <flags>` makes."""
    argv = ["--hf-model", str(tiny_ckpt), "--out", str(prepared), "--target", target, *flags]
    if target == "gpu":
        argv += ["--precision", "bf16", "--gpu", "h100"]
    plan = make_plan(options_from_args(parser().parse_args(argv)), gpu_target=KNOWN_GPUS["h100"])
    repo = root / f"{name}-{target}"
    if target == "cpu":
        lm = {"dtype": plan.checkpoint.dtype, "vocab_size": plan.checkpoint.vocab_size}
        render_repository(repo, build_engines.cpu_repo_spec(plan, lm, "artifacts/encoder.onnx"))
    else:
        memory = gpu_build.preflight(plan)
        engines = gpu_build.engine_plans(plan, "artifacts/encoder.fp16.onnx")
        gpu_build.build_engines_and_repository(plan, engines, prepared, repo, Progress(3), BuildReport(),
                                               memory=memory)
    # every model the repository has (the GPU target's also has the decoder front)
    return {m.name: (m / "config.pbtxt").read_text() for m in sorted(repo.iterdir())}


def unchanged(tiny_ckpt, prepared, root, flags: dict[str, list[str]]) -> list[str]:
    """'<flag> on <target>' for each flag whose repository equals the one without it on a target it is for (with
    the flags it needs to show, CONTEXT, in both), and '<flag> not refused on <target>' for each flag a build for
    another target takes."""
    bases: dict[tuple, dict] = {}
    missed = []
    for i, (flag, value) in enumerate(flags.items()):
        context = CONTEXT.get(flag, [])
        name = flag.removeprefix("--").removeprefix("no-").replace("-", "_")
        for t in ("cpu", "gpu"):
            if t in ServingConfig.targets(name):
                if (tuple(context), t) not in bases:
                    bases[tuple(context), t] = render(tiny_ckpt, prepared, root, f"base{len(bases)}", context, t)
                got = render(tiny_ckpt, prepared, root, f"flag{i}", [*context, flag, *value], t)
                if got == bases[tuple(context), t]:
                    missed.append(f"{flag} on {t}")
                continue
            try:
                render(tiny_ckpt, prepared, root, f"flag{i}", [flag, *value], t)
                missed.append(f"{flag} not refused on {t}")
            except BuildError as e:
                assert flag in str(e) and f"not for the {t} target" in str(e)
    return missed


def test_the_serving_flags_are_generated_from_the_config():
    flags = flag_argv()
    assert sorted(flags) == sorted(SERVING_FLAGS)
    help_text = parser().format_help()
    assert all(f in help_text for f in SERVING_FLAGS)
    # the defaults are the config's: one record, no second set of defaults on the CLI
    args = parser().parse_args(["--hf-model", "m", "--out", "o"])
    assert options_from_args(args).serving == ServingConfig()
    assert ServingConfig().max_output_len == 512 and isinstance(ServingConfig().max_audio_seconds, float)
    with pytest.raises(SystemExit):  # out of range: a usage error naming the flag
        build_engines.main(["--hf-model", "m", "--out", "o", "--max-queue-size", "-1"])


def test_every_serving_flag_changes_the_repository_of_each_target_it_is_for(tiny_ckpt, prepared, tmp_path,
                                                                            fake_gpu_tools):
    """Every flag changes the repository of each target it is for; a per-target setting's flag the one whose default
    it is not (encoder batching: off on CPU, on on GPU by default)."""
    expected = sorted(f"{flag} on {t}" for flag, changed in PER_TARGET.items() for t in ("cpu", "gpu") if t != changed)
    assert sorted(unchanged(tiny_ckpt, prepared, tmp_path, flag_argv())) == expected
    # the settings of the CPU target's models are refused on the GPU target, not ignored
    cpu_only = {f.name for f in flag_fields(ServingConfig) if ServingConfig.targets(f.name) == ("cpu",)}
    # (stream_interval_ms is both targets': the GPU target's decoder front coalesces at it)
    assert cpu_only == {"decoder_instances", "encoder_max_batch", "encoder_windows_per_run", "cpu_threads",
                        "encoder_threads", "decoder_threads", "preprocess_threads"}


@pytest.mark.slow
def test_a_dropped_flag_is_caught(tiny_ckpt, prepared, tmp_path, fake_gpu_tools, monkeypatch):
    """The check above fails when a target stops passing a knob on: here the GPU repository's spec forgets
    encoder_instances, as gpu_repo_spec did before ServingConfig."""
    from dataclasses import replace

    real = gpu_repo.repo_spec
    monkeypatch.setattr(gpu_repo, "repo_spec",
                        lambda *a, **kw: replace(real(*a, **kw), encoder_instances=1))
    assert unchanged(tiny_ckpt, prepared, tmp_path, {"--encoder-instances": ["2"]}) == ["--encoder-instances on gpu"]


def test_k8s_overlay_flags_come_from_its_options_too():
    """The same helper makes `af3trt k8s overlay`'s flags from DeployOptions: every flagged field round-trips."""
    import argparse

    from af3trt.build import k8s
    from af3trt.build.common import add_flags, from_flags

    ap = argparse.ArgumentParser()
    add_flags(ap, k8s.DeployOptions)
    opts = k8s.STANDARD_OVERLAYS[2]  # a100-int8wo: non-default precision, KV cache, no init container
    argv = []
    for f in flag_fields(k8s.DeployOptions):
        value = getattr(opts, f.name)
        if isinstance(value, bool):
            argv += [] if value == f.default else [f"--no-{f.name.replace('_', '-')}" if f.default
                                                    else f"--{f.name.replace('_', '-')}"]
        else:
            argv += [f"--{f.name.replace('_', '-')}", str(value)]
    assert from_flags(k8s.DeployOptions, ap.parse_args(argv)) == opts
    with pytest.raises(SystemExit):  # --name has no default: required
        ap.parse_args([])


def test_a_prepared_plan_carries_the_serving_config(prepared):
    """--from-prepared builds with the serving configuration the prepare half was given; a plan saved before
    ServingConfig (format 1, "limits") is refused with what to do, not a KeyError."""
    import json

    from af3trt.build.common import BuildError
    from af3trt.build.plan import PLAN_FILE, load_plan

    plan, _ = load_plan(prepared)
    assert plan.serving == ServingConfig() and plan.options.serving == plan.serving
    doc = json.loads((prepared / PLAN_FILE).read_text())
    old = prepared.parent / "old"
    (old / PLAN_FILE).parent.mkdir(parents=True)
    (old / PLAN_FILE).write_text(json.dumps({**doc, "af3trt_build_plan": 1}))
    with pytest.raises(BuildError, match="prepare it again"):
        load_plan(old)


def test_the_rendering_record_keeps_the_config_defaults():
    """RepoSpec (triton_repo/configs.py) is filled by repo_spec from ServingConfig; its own defaults serve the tests
    that build one by hand and must not drift from the config's (max_output_len was 1024 in one record, 512 in
    the others)."""
    from dataclasses import fields

    from af3trt.triton_repo.configs import RepoSpec

    serving = {f.name: f.default for f in flag_fields(ServingConfig)}
    shared = {f.name: f.default for f in fields(RepoSpec) if f.name in serving}
    assert len(shared) >= 9 and shared == {k: serving[k] for k in shared}
