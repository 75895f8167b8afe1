"""Triton kernels for ParaRNN's linear scans h_t = A_t h_{t-1} + b_t (CUDA; TRITON_INTERPRET=1 on CPU).

One program owns BLOCK_D channels of one sequence and walks the sequence in tiles of BLOCK_T steps:
inside a tile `tl.associative_scan` composes the affine maps in log2(BLOCK_T) depth, and the state
at the end of each tile is carried into the next. Channels never interact, matching the torch
reference in kernels/pararnn.py (which tests compare against).

Layouts are the torch reference's, made contiguous: diagonal a, b [B, T, D]; block2 a [B, T, 2, 2, D],
b [B, T, 2, D]. Accumulation is in fp32 (fp64 for fp64 inputs); the result has b's dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_T = 64
BLOCK_D = 32


@triton.jit
def _diag_combine(a_early, b_early, a_late, b_late):
    return a_late * a_early, a_late * b_early + b_late


@triton.jit
def _diag_scan_kernel(a_ptr, b_ptr, h0_ptr, h_ptr, seq_len, channels,
                      HAS_H0: tl.constexpr, ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    batch = tl.program_id(0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < channels
    if HAS_H0:
        carry = tl.load(h0_ptr + batch * channels + offs_d, mask=mask_d, other=0.0).to(ACC)
    else:
        carry = tl.zeros([BLOCK_D], dtype=ACC)
    rows = tl.arange(0, BLOCK_T)
    base = batch * seq_len * channels
    for start in range(0, seq_len, BLOCK_T):
        offs_t = start + rows
        mask = (offs_t < seq_len)[:, None] & mask_d[None, :]
        offsets = base + offs_t[:, None] * channels + offs_d[None, :]
        # Padding rows are the identity map (a = 1, b = 0), so the last row holds the tile's end state.
        a = tl.load(a_ptr + offsets, mask=mask, other=1.0).to(ACC)
        b = tl.load(b_ptr + offsets, mask=mask, other=0.0).to(ACC)
        a_cum, b_cum = tl.associative_scan((a, b), 0, _diag_combine)
        h = a_cum * carry[None, :] + b_cum
        tl.store(h_ptr + offsets, h.to(h_ptr.dtype.element_ty), mask=mask)
        carry = tl.sum(tl.where(rows[:, None] == BLOCK_T - 1, h, 0.0), axis=0)


@triton.jit
def _block2_combine(e00, e01, e10, e11, eb0, eb1, l00, l01, l10, l11, lb0, lb1):
    # (late) o (early) = (L E, L b_e + b_l), a 2x2 product per channel.
    return (l00 * e00 + l01 * e10, l00 * e01 + l01 * e11,
            l10 * e00 + l11 * e10, l10 * e01 + l11 * e11,
            l00 * eb0 + l01 * eb1 + lb0, l10 * eb0 + l11 * eb1 + lb1)


@triton.jit
def _block2_scan_kernel(a_ptr, b_ptr, h0_ptr, h_ptr, seq_len, channels,
                        HAS_H0: tl.constexpr, ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    batch = tl.program_id(0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < channels
    if HAS_H0:
        carry0 = tl.load(h0_ptr + batch * 2 * channels + offs_d, mask=mask_d, other=0.0).to(ACC)
        carry1 = tl.load(h0_ptr + batch * 2 * channels + channels + offs_d, mask=mask_d, other=0.0).to(ACC)
    else:
        carry0 = tl.zeros([BLOCK_D], dtype=ACC)
        carry1 = tl.zeros([BLOCK_D], dtype=ACC)
    rows = tl.arange(0, BLOCK_T)
    for start in range(0, seq_len, BLOCK_T):
        offs_t = start + rows
        mask = (offs_t < seq_len)[:, None] & mask_d[None, :]
        step = (batch * seq_len + offs_t[:, None])
        a_off = step * 4 * channels + offs_d[None, :]
        b_off = step * 2 * channels + offs_d[None, :]
        a00 = tl.load(a_ptr + a_off, mask=mask, other=1.0).to(ACC)
        a01 = tl.load(a_ptr + a_off + channels, mask=mask, other=0.0).to(ACC)
        a10 = tl.load(a_ptr + a_off + 2 * channels, mask=mask, other=0.0).to(ACC)
        a11 = tl.load(a_ptr + a_off + 3 * channels, mask=mask, other=1.0).to(ACC)
        b0 = tl.load(b_ptr + b_off, mask=mask, other=0.0).to(ACC)
        b1 = tl.load(b_ptr + b_off + channels, mask=mask, other=0.0).to(ACC)
        c00, c01, c10, c11, cb0, cb1 = tl.associative_scan((a00, a01, a10, a11, b0, b1), 0, _block2_combine)
        h0 = c00 * carry0[None, :] + c01 * carry1[None, :] + cb0
        h1 = c10 * carry0[None, :] + c11 * carry1[None, :] + cb1
        tl.store(h_ptr + b_off, h0.to(h_ptr.dtype.element_ty), mask=mask)
        tl.store(h_ptr + b_off + channels, h1.to(h_ptr.dtype.element_ty), mask=mask)
        last = rows[:, None] == BLOCK_T - 1
        carry0 = tl.sum(tl.where(last, h0, 0.0), axis=0)
        carry1 = tl.sum(tl.where(last, h1, 0.0), axis=0)


def linear_scan_triton(a: torch.Tensor, b: torch.Tensor, structure: str, h0: torch.Tensor | None = None,
                       block_t: int = BLOCK_T, block_d: int = BLOCK_D) -> torch.Tensor:
    """Same contract as kernels.pararnn.linear_scan_torch (h_{-1} = h0 or 0, time on dim 1)."""
    from kernels.pararnn import _check_scan_shapes

    _check_scan_shapes(a, b, structure)
    a, b = a.contiguous(), b.contiguous()
    batch, seq_len, channels = b.shape[0], b.shape[1], b.shape[-1]
    h = torch.empty_like(b)
    if seq_len == 0:
        return h
    h0_arg = h0.contiguous() if h0 is not None else b  # unused pointer when HAS_H0 is False
    kernel = _diag_scan_kernel if structure == "diagonal" else _block2_scan_kernel
    grid = (batch, triton.cdiv(channels, block_d))
    # fp32 accumulation, or fp64 for fp64 inputs (reference-precision runs on GPU).
    acc = tl.float64 if b.dtype == torch.float64 else tl.float32
    kernel[grid](a, b, h0_arg, h, seq_len, channels, HAS_H0=h0 is not None, ACC=acc, BLOCK_T=block_t,
                 BLOCK_D=block_d)
    return h
