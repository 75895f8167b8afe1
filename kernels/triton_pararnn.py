"""Triton kernels for ParaRNN's linear scans h_t = A_t h_{t-1} + b_t (CUDA; TRITON_INTERPRET=1 on CPU).

A program owns BLOCK_D channels of one sequence and walks a stretch of time in tiles of BLOCK_T steps:
inside a tile `tl.associative_scan` composes the affine maps in log2(BLOCK_T) depth, and the state at
the end of each tile is carried into the next. Channels never interact, matching the torch reference in
kernels/pararnn.py (which tests compare against).

Why chunks: with one program per (sequence, BLOCK_D channels) walking all of T, a batch-1, 256-channel
scan runs only 8 programs and leaves the GPU idle at long T. So time is cut into chunks of CHUNK steps
(a multiple of BLOCK_T) run in parallel, three launches over a (B, D / BLOCK_D, n_chunks) grid:
  1. each program composes its chunk's maps into one affine map per channel (summary buffers);
  2. one pass of the same kernel scans the n_chunks summaries from h0 (or 0): the state at each chunk end;
  3. each program rescans its chunk from the previous chunk's end state and writes h.
CHUNK is picked so the grid has a few programs per SM (`_auto_chunk`); when that leaves a
single chunk (short T or a large batch) phases 1-2 are skipped and phase 3 alone is the whole scan.

Layouts are the torch reference's, made contiguous: diagonal a, b [B, T, D]; block2 a [B, T, 2, 2, D],
b [B, T, 2, D]; summaries and chunk-end states use the same layouts with n_chunks in place of T.
Accumulation is in fp32 (fp64 for fp64 inputs); the result has b's dtype.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kernels.shapes import check_scan_shapes

BLOCK_T = 64
BLOCK_D = 32
PROGRAMS_PER_SM = 4
# Without a CUDA device to ask (the interpreter): an H100/H200's 132 SMs.
TARGET_PROGRAMS = PROGRAMS_PER_SM * 132


@triton.jit
def _program_span(seq_len, chunk_len, channels, BLOCK_D: tl.constexpr):
    """This program's sequence, chunk, channel lanes and time span [t_begin, t_end)."""
    batch = tl.program_id(0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    chunk = tl.program_id(2)
    t_begin = chunk * chunk_len
    t_end = tl.minimum(t_begin + chunk_len, seq_len)
    return batch, chunk, tl.num_programs(2), offs_d, offs_d < channels, t_begin, t_end


@triton.jit
def _chunk_start(h0_ptr, states_ptr, batch, chunk, n_chunks, comp, WIDTH: tl.constexpr, offs_d, mask_d,
                 channels, HAS_H0: tl.constexpr, ACC: tl.constexpr):
    """Component `comp` of the state before this chunk: the previous chunk's end state, else h0 or 0."""
    chunk_lanes = offs_d * 0 + chunk  # a vector: the interpreter mis-types bool-vector & bool-scalar masks
    prev = ((batch * n_chunks + chunk - 1) * WIDTH + comp) * channels + offs_d
    state = tl.load(states_ptr + prev, mask=mask_d & (chunk_lanes > 0), other=0.0).to(ACC)
    if HAS_H0:
        initial = (batch * WIDTH + comp) * channels + offs_d
        state += tl.load(h0_ptr + initial, mask=mask_d & (chunk_lanes == 0), other=0.0).to(ACC)
    return state


@triton.jit
def _last_row(x, BLOCK_T: tl.constexpr):
    rows = tl.arange(0, BLOCK_T)
    return tl.sum(tl.where(rows[:, None] == BLOCK_T - 1, x, 0.0), axis=0)


@triton.jit
def _diag_combine(a_early, b_early, a_late, b_late):
    return a_late * a_early, a_late * b_early + b_late


@triton.jit
def _diag_scan_kernel(a_ptr, b_ptr, h0_ptr, states_ptr, h_ptr, sum_a_ptr, seq_len, channels, chunk_len,
                      HAS_H0: tl.constexpr, SUMMARY: tl.constexpr, ACC: tl.constexpr, BLOCK_T: tl.constexpr,
                      BLOCK_D: tl.constexpr):
    # SUMMARY: compose the chunk into (sum_a, h_ptr) at [batch, chunk]; else scan it into h_ptr [B, T, D].
    batch, chunk, n_chunks, offs_d, mask_d, t_begin, t_end = _program_span(seq_len, chunk_len, channels,
                                                                           BLOCK_D)
    if SUMMARY:  # the chunk's map so far, starting from the identity
        prod = tl.full([BLOCK_D], 1.0, ACC)
        carry = tl.zeros([BLOCK_D], dtype=ACC)
    else:
        carry = _chunk_start(h0_ptr, states_ptr, batch, chunk, n_chunks, 0, 1, offs_d, mask_d, channels,
                             HAS_H0, ACC)
    rows = tl.arange(0, BLOCK_T)
    for start in range(t_begin, t_end, BLOCK_T):
        offs_t = start + rows
        mask = (offs_t < seq_len)[:, None] & mask_d[None, :]
        offsets = (batch * seq_len + offs_t[:, None]) * channels + offs_d[None, :]
        # Padding rows are the identity map (a = 1, b = 0), so the last row holds the tile's end state.
        a = tl.load(a_ptr + offsets, mask=mask, other=1.0).to(ACC)
        b = tl.load(b_ptr + offsets, mask=mask, other=0.0).to(ACC)
        a_cum, b_cum = tl.associative_scan((a, b), 0, _diag_combine)
        if SUMMARY:
            prod, carry = _diag_combine(prod, carry, _last_row(a_cum, BLOCK_T), _last_row(b_cum, BLOCK_T))
        else:
            h = a_cum * carry[None, :] + b_cum
            tl.store(h_ptr + offsets, h.to(h_ptr.dtype.element_ty), mask=mask)
            carry = _last_row(h, BLOCK_T)
    if SUMMARY:
        out = (batch * n_chunks + chunk) * channels + offs_d
        tl.store(sum_a_ptr + out, prod, mask=mask_d)
        tl.store(h_ptr + out, carry, mask=mask_d)


@triton.jit
def _block2_combine(e00, e01, e10, e11, eb0, eb1, l00, l01, l10, l11, lb0, lb1):
    # (late) o (early) = (L E, L b_e + b_l), a 2x2 product per channel.
    return (l00 * e00 + l01 * e10, l00 * e01 + l01 * e11,
            l10 * e00 + l11 * e10, l10 * e01 + l11 * e11,
            l00 * eb0 + l01 * eb1 + lb0, l10 * eb0 + l11 * eb1 + lb1)


@triton.jit
def _block2_scan_kernel(a_ptr, b_ptr, h0_ptr, states_ptr, h_ptr, sum_a_ptr, seq_len, channels, chunk_len,
                        HAS_H0: tl.constexpr, SUMMARY: tl.constexpr, ACC: tl.constexpr, BLOCK_T: tl.constexpr,
                        BLOCK_D: tl.constexpr):
    # As _diag_scan_kernel, with a 2x2 matrix and a 2-vector per channel and step.
    batch, chunk, n_chunks, offs_d, mask_d, t_begin, t_end = _program_span(seq_len, chunk_len, channels,
                                                                           BLOCK_D)
    if SUMMARY:
        p00 = tl.full([BLOCK_D], 1.0, ACC)
        p01 = tl.zeros([BLOCK_D], dtype=ACC)
        p10 = tl.zeros([BLOCK_D], dtype=ACC)
        p11 = tl.full([BLOCK_D], 1.0, ACC)
        carry0 = tl.zeros([BLOCK_D], dtype=ACC)
        carry1 = tl.zeros([BLOCK_D], dtype=ACC)
    else:
        carry0 = _chunk_start(h0_ptr, states_ptr, batch, chunk, n_chunks, 0, 2, offs_d, mask_d, channels,
                              HAS_H0, ACC)
        carry1 = _chunk_start(h0_ptr, states_ptr, batch, chunk, n_chunks, 1, 2, offs_d, mask_d, channels,
                              HAS_H0, ACC)
    rows = tl.arange(0, BLOCK_T)
    for start in range(t_begin, t_end, BLOCK_T):
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
        if SUMMARY:
            p00, p01, p10, p11, carry0, carry1 = _block2_combine(
                p00, p01, p10, p11, carry0, carry1, _last_row(c00, BLOCK_T), _last_row(c01, BLOCK_T),
                _last_row(c10, BLOCK_T), _last_row(c11, BLOCK_T), _last_row(cb0, BLOCK_T),
                _last_row(cb1, BLOCK_T))
        else:
            h0 = c00 * carry0[None, :] + c01 * carry1[None, :] + cb0
            h1 = c10 * carry0[None, :] + c11 * carry1[None, :] + cb1
            tl.store(h_ptr + b_off, h0.to(h_ptr.dtype.element_ty), mask=mask)
            tl.store(h_ptr + b_off + channels, h1.to(h_ptr.dtype.element_ty), mask=mask)
            carry0 = _last_row(h0, BLOCK_T)
            carry1 = _last_row(h1, BLOCK_T)
    if SUMMARY:
        row = batch * n_chunks + chunk
        a_out = row * 4 * channels + offs_d
        b_out = row * 2 * channels + offs_d
        tl.store(sum_a_ptr + a_out, p00, mask=mask_d)
        tl.store(sum_a_ptr + a_out + channels, p01, mask=mask_d)
        tl.store(sum_a_ptr + a_out + 2 * channels, p10, mask=mask_d)
        tl.store(sum_a_ptr + a_out + 3 * channels, p11, mask=mask_d)
        tl.store(h_ptr + b_out, carry0, mask=mask_d)
        tl.store(h_ptr + b_out + channels, carry1, mask=mask_d)


@functools.cache
def _target_programs(device: torch.device) -> int:
    """A few programs per SM of `device`, so the grid fills it."""
    if device.type != "cuda":
        return TARGET_PROGRAMS
    return PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count


def _auto_chunk(seq_len: int, programs_per_chunk: int, block_t: int, target_programs: int = TARGET_PROGRAMS) -> int:
    """Chunk length, a multiple of block_t (at least one tile), cutting T into at most the
    cdiv(target_programs, programs_per_chunk) chunks that fill the GPU; phase 2 stays that short."""
    chunks = triton.cdiv(target_programs, programs_per_chunk)
    return triton.cdiv(triton.cdiv(seq_len, chunks), block_t) * block_t


def linear_scan_triton(a: torch.Tensor, b: torch.Tensor, structure: str, h0: torch.Tensor | None = None,
                       block_t: int = BLOCK_T, block_d: int = BLOCK_D, chunk: int | None = None) -> torch.Tensor:
    """Same contract as kernels.pararnn.linear_scan_torch (h_{-1} = h0 or 0, time on dim 1).

    `chunk` is the time steps per parallel chunk, a positive multiple of block_t (None: `_auto_chunk`).
    """
    check_scan_shapes(a, b, structure)
    a, b = a.contiguous(), b.contiguous()
    batch, seq_len, channels = b.shape[0], b.shape[1], b.shape[-1]
    h = torch.empty_like(b)
    if seq_len == 0:
        return h
    d_blocks = triton.cdiv(channels, block_d)
    if chunk is None:
        chunk = _auto_chunk(seq_len, batch * d_blocks, block_t, _target_programs(b.device))
    elif chunk <= 0 or chunk % block_t:
        raise ValueError(f"chunk must be a positive multiple of block_t={block_t}; got {chunk}")
    n_chunks = triton.cdiv(seq_len, chunk)
    kernel = _diag_scan_kernel if structure == "diagonal" else _block2_scan_kernel
    # fp32 accumulation, or fp64 for fp64 inputs (reference-precision runs on GPU).
    acc_dtype = torch.float64 if b.dtype == torch.float64 else torch.float32
    acc = tl.float64 if acc_dtype == torch.float64 else tl.float32

    def launch(a, b, h0, states, out, sum_a, length, chunk_len, chunks, summary):
        # Unused pointers (h0 without HAS_H0, states/sum_a where never read or written) get `b`.
        kernel[(batch, d_blocks, chunks)](a, b, b if h0 is None else h0, b if states is None else states, out,
                                          b if sum_a is None else sum_a, length, channels, chunk_len,
                                          HAS_H0=h0 is not None, SUMMARY=summary, ACC=acc, BLOCK_T=block_t,
                                          BLOCK_D=block_d)

    h0 = h0.contiguous() if h0 is not None else None
    if n_chunks == 1:
        launch(a, b, h0, None, h, None, seq_len, seq_len, 1, summary=False)
        return h
    sum_a = torch.empty((batch, n_chunks, *a.shape[2:]), dtype=acc_dtype, device=b.device)
    sum_b = torch.empty((batch, n_chunks, *b.shape[2:]), dtype=acc_dtype, device=b.device)
    ends = torch.empty_like(sum_b)
    launch(a, b, None, None, sum_b, sum_a, seq_len, chunk, n_chunks, summary=True)  # 1: chunk maps
    launch(sum_a, sum_b, h0, None, ends, None, n_chunks, n_chunks, 1, summary=False)  # 2: chunk-end states
    launch(a, b, h0, ends, h, None, seq_len, chunk, n_chunks, summary=False)  # 3: rescan from chunk starts
    return h
