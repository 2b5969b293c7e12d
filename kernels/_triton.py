"""The two OpenAI Triton kernels of the GPU preprocessing path, and their launchers.

Only what a fusion buys is written as a kernel; everything a library already does well (STFT, the mel matmul, the
per-window max) stays a torch op in logmel.py / table.py.

  logmel_epilogue   mel power [W, M, 3000] → Whisper's log/clamp/scale, cropped to the request's T frames, in ONE
                    read and ONE write per kept element. torch composes it from five elementwise passes (clamp,
                    log10, maximum, add, div) and a crop copy.
  compact_rows      encoder output [W, R, H] (f32) → prompt table [N, H] in the decoder dtype: the valid-row gather
                    and the cast in one pass. torch needs an index_select into an f32 [N, H] temporary, then a cast.

Triton facts relied on (triton 3.9, checked here):
  - `triton.jit` decides at decoration time whether a kernel is compiled or interpreted: with TRITON_INTERPRET=1 in
    the environment when this module is imported, kernels run on CPU tensors through numpy (triton/runtime/jit.py
    `jit()`: `if knobs.runtime.interpret: return InterpretedFunction(...)`; platform.md: "OpenAI Triton 3.9 runs
    kernels on CPU tensors with TRITON_INTERPRET=1"). `interpreted()` below tells which mode this import got.
  - libdevice functions (e.g. `libdevice.log10`) are not supported by the interpreter
    (triton/runtime/interpreter.py `create_extern_elementwise` raises NotImplementedError), so log10 is written as
    log2(x) · log10(2) with `tl.log2`, which both modes support.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

LOG10_2 = 0.30102999566398120  # log10(x) = log2(x) * log10(2)


@triton.jit
def _logmel_epilogue(mel_ptr, peak_ptr, out_ptr, n_in, F_in, F_out, n_out, BLOCK: tl.constexpr):
    # grid: (W, cdiv(n_out, BLOCK)); mel: [W, M, F_in] contiguous f32 (n_in = M*F_in per window); peak: [W] f32, the
    # max of mel over each whole window; out: [W, M, F_out] (n_out = M*F_out), the first F_out <= F_in frames: the
    # crop to the request's frame bucket happens in the same pass.
    w = tl.program_id(0)
    i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    valid = i < n_out
    m = i // F_out
    x = tl.load(mel_ptr + w.to(tl.int64) * n_in + m * F_in + (i - m * F_out), mask=valid, other=1.0)
    log = tl.log2(tl.maximum(x, 1e-10)) * LOG10_2
    # log10 is monotonic, so the window's max of log10(clamp(mel)) is log10(clamp(max mel)): no second pass.
    floor = tl.log2(tl.maximum(tl.load(peak_ptr + w), 1e-10)) * LOG10_2 - 8.0
    y = (tl.maximum(log, floor) + 4.0) / 4.0
    tl.store(out_ptr + w.to(tl.int64) * n_out + i, y, mask=valid)


@triton.jit
def _compact_rows(src_ptr, rows_ptr, offsets_ptr, out_ptr, R, H, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
                  BF16_BITS: tl.constexpr):
    # grid: (W, cdiv(R, BLOCK_R), cdiv(H, BLOCK_H)); src: [W, R, H] contiguous; rows, offsets: [W] int32
    # out[offsets[w] + r, :] = src[w, r, :] for r < rows[w], cast to the table dtype rounding to nearest even.
    # BF16_BITS: out is a bf16 table viewed as int16, and the rounding is done here in integer arithmetic (see
    # _bf16_rne), so that the interpreter and the GPU give the same bits.
    w = tl.program_id(0)
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    h = tl.program_id(2) * BLOCK_H + tl.arange(0, BLOCK_H)
    n = tl.load(rows_ptr + w)
    first = tl.load(offsets_ptr + w).to(tl.int64)
    keep = (r < n)[:, None] & (h < H)[None, :]
    x = tl.load(src_ptr + (w.to(tl.int64) * R + r[:, None]) * H + h[None, :], mask=keep)
    if BF16_BITS:
        y = _bf16_rne(x.to(tl.float32))
    else:
        y = x.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + (first + r[:, None]) * H + h[None, :], y, mask=keep)


@triton.jit
def _bf16_rne(x):
    # f32 → the 16 bits of bf16, round to nearest even (NaN → a quiet NaN): the finite results of torch's
    # `.to(torch.bfloat16)` (c10/util/BFloat16.h round_to_nearest_even) and of compiled Triton's RTNE cast.
    # Needed as the interpreter truncates f32 → bf16 instead (triton 3.9 runtime/interpreter.py: create_fp_trunc →
    # cast_impl → _convert_float with rounding_mode None keeps the high mantissa bits).
    b = x.to(tl.uint32, bitcast=True)
    rounded = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
    return tl.where(x != x, 0x7FC0, rounded).to(tl.int16)


def interpreted() -> bool:
    """True when this import of the kernels runs them through Triton's CPU interpreter (TRITON_INTERPRET=1)."""
    return isinstance(_logmel_epilogue, InterpretedFunction)


def logmel_epilogue(mel, peak, out, block: int = 1024) -> None:
    """mel: [W, M, F_in], out: [W, M, F_out] (F_out <= F_in) f32 contiguous on one device; peak: [W] f32, each
    window's max of mel over all F_in frames. Writes out = the features of mel's first F_out frames."""
    w, m, f_in = mel.shape
    f_out = out.shape[2]
    if out.shape[:2] != (w, m) or f_out > f_in:
        raise ValueError(f"out {list(out.shape)} must be [{w}, {m}, <= {f_in}]")
    if w and m and f_out:
        _logmel_epilogue[(w, triton.cdiv(m * f_out, block))](mel, peak, out, m * f_in, f_in, f_out, m * f_out,
                                                              BLOCK=block)


def compact_rows(src, rows, offsets, out, block_r: int = 16, block_h: int = 256) -> None:
    """src: [W, R, H] f32 contiguous; rows, offsets: [W] int32 on src's device; out: [N, H] (any float dtype)."""
    w, r, h = src.shape
    bf16 = out.dtype == torch.bfloat16
    if w and r and h and out.shape[0]:
        _compact_rows[(w, triton.cdiv(r, block_r), triton.cdiv(h, block_h))](
            src, rows, offsets, out.view(torch.int16) if bf16 else out, r, h, BLOCK_R=block_r, BLOCK_H=block_h,
            BF16_BITS=bf16)
