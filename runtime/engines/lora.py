"""A LoRA adapter applied per batch row in the CPU decoder: thinking and base requests decode in one batch.

The build writes the adapter in Qwen2 module names (build/think.py):

    lora.json          {"rank": r, "alpha": a, "scaling": s, "modules": ["model.layers.0.self_attn.q_proj", ...]}
    lora.safetensors   "<module>.lora_A" [r, in], "<module>.lora_B" [out, r] in the decoder's dtype

`attach(model, dir)` wraps each named nn.Linear in `RowLoRA`; `rows(mask)` says which rows of the next forward get
the adapter (bool [B]; None: none). A wrapped linear computes what PEFT's lora.Linear computes for an adapted row
(peft/tuners/lora/layer.py Linear.forward: result = base_layer(x) + lora_B(lora_A(dropout(x))) * scaling, dropout
0 at inference), in the same order, and the base layer alone for the others. Like PEFT (get_peft_model /
PeftModel.from_pretrained with autocast_adapter_dtype=True, their default), the adapter computes in float32 over a
bf16/fp16 base: x is cast to float32, the sum cast back to the base's dtype.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

CONFIG, WEIGHTS = "lora.json", "lora.safetensors"


class RowLoRA(nn.Module):
    def __init__(self, base: nn.Linear, a: torch.Tensor, b: torch.Tensor, scaling: float, state: "LoraRows"):
        super().__init__()
        self.base, self.scaling, self.state = base, scaling, state
        self.lora_A = nn.Linear(a.shape[1], a.shape[0], bias=False, dtype=torch.float32)
        self.lora_B = nn.Linear(b.shape[1], b.shape[0], bias=False, dtype=torch.float32)
        with torch.no_grad():
            self.lora_A.weight.copy_(a)
            self.lora_B.weight.copy_(b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, S, in]
        y = self.base(x)  # [B, S, out]
        rows = self.state.mask
        if rows is None:
            return y
        if bool(rows.all()):
            return self.add(y, x)
        y = y.clone()
        y[rows] = self.add(y[rows], x[rows])
        return y

    def add(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return (y + self.lora_B(self.lora_A(x.to(torch.float32))) * self.scaling).to(y.dtype)


class LoraRows:
    """The adapter attached to a model; `mask` selects the rows of the next forward that it applies to."""

    def __init__(self, config: dict):
        self.config = config
        self.mask: torch.Tensor | None = None

    def rows(self, flags: list[bool]) -> None:
        self.mask = torch.tensor(flags, dtype=torch.bool) if any(flags) else None


def attach(model: nn.Module, adapter_dir: Path) -> LoraRows:
    """Wrap the adapter's modules of `model` (a Qwen2ForCausalLM) in RowLoRA; ValueError naming a missing module."""
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    config = json.loads((adapter_dir / CONFIG).read_text())
    weights = load_file(adapter_dir / WEIGHTS)
    state = LoraRows(config)
    modules = dict(model.named_modules())
    for name in config["modules"]:
        base = modules.get(name)
        if not isinstance(base, nn.Linear):
            raise ValueError(f"{adapter_dir}: LoRA module {name!r} is not a linear layer of the decoder")
        parent, _, attr = name.rpartition(".")
        a, b = weights[f"{name}.lora_A"], weights[f"{name}.lora_B"]
        if a.shape[1] != base.in_features or b.shape[0] != base.out_features:
            raise ValueError(f"{adapter_dir}: {name} LoRA shapes {list(a.shape)}, {list(b.shape)} do not fit "
                             f"[{base.out_features}, {base.in_features}]")
        setattr(modules[parent], attr, RowLoRA(base, a, b, float(config["scaling"]), state))
    return state
