"""AF3's thinking mode (AF-Think): the checkpoint's `think/` folder, written for synthetic checkpoints and read for
builds.

The Hugging Face checkpoint ships thinking as `think/` beside the base weights (docs/thinking.md):

    think/non_lora_trainables.bin   a torch state dict loaded into AudioFlamingo3ForConditionalGeneration with
                                    strict=False (which tensors it overrides is not published: read from the file)
    think/adapter_config.json       a PEFT LoRA adapter, loaded as PeftModel.from_pretrained(model, DIR,
    think/adapter_model.safetensors subfolder="think")

`read_think` sorts every key into what the build can place and refuses, naming the keys, what it cannot:
  model.audio_tower.* / model.multi_modal_projector.* overrides → a second encoder variant (export/onnx_export.py)
  keys that name no tensor of the model → ignored, as load_state_dict(strict=False) ignores them (listed)
  LoRA on the language model's linear projections  → the same decoder with the adapter applied per request
  anything else (language-model overrides, LoRA elsewhere, DoRA, biases, modules_to_save) → ThinkError

    af3trt synth --preset tiny --think --out /tmp/af3-tiny     # writes think/ too (write_think)
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

THINK_DIR = "think"
NON_LORA = "non_lora_trainables.bin"
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
# The language model's linear projections, by Qwen2 name (what a LoRA may target; TensorRT-LLM's lora_target_modules
# for them are in build/trtllm_lora.py).
LM_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The synthetic adapter: all of them, on the language model only (the audio tower has q/k/v_proj too).
SYNTH_TARGETS = r".*language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
# AudioFlamingo3ForConditionalGeneration's own names (transformers 5.x): load_state_dict(strict=False) applies these
# and silently ignores any key that names no tensor of the model, so af3trt ignores those too (listed in the manifest)
_ENCODER_SIDE = re.compile(r"^model\.(?:audio_tower|multi_modal_projector)\.")
_LANGUAGE_MODEL = re.compile(r"^(?:model\.language_model\.|lm_head\.)")
# PEFT's saved names: base_model.model.<module path>.lora_{A,B}.weight (the adapter name is removed on save)
_LORA = re.compile(r"^base_model\.model\.(?:model\.)?language_model\.(?:model\.)?layers\.(\d+)\."
                   r"(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


class ThinkError(ValueError):
    """think/ holds something af3trt cannot serve exactly; the message names the keys."""


@dataclass
class Think:
    """What think/ holds, sorted by where it goes."""

    path: Path
    encoder_overrides: dict = field(default_factory=dict)  # model.audio_tower.* / model.multi_modal_projector.* → tensor
    ignored: list = field(default_factory=list)  # keys strict=False ignores (no tensor of the model has the name)
    rank: int = 0
    alpha: float = 0.0
    scaling: float = 0.0  # alpha / rank (PEFT LoraLayer.update_layer; alpha / sqrt(rank) with use_rslora)
    lora: dict = field(default_factory=dict)  # Qwen2 module name (model.layers.N.self_attn.q_proj) → (A [r, in], B [out, r])

    @property
    def modules(self) -> list[str]:
        """The projection kinds the adapter touches (q_proj, ..., down_proj), in LM_PROJECTIONS order."""
        kinds = {name.rsplit(".", 1)[1] for name in self.lora}
        return [k for k in LM_PROJECTIONS if k in kinds]

    def summary(self) -> dict:
        return {"path": str(self.path), "encoder_overrides": sorted(self.encoder_overrides), "ignored": self.ignored,
                "lora": {"rank": self.rank, "alpha": self.alpha, "scaling": self.scaling, "modules": self.modules,
                         "layers": len({n.split(".")[2] for n in self.lora})}}


def find_think(hf_dir: Path) -> Path | None:
    d = Path(hf_dir) / THINK_DIR
    return d if (d / ADAPTER_CONFIG).exists() or (d / NON_LORA).exists() else None


def read_think(think_dir: Path) -> Think:
    """Sort think/'s tensors (module docstring); ThinkError naming every key it cannot place."""
    import torch
    from safetensors.torch import load_file

    think_dir = Path(think_dir)
    out = Think(path=think_dir)
    refused: list[str] = []
    if (think_dir / NON_LORA).exists():
        state = torch.load(think_dir / NON_LORA, map_location="cpu", weights_only=True)
        for key, t in state.items():
            if _ENCODER_SIDE.match(key):
                out.encoder_overrides[key] = t
            elif _LANGUAGE_MODEL.match(key):
                refused.append(key)
            else:
                out.ignored.append(key)
        if refused:
            raise ThinkError(f"{think_dir / NON_LORA} overrides tensors outside the audio encoder and projector, "
                             f"which af3trt cannot serve beside the base language model: {', '.join(refused)}")
    if not (think_dir / ADAPTER_CONFIG).exists():
        return out
    cfg = json.loads((think_dir / ADAPTER_CONFIG).read_text())
    problems = [f"{k}={cfg.get(k)!r}" for k, ok in (("peft_type", "LORA"), ("bias", "none")) if cfg.get(k, ok) != ok]
    problems += [f"{k}={cfg[k]!r}" for k in ("use_dora", "lora_bias", "modules_to_save", "rank_pattern",
                                             "alpha_pattern", "trainable_token_indices", "target_parameters")
                 if cfg.get(k)]
    if problems:
        raise ThinkError(f"{think_dir / ADAPTER_CONFIG}: only a plain LoRA is served, not {', '.join(problems)}")
    out.rank, out.alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    out.scaling = out.alpha / (out.rank ** 0.5 if cfg.get("use_rslora") else out.rank)
    pairs: dict[str, dict] = {}
    for key, t in load_file(think_dir / ADAPTER_WEIGHTS).items():
        m = _LORA.match(key)
        if m is None or m.group(3) not in LM_PROJECTIONS:
            refused.append(key)
            continue
        layer, block, proj, ab = m.groups()
        pairs.setdefault(f"model.layers.{layer}.{block}.{proj}", {})[ab] = t
    if refused:
        raise ThinkError(f"{think_dir / ADAPTER_WEIGHTS}: LoRA weights outside the language model's projections "
                         f"({', '.join(LM_PROJECTIONS)}) cannot be served: {', '.join(refused)}")
    for name, ab in pairs.items():
        if set(ab) != {"A", "B"} or ab["A"].shape[0] != out.rank or ab["B"].shape[1] != out.rank:
            raise ThinkError(f"{think_dir / ADAPTER_WEIGHTS}: {name} needs lora_A [{out.rank}, in] and lora_B "
                             f"[out, {out.rank}], got {({k: list(v.shape) for k, v in ab.items()})}")
        out.lora[name] = (ab["A"], ab["B"])
    return out


def write_think(hf_dir: Path, seed: int = 0, rank: int = 4) -> Path:
    """Write think/ for a (synthetic) checkpoint with the peft package: a LoRA on the language model's attention and
    MLP projections (B not zero, so the adapter changes answers) and non-LoRA overrides of the whole projector and of
    the first audio-encoder layer's fc1 (so both encoder variants differ)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AudioFlamingo3ForConditionalGeneration

    hf_dir = Path(hf_dir)
    out = hf_dir / THINK_DIR
    model = AudioFlamingo3ForConditionalGeneration.from_pretrained(hf_dir).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    overrides = {k: (v.float() + 0.05 * torch.randn(v.shape, generator=gen)).to(v.dtype)
                 for k, v in model.state_dict().items()
                 if k.startswith("model.multi_modal_projector.") or k == "model.audio_tower.layers.0.fc1.weight"}
    torch.manual_seed(seed + 2)
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=SYNTH_TARGETS, lora_dropout=0.0, bias="none",
                     init_lora_weights=False)  # False: random A and B (True would start B at zero: no effect)
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():  # PEFT's random B is small; make the adapter change greedy answers of the toy model
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(20.0)
    peft_model.save_pretrained(out)
    torch.save(overrides, out / NON_LORA)
    return out
