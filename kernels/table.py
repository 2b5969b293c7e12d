"""The prompt table on the device: the encoder's [W, R, H] output → the decoder's [1, N, H] table in its dtype.

Row k of the table is the k-th valid audio embedding of the request, window by window in order: window w keeps its
first rows[w] rows (lengths.embeds_valid_per_window of its mask sum, exactly what runtime/stages/prompt.py's CPU path
takes). One Triton kernel gathers and casts in a single pass; without Triton the same result comes from
index_select + cast (an f32 [N, H] temporary in between).

Cast semantics: the decoder reads the table in its engine dtype (bf16 for AF3); the CPU fusion path casts with torch
(`Tensor.to`: round to nearest even). Triton's compiled `tensor.to` also rounds to nearest even for f32 → f16/bf16
(triton/language/semantic.py `cast`: fp downcasts default to ROUNDING_MODE.RTNE); its interpreter does so for f16
(numpy astype) but truncates for bf16, so the kernel rounds bf16 itself in integer arithmetic (_triton._bf16_rne) and
both modes give the CPU path's table — tests/test_kernels.py checks it bit for bit (finite values; NaN stays NaN).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from af3trt.kernels.logmel import NO_TRITON, triton_kernels, triton_runs_on
from af3trt.runtime.stages.conversation import Conversation
from af3trt.runtime.stages.prompt import PromptBuilder, window_rows


def prompt_table(embeds: torch.Tensor, rows: Sequence[int], dtype: torch.dtype, *,
                 use_triton: bool | None = None) -> torch.Tensor:
    """embeds: [W', R, H] (the first len(rows) windows are the request's; later ones are placeholders);
    rows: valid rows of each of those windows → table [1, N, H] in `dtype` on embeds' device, N = sum(rows)."""
    w, r, h = len(rows), embeds.shape[1], embeds.shape[2]
    if embeds.ndim != 3 or embeds.shape[0] < w:
        raise ValueError(f"audio_embeds {list(embeds.shape)} holds fewer than the {w} windows of the request")
    if any(not 0 <= n <= r for n in rows):
        raise ValueError(f"valid rows per window must be in [0, {r}], got {list(rows)}")
    n_total = int(sum(rows))
    out = torch.empty((1, n_total, h), dtype=dtype, device=embeds.device)  # [1, N, H]
    if n_total == 0:
        return out
    src = embeds[:w].contiguous()  # [W, R, H]
    if use_triton is None:
        use_triton = triton_runs_on(src)
    counts = torch.tensor(list(rows), dtype=torch.int32)
    if use_triton:
        if triton_kernels() is None:
            raise RuntimeError(NO_TRITON)
        offsets = torch.cumsum(counts, 0, dtype=torch.int32) - counts  # exclusive prefix sum [W]
        triton_kernels().compact_rows(src, counts.to(src.device), offsets.to(src.device), out[0])
        return out
    index = torch.cat([torch.arange(n, dtype=torch.int64) + i * r for i, n in enumerate(rows)])  # [N]
    out[0] = src.reshape(w * r, h).index_select(0, index.to(src.device)).to(dtype)
    return out


def torch_dtype(name: str) -> torch.dtype:
    """The decoder dtype named in the fusion config ("float32" | "float16" | "bfloat16") as a torch dtype."""
    if name not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"prompt table dtype must be float32, float16 or bfloat16, got {name!r}")
    return getattr(torch, name)


def build(builder: PromptBuilder, conv: Conversation, device: torch.device, embeds: torch.Tensor,
          mask: torch.Tensor, audio_windows: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
    """The device twin of PromptBuilder.build_conversation: (input_ids int32 [L] numpy, table [N, H] in the decoder dtype on
    `device`). embeds [W, T/4, H], mask [W, T], audio_windows [clips]: the fusion model's inputs, on any device
    (the mask and window counts are small and read on the host)."""
    windows = [int(w) for w in audio_windows.reshape(-1).tolist()]
    rows = window_rows(mask.cpu().numpy(), windows)
    ids = builder.build_ids(conv, rows, windows)
    return ids, prompt_table(embeds.to(device), rows, torch_dtype(builder.limits.dtype))[0]
