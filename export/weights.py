"""Selective reads of a Hugging Face checkpoint directory: config.json and the tensors under a key prefix.

The real AF3 checkpoint is ~16 GB of bf16 in several shards; exporting one part of it (the audio tower, the
language model) must not instantiate the whole model. Only the shards that hold a requested key are opened, and
each tensor is cast as it is read, so peak memory is the selected part at its target dtype.

    tensors = load_tensors(hf_dir, "audio_tower.", dtype=torch.float32)   # {"conv1.weight": Tensor, ...}
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from af3trt.registry import SAFETENSORS_DTYPES

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"



def weight_map(hf_dir: Path) -> dict[str, Path]:
    """Tensor name → the safetensors file that holds it (sharded index or a single model.safetensors)."""
    hf_dir = Path(hf_dir)
    index = hf_dir / INDEX_FILE
    if index.is_file():
        names = json.loads(index.read_text())["weight_map"]
        return {key: hf_dir / file for key, file in names.items()}
    single = hf_dir / SINGLE_FILE
    if single.is_file():
        from safetensors import safe_open

        with safe_open(single, framework="pt") as f:
            return {key: single for key in f.keys()}
    raise FileNotFoundError(f"neither {INDEX_FILE} nor {SINGLE_FILE} in {hf_dir}")


def resolve_prefix(hf_dir: Path, candidates: Iterable[str]) -> str:
    """The first of `candidates` that some tensor name starts with.

    Checkpoints of the same model are saved with different layouts (e.g. `audio_tower.` on the hub vs
    `model.audio_tower.` from a transformers-5 model's own state dict); callers list the layouts they accept.
    """
    names = weight_map(hf_dir)
    candidates = list(candidates)
    for prefix in candidates:
        if any(key.startswith(prefix) for key in names):
            return prefix
    raise KeyError(f"no tensor in {hf_dir} starts with any of {candidates}")


def stored_dtypes(hf_dir: Path, prefix: str) -> dict[str, str]:
    """Tensor name → its stored dtype (torch name, e.g. "bfloat16"), read from the headers only."""
    from safetensors import safe_open

    dtypes = {}
    for file, keys in _group_by_file(hf_dir, prefix).items():
        with safe_open(file, framework="pt") as f:
            for key in keys:
                code = f.get_slice(key).get_dtype()
                dtypes[key] = SAFETENSORS_DTYPES.get(code, (code,))[0]
    return dtypes


def load_tensors(hf_dir: Path, prefix: str, *, dtype=None, strip_prefix: bool = True) -> dict:
    """The tensors whose name starts with `prefix`, as torch tensors, keyed without the prefix unless told.

    `dtype` (a torch dtype) casts each floating-point tensor as it is read; integer tensors keep their type.
    """
    from safetensors import safe_open

    tensors = {}
    for file, keys in _group_by_file(hf_dir, prefix).items():
        with safe_open(file, framework="pt") as f:
            for key in keys:
                t = f.get_tensor(key)
                if dtype is not None and t.is_floating_point():
                    t = t.to(dtype)
                tensors[key[len(prefix):] if strip_prefix else key] = t
    if not tensors:
        raise KeyError(f"no tensor in {hf_dir} starts with {prefix!r}")
    return tensors


def _group_by_file(hf_dir: Path, prefix: str) -> dict[Path, list[str]]:
    groups: dict[Path, list[str]] = {}
    for key, file in weight_map(hf_dir).items():
        if key.startswith(prefix):
            groups.setdefault(file, []).append(key)
    return groups
