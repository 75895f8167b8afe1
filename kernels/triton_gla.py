"""Triton kernels for chunkwise GLA, forward and backward (used on CUDA via kernels.dispatch).

Same semantics and layout as `kernels.gla.chunk_gla_torch`. The wrapper moves inputs to fp32
[B*H, T_padded, D] rows, computes the within-chunk cumulative gate b in torch, then runs:

forward
  1. `_intra_scores_kernel` (chunk, sub-chunk row I): causal scores A inside each chunk of 64.
     Sub-chunk pairs J < I are one tl.dot after rescaling both sides to the last position of J;
     the diagonal 16x16 block forms exp(b_i - b_j) per key channel on j <= i. Every exponent <= 0.
  2. `_forward_kernel` (value block, batch*head): walks the chunks carrying the [K, BV] state in
     registers: o = (q * exp(b) * scale) @ S + A @ v; S <- exp(b_last) S + (k * exp(b_last - b))^T v.
     The state at each chunk start is stored for the backward pass.
backward
  3. `_backward_inter_kernel` (value block, batch*head): walks the chunks backwards carrying dS:
     the state part of dq and dk (summed over value blocks in torch), dv, dA = dO v^T, and dh0.
  4. `_intra_grads_kernel` (chunk, sub-chunk): the score part of dq and dk from dA, with the same
     rescaling as (1).
  dg comes from the gate-gradient identity dg_t = sum_{s>=t} (q_s dq_s - k_s dk_s), plus the final
  state's term sum_v S_T dS_T at the last position, as one reverse cumsum in torch.

Accumulation is fp32 throughout (tl.dot may use TF32 tensor cores on GPUs; the interpreter is exact).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.shapes import check_gla_shapes

CHUNK_SIZE = 64
SUB_CHUNK_SIZE = 16


@triton.jit
def _intra_scores_kernel(q_ptr, k_ptr, b_ptr, a_ptr, scale, seq_len_padded, num_chunks,
                         K: tl.constexpr, C: tl.constexpr, SUB: tl.constexpr, BK: tl.constexpr):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    blocks: tl.constexpr = C // SUB
    n = pid // blocks
    row_block = pid % blocks
    offs_s = tl.arange(0, SUB)
    offs_k = tl.arange(0, BK)
    mask_k = offs_k < K
    base = bh.to(tl.int64) * seq_len_padded * K
    row_t = n * C + row_block * SUB + offs_s
    tile = row_t[:, None] * K + offs_k[None, :]
    q_i = tl.load(q_ptr + base + tile, mask=mask_k[None, :], other=0.0)
    b_i = tl.load(b_ptr + base + tile, mask=mask_k[None, :], other=0.0)
    a_base = a_ptr + (bh.to(tl.int64) * num_chunks + n) * C * C
    rows = row_block * SUB + offs_s
    for col_block in range(row_block):
        col_t = n * C + col_block * SUB + offs_s
        col_tile = col_t[:, None] * K + offs_k[None, :]
        k_j = tl.load(k_ptr + base + col_tile, mask=mask_k[None, :], other=0.0)
        b_j = tl.load(b_ptr + base + col_tile, mask=mask_k[None, :], other=0.0)
        ref = tl.load(b_ptr + base + (n * C + col_block * SUB + SUB - 1) * K + offs_k, mask=mask_k, other=0.0)
        q_r = q_i * tl.exp(b_i - ref[None, :])
        k_r = k_j * tl.exp(ref[None, :] - b_j)
        block = tl.dot(q_r, tl.trans(k_r))
        cols = col_block * SUB + offs_s
        tl.store(a_base + rows[:, None] * C + cols[None, :], block * scale)
    causal = offs_s[:, None] >= offs_s[None, :]
    acc = tl.zeros([SUB, SUB], dtype=tl.float32)
    for kk in range(K):
        q_c = tl.load(q_ptr + base + row_t * K + kk)
        k_c = tl.load(k_ptr + base + row_t * K + kk)
        b_c = tl.load(b_ptr + base + row_t * K + kk)
        decay = tl.exp(tl.where(causal, b_c[:, None] - b_c[None, :], float("-inf")))
        acc += q_c[:, None] * k_c[None, :] * decay
    tl.store(a_base + rows[:, None] * C + rows[None, :], acc * scale)


@triton.jit
def _forward_kernel(q_ptr, k_ptr, v_ptr, b_ptr, a_ptr, h0_ptr, o_ptr, ht_ptr, states_ptr, scale,
                    seq_len_padded, num_chunks, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
                    BK: tl.constexpr, BV: tl.constexpr, HAS_H0: tl.constexpr, STORE_FINAL: tl.constexpr):
    iv = tl.program_id(0).to(tl.int64)
    bh = tl.program_id(1).to(tl.int64)
    offs_t = tl.arange(0, C)
    offs_k = tl.arange(0, BK)
    offs_v = iv * BV + tl.arange(0, BV)
    mask_k = offs_k < K
    mask_v = offs_v < V
    mask_kv = mask_k[:, None] & mask_v[None, :]
    kv_tile = offs_k[:, None] * V + offs_v[None, :]
    state = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        state = tl.load(h0_ptr + bh * K * V + kv_tile, mask=mask_kv, other=0.0)
    qk_base = bh * seq_len_padded * K
    v_base = bh * seq_len_padded * V
    for n in range(num_chunks):
        t = n * C + offs_t
        qk_tile = t[:, None] * K + offs_k[None, :]
        v_tile = t[:, None] * V + offs_v[None, :]
        q = tl.load(q_ptr + qk_base + qk_tile, mask=mask_k[None, :], other=0.0)
        k = tl.load(k_ptr + qk_base + qk_tile, mask=mask_k[None, :], other=0.0)
        b = tl.load(b_ptr + qk_base + qk_tile, mask=mask_k[None, :], other=0.0)
        b_last = tl.load(b_ptr + qk_base + (n * C + C - 1) * K + offs_k, mask=mask_k, other=0.0)
        v = tl.load(v_ptr + v_base + v_tile, mask=mask_v[None, :], other=0.0)
        a = tl.load(a_ptr + (bh * num_chunks + n) * C * C + offs_t[:, None] * C + offs_t[None, :])
        tl.store(states_ptr + (bh * num_chunks + n) * K * V + kv_tile, state, mask=mask_kv)
        o = tl.dot(q * tl.exp(b) * scale, state) + tl.dot(a, v)
        tl.store(o_ptr + v_base + v_tile, o, mask=mask_v[None, :])
        k_to_end = k * tl.exp(b_last[None, :] - b)
        state = state * tl.exp(b_last)[:, None] + tl.dot(tl.trans(k_to_end), v)
    if STORE_FINAL:
        tl.store(ht_ptr + bh * K * V + kv_tile, state, mask=mask_kv)


@triton.jit
def _backward_inter_kernel(q_ptr, k_ptr, v_ptr, b_ptr, a_ptr, states_ptr, do_ptr, dht_ptr,
                           dq_ptr, dk_ptr, dv_ptr, da_ptr, dh0_ptr, scale, seq_len_padded, num_chunks,
                           num_bh, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
                           BV: tl.constexpr, HAS_DHT: tl.constexpr):
    iv = tl.program_id(0).to(tl.int64)
    bh = tl.program_id(1).to(tl.int64)
    offs_t = tl.arange(0, C)
    offs_k = tl.arange(0, BK)
    offs_v = iv * BV + tl.arange(0, BV)
    mask_k = offs_k < K
    mask_v = offs_v < V
    mask_kv = mask_k[:, None] & mask_v[None, :]
    kv_tile = offs_k[:, None] * V + offs_v[None, :]
    d_state = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_DHT:
        d_state = tl.load(dht_ptr + bh * K * V + kv_tile, mask=mask_kv, other=0.0)
    qk_base = bh * seq_len_padded * K
    v_base = bh * seq_len_padded * V
    # Per-value-block partial sums of dq, dk and dA: [num_value_blocks, B*H, ...], summed in torch.
    part_qk_base = (iv * num_bh + bh) * seq_len_padded * K
    for step in range(num_chunks):
        n = num_chunks - 1 - step
        t = n * C + offs_t
        qk_tile = t[:, None] * K + offs_k[None, :]
        v_tile = t[:, None] * V + offs_v[None, :]
        q = tl.load(q_ptr + qk_base + qk_tile, mask=mask_k[None, :], other=0.0)
        k = tl.load(k_ptr + qk_base + qk_tile, mask=mask_k[None, :], other=0.0)
        b = tl.load(b_ptr + qk_base + qk_tile, mask=mask_k[None, :], other=0.0)
        b_last = tl.load(b_ptr + qk_base + (n * C + C - 1) * K + offs_k, mask=mask_k, other=0.0)
        v = tl.load(v_ptr + v_base + v_tile, mask=mask_v[None, :], other=0.0)
        do = tl.load(do_ptr + v_base + v_tile, mask=mask_v[None, :], other=0.0)
        chunk_cc = (bh * num_chunks + n) * C * C + offs_t[:, None] * C + offs_t[None, :]
        a = tl.load(a_ptr + chunk_cc)
        state = tl.load(states_ptr + (bh * num_chunks + n) * K * V + kv_tile, mask=mask_kv, other=0.0)
        decay_in = tl.exp(b)
        decay_to_end = tl.exp(b_last[None, :] - b)
        dq = tl.dot(do, tl.trans(state)) * decay_in * scale
        tl.store(dq_ptr + part_qk_base + qk_tile, dq, mask=mask_k[None, :])
        dk = tl.dot(v, tl.trans(d_state)) * decay_to_end
        tl.store(dk_ptr + part_qk_base + qk_tile, dk, mask=mask_k[None, :])
        dv = tl.dot(k * decay_to_end, d_state) + tl.dot(tl.trans(a), do)
        tl.store(dv_ptr + v_base + v_tile, dv, mask=mask_v[None, :])
        da = tl.dot(do, tl.trans(v))
        tl.store(da_ptr + iv * num_bh * num_chunks * C * C + chunk_cc, da)
        d_state = d_state * tl.exp(b_last)[:, None] + tl.dot(tl.trans(q * decay_in * scale), do)
    tl.store(dh0_ptr + bh * K * V + kv_tile, d_state, mask=mask_kv)


@triton.jit
def _intra_grads_kernel(q_ptr, k_ptr, b_ptr, da_ptr, dq_off_ptr, dk_off_ptr, dq_diag_ptr, dk_diag_ptr,
                        scale, seq_len_padded, num_chunks, K: tl.constexpr, C: tl.constexpr,
                        SUB: tl.constexpr, BK: tl.constexpr):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    blocks: tl.constexpr = C // SUB
    n = pid // blocks
    own = pid % blocks
    offs_s = tl.arange(0, SUB)
    offs_k = tl.arange(0, BK)
    mask_k = offs_k < K
    base = bh.to(tl.int64) * seq_len_padded * K
    own_t = n * C + own * SUB + offs_s
    own_tile = own_t[:, None] * K + offs_k[None, :]
    b_s = tl.load(b_ptr + base + own_tile, mask=mask_k[None, :], other=0.0)
    ref_s = tl.load(b_ptr + base + (n * C + own * SUB + SUB - 1) * K + offs_k, mask=mask_k, other=0.0)
    da_base = da_ptr + (bh.to(tl.int64) * num_chunks + n) * C * C
    own_rows = own * SUB + offs_s
    # dq of row block `own` from the blocks J < own (rescaled to J's last position).
    dq = tl.zeros([SUB, BK], dtype=tl.float32)
    for col_block in range(own):
        col_t = n * C + col_block * SUB + offs_s
        col_tile = col_t[:, None] * K + offs_k[None, :]
        k_j = tl.load(k_ptr + base + col_tile, mask=mask_k[None, :], other=0.0)
        b_j = tl.load(b_ptr + base + col_tile, mask=mask_k[None, :], other=0.0)
        ref = tl.load(b_ptr + base + (n * C + col_block * SUB + SUB - 1) * K + offs_k, mask=mask_k, other=0.0)
        da = tl.load(da_base + own_rows[:, None] * C + (col_block * SUB + offs_s)[None, :])
        dq += tl.dot(da, k_j * tl.exp(ref[None, :] - b_j)) * tl.exp(b_s - ref[None, :])
    tl.store(dq_off_ptr + base + own_tile, dq * scale, mask=mask_k[None, :])
    # dk of column block `own` from the blocks I > own (rescaled to own's last position).
    dk = tl.zeros([SUB, BK], dtype=tl.float32)
    for row_block in range(own + 1, blocks):
        row_t = n * C + row_block * SUB + offs_s
        row_tile = row_t[:, None] * K + offs_k[None, :]
        q_i = tl.load(q_ptr + base + row_tile, mask=mask_k[None, :], other=0.0)
        b_i = tl.load(b_ptr + base + row_tile, mask=mask_k[None, :], other=0.0)
        da = tl.load(da_base + (row_block * SUB + offs_s)[:, None] * C + own_rows[None, :])
        dk += tl.dot(tl.trans(da), q_i * tl.exp(b_i - ref_s[None, :]))
    dk = dk * tl.exp(ref_s[None, :] - b_s)
    tl.store(dk_off_ptr + base + own_tile, dk * scale, mask=mask_k[None, :])
    # Diagonal block: pairwise factors on j <= i, one key channel at a time.
    causal = offs_s[:, None] >= offs_s[None, :]
    da_diag = tl.load(da_base + own_rows[:, None] * C + own_rows[None, :])
    da_diag = tl.where(causal, da_diag, 0.0)
    for kk in range(K):
        q_c = tl.load(q_ptr + base + own_t * K + kk)
        k_c = tl.load(k_ptr + base + own_t * K + kk)
        b_c = tl.load(b_ptr + base + own_t * K + kk)
        weighted = da_diag * tl.exp(tl.where(causal, b_c[:, None] - b_c[None, :], float("-inf")))
        tl.store(dq_diag_ptr + base + own_t * K + kk, tl.sum(weighted * k_c[None, :], axis=1) * scale)
        tl.store(dk_diag_ptr + base + own_t * K + kk, tl.sum(weighted * q_c[:, None], axis=0) * scale)


def _to_rows(x: torch.Tensor, pad: int) -> torch.Tensor:
    """[B, T, H, D] -> contiguous fp32 [B*H, T + pad, D] (zero padding keeps the state unchanged)."""
    batch, seq_len, heads, dim = x.shape
    rows = x.float().transpose(1, 2).reshape(batch * heads, seq_len, dim)
    return torch.nn.functional.pad(rows, (0, 0, 0, pad)).contiguous()


def _from_rows(x: torch.Tensor, batch: int, heads: int, seq_len: int) -> torch.Tensor:
    """[B*H, T_padded, D] -> [B, T, H, D]."""
    return x[:, :seq_len].reshape(batch, heads, seq_len, x.shape[-1]).transpose(1, 2)


def _block_sizes(key_dim: int, value_dim: int) -> tuple[int, int]:
    # tl.dot needs every dimension >= 16; K is kept whole, V is split into blocks over programs.
    block_k = max(16, triton.next_power_of_2(key_dim))
    block_v = max(16, min(64, triton.next_power_of_2(value_dim)))
    return block_k, block_v


class _ChunkGLAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, initial_state, scale, output_final_state):
        batch, seq_len, heads, key_dim = q.shape
        value_dim = v.shape[-1]
        pad = (-seq_len) % CHUNK_SIZE
        padded = seq_len + pad
        num_chunks = padded // CHUNK_SIZE
        num_bh = batch * heads
        q_rows, k_rows, v_rows = _to_rows(q, pad), _to_rows(k, pad), _to_rows(v, pad)
        b_rows = _to_rows(g, pad).view(num_bh, num_chunks, CHUNK_SIZE, key_dim).cumsum(2)
        b_rows = b_rows.view(num_bh, padded, key_dim).contiguous()
        block_k, block_v = _block_sizes(key_dim, value_dim)
        device = q.device
        scores = torch.zeros(num_bh, num_chunks, CHUNK_SIZE, CHUNK_SIZE, device=device)
        sub_blocks = CHUNK_SIZE // SUB_CHUNK_SIZE
        _intra_scores_kernel[(num_chunks * sub_blocks, num_bh)](
            q_rows, k_rows, b_rows, scores, scale, padded, num_chunks,
            K=key_dim, C=CHUNK_SIZE, SUB=SUB_CHUNK_SIZE, BK=block_k)
        has_h0 = initial_state is not None
        h0 = (initial_state.float().reshape(num_bh, key_dim, value_dim).contiguous() if has_h0
              else torch.empty(1, device=device))
        o_rows = torch.empty(num_bh, padded, value_dim, device=device)
        final_state = torch.empty(num_bh, key_dim, value_dim, device=device)
        states = torch.empty(num_bh, num_chunks, key_dim, value_dim, device=device)
        _forward_kernel[(triton.cdiv(value_dim, block_v), num_bh)](
            q_rows, k_rows, v_rows, b_rows, scores, h0, o_rows, final_state, states, scale, padded,
            num_chunks, K=key_dim, V=value_dim, C=CHUNK_SIZE, BK=block_k, BV=block_v, HAS_H0=has_h0,
            STORE_FINAL=output_final_state)
        ctx.save_for_backward(q_rows, k_rows, v_rows, b_rows, scores, states, final_state)
        ctx.meta = (batch, seq_len, heads, key_dim, value_dim, scale, has_h0, output_final_state,
                    q.dtype, k.dtype, v.dtype, g.dtype,
                    initial_state.dtype if has_h0 else None)
        o = _from_rows(o_rows, batch, heads, seq_len).to(v.dtype)
        final = final_state.view(batch, heads, key_dim, value_dim) if output_final_state else None
        if final is None:
            ctx.mark_non_differentiable(final_state)
            return o, final_state
        return o, final

    @staticmethod
    def backward(ctx, d_o, d_final):
        q_rows, k_rows, v_rows, b_rows, scores, states, final_state = ctx.saved_tensors
        (batch, seq_len, heads, key_dim, value_dim, scale, has_h0, output_final_state,
         q_dtype, k_dtype, v_dtype, g_dtype, h0_dtype) = ctx.meta
        num_bh, padded, _ = q_rows.shape
        num_chunks = padded // CHUNK_SIZE
        pad = padded - seq_len
        block_k, block_v = _block_sizes(key_dim, value_dim)
        value_blocks = triton.cdiv(value_dim, block_v)
        device = q_rows.device
        do_rows = _to_rows(d_o, pad)
        has_dht = output_final_state and d_final is not None
        dht = (d_final.float().reshape(num_bh, key_dim, value_dim).contiguous() if has_dht
               else torch.empty(1, device=device))
        dq_parts = torch.empty(value_blocks, num_bh, padded, key_dim, device=device)
        dk_parts = torch.empty_like(dq_parts)
        dv_rows = torch.empty(num_bh, padded, value_dim, device=device)
        da_parts = torch.empty(value_blocks, num_bh, num_chunks, CHUNK_SIZE, CHUNK_SIZE, device=device)
        dh0 = torch.empty(num_bh, key_dim, value_dim, device=device)
        _backward_inter_kernel[(value_blocks, num_bh)](
            q_rows, k_rows, v_rows, b_rows, scores, states, do_rows, dht, dq_parts, dk_parts, dv_rows,
            da_parts, dh0, scale, padded, num_chunks, num_bh, K=key_dim, V=value_dim, C=CHUNK_SIZE,
            BK=block_k, BV=block_v, HAS_DHT=has_dht)
        d_scores = da_parts.sum(0).contiguous()
        dq_off, dk_off = torch.empty_like(q_rows), torch.empty_like(k_rows)
        dq_diag, dk_diag = torch.empty_like(q_rows), torch.empty_like(k_rows)
        _intra_grads_kernel[(num_chunks * (CHUNK_SIZE // SUB_CHUNK_SIZE), num_bh)](
            q_rows, k_rows, b_rows, d_scores, dq_off, dk_off, dq_diag, dk_diag, scale, padded, num_chunks,
            K=key_dim, C=CHUNK_SIZE, SUB=SUB_CHUNK_SIZE, BK=block_k)
        dq_rows = dq_parts.sum(0) + dq_off + dq_diag
        dk_rows = dk_parts.sum(0) + dk_off + dk_diag
        # Gate-gradient identity: d(cumulative gate)_t = q_t dq_t - k_t dk_t (+ S_T dS_T at t = T-1).
        d_cumulative = (q_rows * dq_rows - k_rows * dk_rows)[:, :seq_len]
        if has_dht and seq_len > 0:
            d_cumulative[:, -1] += (final_state * dht).sum(-1)
        dg_rows = d_cumulative.flip(1).cumsum(1).flip(1)
        dq = _from_rows(dq_rows, batch, heads, seq_len).to(q_dtype)
        dk = _from_rows(dk_rows, batch, heads, seq_len).to(k_dtype)
        dv = _from_rows(dv_rows, batch, heads, seq_len).to(v_dtype)
        dg = _from_rows(dg_rows, batch, heads, seq_len).to(g_dtype)
        d_initial = dh0.view(batch, heads, key_dim, value_dim).to(h0_dtype) if has_h0 else None
        return dq, dk, dv, dg, d_initial, None, None


def chunk_gla_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunkwise GLA with Triton kernels: (o [B, T, H, V], final state [B, H, K, V] fp32 or None)."""
    check_gla_shapes(q, k, v, g, initial_state)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    o, final_state = _ChunkGLAFunction.apply(q, k, v, g, initial_state, scale, output_final_state)
    return o, (final_state if output_final_state else None)
