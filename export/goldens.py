"""Golden answers for the GPU acceptance check, computed by transformers where the export runs.

The serving container's Python has transformers 4.57.3 (TensorRT-LLM 1.2.1's pin), which has no AF3 classes, so the
reference cannot be computed where the engines run. `af3trt build --target gpu` (with or without --prepare-only)
therefore writes the reference answers into the build output:

    artifacts/goldens.json          prompts, greedy token ids of transformers' generate, end ids, how they were made
    artifacts/goldens/<clip>        the audio each prompt was asked about (bytes as a client sends them)

and `af3trt gpu-check OUT` (build/gpu_check.py) sends the same requests to the GPU ensemble and compares.

The reference is `AudioFlamingo3ForConditionalGeneration.generate` (greedy, stopping on any end id of the
checkpoint's generation_config, as transformers does) fed by `AudioFlamingo3Processor.apply_chat_template`; the
audio tower and projector run in float32 and the language model in the checkpoint's dtype, which is what the CPU
target computes (tests/test_integration.py holds the CPU ensemble to these ids exactly).
"""

from __future__ import annotations

import io
import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from af3trt.runtime import assets

log = logging.getLogger(__name__)

GOLDENS_FILE = "goldens.json"
FORMAT = 1
DEFAULT_MAX_TOKENS = 16


@dataclass(frozen=True)
class GoldenCase:
    name: str
    prompt: str
    audio: str  # path relative to the artifacts directory
    token_ids: list[int]  # the answer without its end token
    text: str
    thinking: bool = False  # asked in AF3's thinking mode (prompt sent without the suffix; docs/thinking.md)


def default_cases() -> list[tuple[str, str, Path]]:
    """(name, prompt, clip): the bundled speech clip asked two ways."""
    clip = assets.speech_path()
    return [("speech-what", "What is said in the audio?", clip),
            ("speech-describe", "Describe the audio in one sentence.", clip)]


def mono16k(data: bytes):
    """float32 mono 16 kHz, decoded with soundfile and resampled with scipy (independent of runtime/stages/audio.py)."""
    from math import gcd

    import numpy as np
    import soundfile as sf
    from scipy.signal import resample_poly

    wave, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    wave = wave.mean(axis=1)
    if sr != 16000:
        g = gcd(16000, sr)
        wave = resample_poly(wave, 16000 // g, sr // g)
    return wave.astype(np.float32)


def write_goldens(hf_dir: Path, artifacts: Path, *, max_tokens: int = DEFAULT_MAX_TOKENS, cases=None,
                  think: bool = False) -> dict:
    """Run the reference for each case, copy its audio next to the answers, write artifacts/goldens.json. think: the
    cases again in thinking mode, answered by transformers + PEFT as users load think/ (non_lora_trainables.bin
    with strict=False, then PeftModel.from_pretrained(..., subfolder="think")), the suffix after the prompt."""
    import torch
    import transformers
    from transformers import AudioFlamingo3ForConditionalGeneration, AutoProcessor

    artifacts = Path(artifacts)
    processor = AutoProcessor.from_pretrained(hf_dir)
    model = AudioFlamingo3ForConditionalGeneration.from_pretrained(hf_dir).eval()
    lm_dtype = str(model.dtype).removeprefix("torch.")
    model.model.audio_tower.float()
    model.model.multi_modal_projector.float()
    end_ids = model.generation_config.eos_token_id
    end_ids = end_ids if isinstance(end_ids, list) else [end_ids]
    (artifacts / "goldens").mkdir(parents=True, exist_ok=True)
    out = _answer(model, processor, artifacts, cases or default_cases(), max_tokens, end_ids, thinking=False)
    if think:
        from peft import PeftModel

        from af3trt.runtime.stages.conversation import THINK_SUFFIX

        state = torch.load(Path(hf_dir) / "think" / "non_lora_trainables.bin", weights_only=True)
        model.load_state_dict(state, strict=False)
        model.model.audio_tower.float()
        model.model.multi_modal_projector.float()
        thinker = PeftModel.from_pretrained(model, str(hf_dir), subfolder="think").eval()
        out += _answer(thinker, processor, artifacts, cases or default_cases(), max_tokens, end_ids, thinking=True,
                       suffix=" " + THINK_SUFFIX)
    doc = {"af3trt_goldens": FORMAT, "max_tokens": max_tokens, "end_ids": end_ids,
           "reference": f"transformers {transformers.__version__} AudioFlamingo3ForConditionalGeneration.generate, "
                        f"greedy; audio tower + projector float32, language model {lm_dtype}"
                        + ("; thinking cases with peft's PeftModel (think/)" if think else ""),
           "cases": [asdict(c) for c in out]}
    (artifacts / GOLDENS_FILE).write_text(json.dumps(doc, indent=2))
    return {"path": f"artifacts/{GOLDENS_FILE}", "cases": len(out), "tokens": [len(c.token_ids) for c in out]}


def _answer(model, processor, artifacts: Path, cases, max_tokens: int, end_ids: list[int], *, thinking: bool,
            suffix: str = "") -> list[GoldenCase]:
    import torch

    out = []
    for name, prompt, clip in cases:
        rel = f"goldens/{Path(clip).name}"
        if not (artifacts / rel).exists():
            shutil.copyfile(clip, artifacts / rel)
        conv = [{"role": "user", "content": [{"type": "audio", "audio": mono16k(Path(clip).read_bytes())},
                                             {"type": "text", "text": prompt + suffix}]}]
        inputs = processor.apply_chat_template(conv, tokenize=True, return_dict=True, add_generation_prompt=True)
        with torch.no_grad():
            ids = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False, eos_token_id=end_ids,
                                 pad_token_id=end_ids[0])
        ids = ids[0, inputs["input_ids"].shape[1]:].tolist()
        ids = ids[:-1] if ids and ids[-1] in end_ids else ids  # TensorRT-LLM leaves the end token out
        out.append(GoldenCase(f"think-{name}" if thinking else name, prompt, rel, ids,
                              processor.tokenizer.decode(ids), thinking))
        log.info("golden %s%s: %d tokens", "think-" if thinking else "", name, len(ids))
    return out
