"""Extract AF3's language model as a standalone Qwen2ForCausalLM Hugging Face directory.

The decoder of AF3 is a plain Qwen2. Everything downstream (TensorRT-LLM's checkpoint conversion and quantization on
GPU, transformers on CPU) takes a Qwen2ForCausalLM directory, so this step writes exactly that:

    config.json              Qwen2 config from AF3's text_config, readable by transformers 5.x and 4.57 and by
                             TensorRT-LLM 1.2's QWenConfig.from_hugging_face (legacy `rope_theta`, `torch_dtype`)
    model*.safetensors       the `language_model.*` / `lm_head.*` tensors under Qwen2ForCausalLM names, streamed one
                             tensor at a time (the real checkpoint is ~16 GB bf16: AF3 is never instantiated), in shards
                             of bounded size with an index when more than one
    tokenizer files, chat template, generation_config.json   copied; tokenizer_config.json with its
                             transformers-5-only spellings made readable by 4.57 as well (TensorRT-LLM's quantize.py
                             loads the tokenizer there for calibration)

    af3trt extract-lm --hf-dir AF3_DIR --out LM_DIR
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
import shutil
from pathlib import Path

from af3trt.registry import FLOAT_DTYPES, SAFETENSORS_DTYPES, rope_theta, safetensors_dtype

log = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3  # Hugging Face's usual shard size

# Files copied verbatim when present. tokenizer.json and tokenizer_config.json are required.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "chat_template.json",
                   "processor_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
                   "generation_config.json")
REQUIRED_FILES = ("tokenizer.json", "tokenizer_config.json")

# AF3 key layouts seen in the wild → Qwen2ForCausalLM names. Order matters: the legacy doubled `.model.model`
# (checkpoints saved by transformers 5.10–5.23, see their conversion_mapping) must match before the single prefix.
_KEY_RULES = (
    (re.compile(r"^(?:language_model\.model\.model|model\.language_model\.model)\.(.+)$"), r"model.\1"),
    (re.compile(r"^(?:language_model\.model|model\.language_model)\.(.+)$"), r"model.\1"),  # hub layout / in-memory
    (re.compile(r"^(?:language_model\.)?lm_head\.(.+)$"), r"lm_head.\1"),
)
_SKIPPED_PREFIXES = ("audio_tower.", "multi_modal_projector.", "model.audio_tower.", "model.multi_modal_projector.")



class ExtractError(ValueError):
    """The AF3 directory cannot be turned into a consistent Qwen2ForCausalLM directory."""


def lm_key(af3_key: str) -> str | None:
    """Qwen2ForCausalLM name of an AF3 tensor, or None when the tensor is not part of the language model."""
    for pattern, repl in _KEY_RULES:
        if pattern.match(af3_key):
            return pattern.sub(repl, af3_key)
    if af3_key.startswith(_SKIPPED_PREFIXES):
        return None
    raise ExtractError(f"unexpected tensor {af3_key!r} in the AF3 checkpoint (neither language model nor audio side)")


def qwen2_config(af3_config: dict, dtype: str) -> dict:
    """A Qwen2ForCausalLM config.json (as a dict) from an AF3 config.json, with both new and legacy field names."""
    text = dict(af3_config.get("text_config") or {})
    if not text:
        raise ExtractError("config.json has no text_config: not an AF3 checkpoint")
    if text.get("model_type", "qwen2") != "qwen2":
        raise ExtractError(f"text_config.model_type is {text.get('model_type')!r}, expected 'qwen2'")

    rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
    theta = rope_theta(text)
    if theta is None:
        raise ExtractError("text_config has neither rope_parameters.rope_theta nor rope_theta")
    rope.setdefault("rope_type", rope.pop("type", "default"))
    rope["rope_theta"] = theta

    cfg = {k: v for k, v in text.items() if k not in ("rope_parameters", "rope_scaling", "rope_theta", "dtype",
                                                      "torch_dtype", "architectures", "model_type")}
    cfg.update(
        architectures=["Qwen2ForCausalLM"],
        model_type="qwen2",
        rope_parameters=rope,           # transformers 5.x
        rope_theta=theta,               # transformers 4.x and TensorRT-LLM (falls back to 1e5 when missing!)
        dtype=dtype,                    # transformers 5.x
        torch_dtype=dtype,              # transformers 4.x and TensorRT-LLM
        tie_word_embeddings=bool(text.get("tie_word_embeddings", af3_config.get("tie_word_embeddings", False))),
        num_key_value_heads=text.get("num_key_value_heads", text["num_attention_heads"]),
        hidden_act=text.get("hidden_act", "silu"),
        rms_norm_eps=text.get("rms_norm_eps", 1e-6),
        max_position_embeddings=text.get("max_position_embeddings", 32768),
        use_cache=True,
    )
    if rope["rope_type"] != "default":
        # Legacy readers only know `rope_scaling` (4.x spelling: `type` plus the scaling fields).
        cfg["rope_scaling"] = {("type" if k == "rope_type" else k): v for k, v in rope.items() if k != "rope_theta"}
    if "transformers_version" in af3_config:
        cfg["transformers_version"] = af3_config["transformers_version"]
    return dict(sorted(cfg.items()))


def portable_tokenizer_config(tok_cfg: dict) -> dict:
    """tokenizer_config.json readable by transformers 5.x and 4.57 (same tokens in both, see tests).

    transformers 5 writes `tokenizer_class: TokenizersBackend` (unknown to 4.57) and `extra_special_tokens` as a list
    (4.57 expects a dict there and fails); the language-model directory has no processor, so `processor_class` goes.
    """
    cfg = dict(tok_cfg)
    cfg.pop("processor_class", None)
    if cfg.get("tokenizer_class") == "TokenizersBackend":
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"  # the tokenizer.json as-is, in both versions
    extra = cfg.get("extra_special_tokens")
    if isinstance(extra, list):
        merged = list(cfg.get("additional_special_tokens") or [])
        cfg["additional_special_tokens"] = merged + [t for t in extra if t not in merged]
        del cfg["extra_special_tokens"]
    return cfg


def _source_files(hf_dir: Path) -> list[Path]:
    index = hf_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [hf_dir / name for name in sorted(set(weight_map.values()))]
    single = hf_dir / "model.safetensors"
    if single.exists():
        return [single]
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise ExtractError(f"no safetensors weights in {hf_dir}")
    return files


def _plan(hf_dir: Path) -> list[tuple[str, str, Path, str, list[int]]]:
    """(target name, source name, file, dtype, shape) of every language-model tensor, sorted by target name."""
    from safetensors import safe_open

    plan, seen = [], {}
    for path in _source_files(hf_dir):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                target = lm_key(key)
                if target is None:
                    continue
                if target in seen:
                    raise ExtractError(f"{key!r} and {seen[target]!r} both map to {target!r}")
                seen[target] = key
                sl = f.get_slice(key)
                plan.append((target, key, path, sl.get_dtype(), list(sl.get_shape())))
    plan.sort()
    return plan


def _check_against_model(plan, cfg: dict) -> None:
    """Names and shapes must be exactly those of a Qwen2ForCausalLM built from `cfg` (on the meta device: no memory)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config.from_dict(cfg)
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    expected = {k: list(v.shape) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    got = {target: shape for target, _, _, _, shape in plan}
    if cfg["tie_word_embeddings"]:
        got.pop("lm_head.weight", None)
    missing, unexpected = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    if missing or unexpected:
        raise ExtractError(f"language model tensors do not match Qwen2ForCausalLM: missing {missing[:8]}, "
                           f"unexpected {unexpected[:8]}")
    wrong = [(k, got[k], expected[k]) for k in expected if got[k] != expected[k]]
    if wrong:
        raise ExtractError(f"shape mismatch (name, checkpoint, Qwen2ForCausalLM): {wrong[:8]}")


def _shards(plan, max_shard_bytes: int) -> list[list]:
    shards, current, size = [], [], 0
    for entry in plan:
        _, _, _, dtype, shape = entry
        nbytes = _nbytes(dtype, shape)
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(entry)
        size += nbytes
    if current:
        shards.append(current)
    return shards


def _nbytes(st_dtype: str, shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * SAFETENSORS_DTYPES.get(st_dtype, ("", 4))[1]


def extract_language_model(hf_dir: Path, out_dir: Path, *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                           dtype: str | None = None) -> dict:
    """Write AF3's language model under `out_dir` as a Qwen2ForCausalLM directory; return a summary. dtype: the
    torch dtype name to write the weights in (the CPU decoder's precision, af3trt/registry.py); None: the
    checkpoint's own.

    Summary keys: out_dir, dtype, n_params, n_tensors, shapes {name: shape}, sha256 (over names, dtypes, shapes and
    bytes in name order: equal for any sharding), shards [file names], vocab_size, hidden_size, rope_theta.
    """
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    af3_config = json.loads((hf_dir / "config.json").read_text())
    for name in REQUIRED_FILES:
        if not (hf_dir / name).exists():
            raise ExtractError(f"{hf_dir / name} is missing")

    plan = _plan(hf_dir)
    if not plan:
        raise ExtractError(f"no language_model tensors in {hf_dir}")
    dtypes = {dtype for *_, dtype, _ in plan}
    if len(dtypes) != 1 or SAFETENSORS_DTYPES.get(next(iter(dtypes)), ("",))[0] not in FLOAT_DTYPES:
        raise ExtractError(f"expected one floating dtype for the language model, found {sorted(dtypes)}")
    stored = safetensors_dtype(dtypes.pop())
    declared = (af3_config.get("text_config") or {}).get("dtype") or af3_config.get("dtype")
    if declared and declared != stored:
        log.warning("config declares dtype %s but the tensors are %s: writing %s", declared, stored, dtype or stored)
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise ExtractError(f"dtype must be one of {FLOAT_DTYPES}, got {dtype!r}")
    dtype = dtype or stored
    cast = getattr(torch, dtype)

    cfg = qwen2_config(af3_config, dtype)
    _check_against_model(plan, cfg)

    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in list(out_dir.glob("model*.safetensors")) + list(out_dir.glob("model.safetensors.index.json")):
        stale.unlink()

    shards = _shards(plan, max_shard_bytes)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    total = sum(_nbytes(d, s) // SAFETENSORS_DTYPES[d][1] for *_, d, s in plan) * cast.itemsize  # as written
    log.info("extracting %d language-model tensors (%s, written as %s, %.2f GB) into %d shard(s) under %s",
             len(plan), stored, dtype, total / 1e9, len(shards), out_dir)

    digest = hashlib.sha256()
    weight_map, n_params, handles = {}, 0, {}
    for shard_name, shard in zip(names, shards):
        tensors = {}  # one shard in memory at a time
        for target, key, path, _, shape in shard:
            if path not in handles:
                handles[path] = safe_open(str(path), framework="pt")
            t = handles[path].get_tensor(key).to(cast).contiguous()
            digest.update(f"{target}|{dtype}|{list(shape)}|".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy())
            tensors[target] = t
            weight_map[target] = shard_name
            n_params += t.numel()
        save_file(tensors, str(out_dir / shard_name), metadata={"format": "pt"})
        log.info("wrote %s (%d tensors, %.1f MB)", shard_name, len(tensors),
                 sum(t.numel() * t.element_size() for t in tensors.values()) / 1e6)
        del tensors
    handles.clear()

    if len(shards) > 1:
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")

    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    copied = []
    for name in TOKENIZER_FILES:
        if (hf_dir / name).exists():
            shutil.copy2(hf_dir / name, out_dir / name)
            copied.append(name)
    tok_cfg = json.loads((hf_dir / "tokenizer_config.json").read_text())
    (out_dir / "tokenizer_config.json").write_text(json.dumps(portable_tokenizer_config(tok_cfg), indent=2) + "\n")
    log.info("copied %s", ", ".join(copied))

    summary = {
        "out_dir": str(out_dir),
        "dtype": dtype,
        "n_params": n_params,
        "n_tensors": len(plan),
        "shapes": {target: shape for target, _, _, _, shape in plan},
        "sha256": digest.hexdigest(),
        "shards": names,
        "vocab_size": cfg["vocab_size"],
        "hidden_size": cfg["hidden_size"],
        "rope_theta": cfg["rope_theta"],
    }
    log.info("language model: %.1fM parameters, vocab %d, hidden %d, rope_theta %g, sha256 %s",
             n_params / 1e6, cfg["vocab_size"], cfg["hidden_size"], cfg["rope_theta"], summary["sha256"][:16])
    return summary


def main(argv=None):
    ap = argparse.ArgumentParser(prog="af3trt extract-lm", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf-dir", required=True, type=Path, help="AF3 Hugging Face directory")
    ap.add_argument("--out", required=True, type=Path, help="output Qwen2ForCausalLM directory")
    ap.add_argument("--max-shard-gb", type=float, default=DEFAULT_MAX_SHARD_BYTES / 1024**3)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    summary = extract_language_model(args.hf_dir, args.out, max_shard_bytes=int(args.max_shard_gb * 1024**3))
    print(json.dumps({k: v for k, v in summary.items() if k != "shapes"}, indent=2))


if __name__ == "__main__":
    main()
