"""AF3's thinking mode without a server: think/ as synth writes it and as a build reads it (refusals name the keys),
the suffix's place in a conversation, the per-row LoRA against PEFT's own layer, and one decoder batch holding base
and thinking rows."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from af3trt.runtime.stages.conversation import THINK_SUFFIX, Audio, Conversation, Message, PromptError, with_think_suffix


@pytest.fixture(scope="module")
def think_dir(tiny_ckpt, tmp_path_factory):
    """think/ written by synth for a copy of the tiny checkpoint (the session's checkpoint stays without one)."""
    import shutil

    from af3trt.export.think import write_think

    ckpt = tmp_path_factory.mktemp("think-units") / "ckpt"
    shutil.copytree(tiny_ckpt, ckpt)
    return write_think(ckpt, seed=0)


def test_suffix_ends_the_last_user_turn_only():
    conv = Conversation((Message("system", "S"), Message("user", (Audio(0), "What is it?")),
                         Message("assistant", "A dog."), Message("user", (Audio(1), "Why", "?"))))
    got = with_think_suffix(conv)
    assert got.messages[:3] == conv.messages[:3]
    assert got.messages[3].content == (Audio(1), "Why", "? " + THINK_SUFFIX)
    assert with_think_suffix(Conversation((Message("user", "Hi.\n"),))).messages[0].content == "Hi.\n" + THINK_SUFFIX
    assert with_think_suffix(Conversation((Message("user", (Audio(0),)),))).messages[0].content == \
        (Audio(0), THINK_SUFFIX)
    last_is_assistant = Conversation((Message("user", "Q"), Message("assistant", "A")))
    assert with_think_suffix(last_is_assistant).messages[0].content == "Q " + THINK_SUFFIX
    with pytest.raises(PromptError, match="user message"):
        with_think_suffix(Conversation((Message("system", "S"),)))


def test_synth_think_is_what_peft_and_strict_false_load(think_dir):
    from af3trt.export.think import read_think

    cfg = json.loads((think_dir / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4
    think = read_think(think_dir)
    assert think.modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert len(think.lora) == 2 * 7  # two layers of the tiny preset
    assert think.scaling == cfg["lora_alpha"] / cfg["r"]
    assert any(k.startswith("model.audio_tower.") for k in think.encoder_overrides)
    assert any(k.startswith("model.multi_modal_projector.") for k in think.encoder_overrides)


def test_think_keys_that_cannot_be_placed_are_refused_by_name(think_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from af3trt.export.think import ThinkError, read_think

    bad = tmp_path / "think"
    shutil.copytree(think_dir, bad)
    state = torch.load(bad / "non_lora_trainables.bin", weights_only=True)
    state["model.language_model.norm.weight"] = torch.ones(4)
    torch.save(state, bad / "non_lora_trainables.bin")
    with pytest.raises(ThinkError, match=r"model\.language_model\.norm\.weight"):
        read_think(bad)
    # a name no tensor of the model has: strict=False ignores it, and so does the build (listed, not applied)
    state.pop("model.language_model.norm.weight")
    state["sound_mm_projector.weight"] = torch.ones(4)
    torch.save(state, bad / "non_lora_trainables.bin")
    assert read_think(bad).ignored == ["sound_mm_projector.weight"]

    shutil.copy(think_dir / "non_lora_trainables.bin", bad / "non_lora_trainables.bin")
    weights = load_file(bad / "adapter_model.safetensors")
    key = "base_model.model.model.audio_tower.layers.0.self_attn.q_proj.lora_A.weight"
    weights[key] = torch.zeros(4, 64)
    save_file(weights, bad / "adapter_model.safetensors")
    with pytest.raises(ThinkError, match=key.replace(".", r"\.")):
        read_think(bad)

    shutil.copy(think_dir / "adapter_model.safetensors", bad / "adapter_model.safetensors")
    cfg = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(ThinkError, match="use_dora"):
        read_think(bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_lora_is_peft_lora_on_adapted_rows_and_the_base_elsewhere(dtype):
    from peft import LoraConfig, get_peft_model

    from af3trt.runtime.engines.lora import LoraRows, RowLoRA

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 24)).to(dtype)
    base_out = lambda x: net[0](x)  # noqa: E731
    x = torch.randn(3, 5, 16).to(dtype)
    want_base = base_out(x)
    peft = get_peft_model(net, LoraConfig(r=4, lora_alpha=8, target_modules=["0"], init_lora_weights=False))
    want_lora = peft(x)
    layer = peft.base_model.model[0]
    a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    state = LoraRows({"scaling": 2.0})
    row = RowLoRA(layer.base_layer, a, b, 2.0, state)
    state.rows([False, True, False])
    got = row(x)
    assert torch.equal(got[1], want_lora[1]) and torch.equal(got[0], want_base[0]) and torch.equal(got[2], want_base[2])
    state.rows([True, True, True])
    assert torch.equal(row(x), want_lora)
    state.rows([False, False, False])
    assert torch.equal(row(x), want_base)


def test_one_decoder_batch_holds_base_and_thinking_rows(think_dir, lm_dir, tmp_path):
    """Base and thinking requests run in the same batched decode steps (max_batch 4), and each row's answer is the
    one it gets alone: the adapter is applied per row, not to the batch."""
    from af3trt.build.think import write_lora
    from af3trt.export.think import read_think
    from af3trt.runtime.engines.decoder import DecoderEngine, GenerationRequest, NoAdapter

    lora = write_lora(read_think(think_dir), tmp_path / "lora")
    ids = [np.array([5, 17, 42, 9, 3, 100 + k], np.int32) for k in range(4)]

    def req(k, think):
        return GenerationRequest(input_ids=ids[k], max_new_tokens=12, lora_task_id=1 if think else None)

    with DecoderEngine(lm_dir, max_batch_size=4, lora_dir=lora) as engine:
        alone = [engine.generate(req(k, k % 2 == 1)) for k in range(4)]
        base_of_think = engine.generate(req(1, False))
        engine.stats["max_batch"] = 0
        done, out = threading_run(engine, [req(k, k % 2 == 1) for k in range(4)])
        assert done and engine.stats["max_batch"] == 4
    assert out == alone
    assert base_of_think != alone[1]  # the adapter changes the answer
    with DecoderEngine(lm_dir, max_batch_size=2) as plain, pytest.raises(NoAdapter, match="without a LoRA adapter"):
        plain.submit(req(0, True), lambda *a: None)


def threading_run(engine, requests):
    """Submit all requests before the worker can finish any (they queue while it admits), collect each answer."""
    import threading

    results = [[] for _ in requests]
    events = [threading.Event() for _ in requests]

    def emitter(k):
        def emit(new, final):
            results[k].extend(new)
            if final:
                events[k].set()
        return emit

    for k, r in enumerate(requests):
        engine.submit(r, emitter(k))
    return all(e.wait(120) for e in events), results


def test_bench_report_shows_both_modes():
    from af3trt.perf import report

    row = {"requests": 4, "errors": 0, "tokens": 40.0, "latency_ms": 900.0, "ttft_ms": 50.0, "encoder_ms": 10.0,
           "decoder_ms": 800.0}
    lines = report._thinking_lines({"thinking": {"tool": "t", "max_tokens": 128, "base": row,
                                                 "thinking": {**row, "tokens": 120.0}}})
    assert any(line.startswith("| base | 4 | 0 | 40 |") for line in lines)
    assert any(line.startswith("| thinking | 4 | 0 | 120 |") for line in lines)
    assert "Skipped" in "".join(report._thinking_lines({"thinking": {"skipped": "no think/"}}))


def test_no_think_builds_the_base_model_only(think_dir, tmp_path):
    """--no-think on a checkpoint with think/: no think artifacts, no thinking switch in fusion, no LoRA in the
    decoder, and the manifest has no think section."""
    from af3trt.build.build_engines import build, options_from_args, parser

    args = parser().parse_args(["--hf-model", str(think_dir.parent), "--out", str(tmp_path / "out"), "--no-think"])
    opts = options_from_args(args)
    assert opts.think is False
    build(opts)
    out = tmp_path / "out"
    assert not (out / "artifacts" / "think").exists()
    assert "think" not in json.loads((out / "manifest.json").read_text())
    from af3trt.runtime.stages.params import DecoderParams, FusionParams
    from af3trt.triton_repo.configs import parse

    repo = out / "model_repository"
    fusion, decoder = (parse((repo / m / "config.pbtxt").read_text()) for m in ("fusion", "decoder"))
    fusion_params = FusionParams.parse({k: v.string_value for k, v in fusion.parameters.items()})
    assert not fusion_params.think and fusion_params.think_lora_task_id is None
    assert "lora_task_id" not in {o.name for o in fusion.output}
    assert DecoderParams.parse({k: v.string_value for k, v in decoder.parameters.items()}).lora_dir is None
