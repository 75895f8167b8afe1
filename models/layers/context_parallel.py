"""Context-parallel causal attention: ring attention over the zigzag split, and Ulysses all-to-all.

Both take this CP rank's slice of the sequence, q [B, Hq, T_local, D], k [B, Hkv, T_local, D] and
v [B, Hkv, T_local, Dv] (Hq % Hkv == 0; query head h reads K/V head h // (Hq/Hkv); Dv may differ
from D, as in multi-head latent attention), and return this rank's output [B, Hq, T_local, Dv],
equal to full causal attention over the whole sequence restricted to the local tokens.

Ring attention (`ring_attention`): K/V blocks (the Hkv heads, never repeated ones) travel around
the CP ring; each step computes a partial (o, lse) for the block it holds and merges it by
log-sum-exp (`merge_attention_partials`, docs/context_parallel.md). With the zigzag split
(rank r holds chunks r and 2P-1-r of 2P, positions ascending within the rank) the block plan is
(`ring_block_plan`; step i holds the K/V of source rank s = (r - i) mod P):

    i = 0   (s == r): local causal attention over the 2 local chunks (their order is their
            position order, so the ordinary causal mask of the concatenation is right)
    s < r:  key chunk s precedes both query chunks r and 2P-1-r; key chunk 2P-1-s follows both.
            -> all local queries attend to the FIRST half of the block, no mask.
    s > r:  query chunk r precedes both key chunks s and 2P-1-s; query chunk 2P-1-r follows
            both (2P-1-r >= P > s and 2P-1-s < 2P-1-r).
            -> the SECOND half of the queries attends to the whole block, no mask.

So every step after the first does half a block of work on every rank (balanced). With
`zigzag=False` (contiguous split, rank r holds chunk r of P) the plan is: causal at i = 0, full
block for s < r, nothing for s > r (unbalanced; for comparison and benchmarks).

The backward (a custom autograd Function) uses the final lse and output: for each block it
recomputes P = exp(S - lse_final), which is that block's exact share of the softmax, so the block
gradients sum to the full gradients. K/V travel the ring again, and a second ring carries each
block's dK/dV accumulator from rank to rank; after P hops it is home, complete. Every send of the
next block is launched before the current block's compute (overlap). K and V travel as one flat
message of their exact sizes (`pack_kv`), so a narrower V costs nothing extra. Bytes this rank sends
(counted as op "send" on the group's name, e.g. ("send", "cp")): forward (P-1) x K/V block; backward
(P-1) x K/V block + P x dK/dV block (the dK/dV accumulators are in the accumulation dtype:
fp32 for fp32/bf16/fp16 inputs, fp64 for fp64).

Block kernel: "torch" (matmul + logsumexp, accumulated in fp32 or fp64: the reference) or "fused"
(`torch.ops.aten._scaled_dot_product_flash_attention_for_cpu` and its backward, which return and
accept the lse; CPU tensors only; it needs one head width, so a narrower V or Q/K is padded with
zeros for the kernel only, never on the wire). "auto" picks fused for CPU tensors when that op
exists, torch otherwise (`resolve_block_kernel` says which). Dropout is not supported here.

Ulysses (`ulysses_attention`): an all-to-all turns sequence-sharded [B, H, T/P, D] into
head-sharded [B, H/P, T, D]; attention runs over the whole sequence for H/P heads; a second
all-to-all turns it back. The gathered sequence is in rank order, i.e. zigzag chunk order, so the
causal mask comes from the gathered position ids, never from is_causal. K and V (of any widths)
go in one all-to-all, concatenated along the head width.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from models.layers.masks import causal_mask_from_positions
from parallel_state.collectives import (
    all_gather_async,
    all_to_all_scatter_gather,
    resolve_group,
)
from parallel_state.groups import AxisGroup
from parallel_state.ring import RingExchange

KV_TAG, DKV_TAG = 0, 1  # p2p tags: the K/V ring and the dK/dV ring may be in flight together
BLOCK_KERNELS = ("auto", "torch", "fused")


# ---- partial attention on one block and the log-sum-exp merge -----------------------------------


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64; everything else accumulates in fp32."""
    return torch.promote_types(dtype, torch.float32)


def _finite_or_zero(lse: torch.Tensor) -> torch.Tensor:
    # A fully masked row has lse = -inf; subtracting 0 instead keeps exp(-inf - 0) = 0, not NaN.
    return torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)


def merge_attention_partials(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor,
                             block_lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two partial attentions over disjoint key sets: (o, lse) + (o_b, lse_b) -> (o', lse').

    lse' = logaddexp(lse, lse_b); o' = exp(lse - lse') o + exp(lse_b - lse') o_b. out [..., T, D],
    lse [..., T]. A row with lse_b = -inf (fully masked in the block) is unchanged; a row masked
    in both stays (0, -inf) without NaN.
    """
    new_lse = torch.logaddexp(lse, block_lse)
    safe = _finite_or_zero(new_lse)
    old_weight = torch.exp(lse - safe).unsqueeze(-1)
    block_weight = torch.exp(block_lse - safe).unsqueeze(-1)
    return old_weight * out + block_weight * block_out.to(out.dtype), new_lse


def _causal_block_mask(tq: int, tk: int, device: torch.device) -> torch.Tensor:
    """True where masked: key j > query i (top-left aligned square blocks, as the ring uses)."""
    return torch.ones(tq, tk, dtype=torch.bool, device=device).triu(1)


def torch_block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                          causal: bool = False, mask: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference partial attention: (o, lse) of q [B, Hq, Tq, D] over k [B, Hkv, Tk, D], v [B, Hkv, Tk, Dv].

    GQA without repeating K/V (query heads are grouped onto their K/V head). `causal` masks keys
    after the query (Tq == Tk, aligned); `mask` (bool, broadcastable to [B, 1, Tq, Tk], True =
    attend) is an extra restriction. Accumulates in fp32 (fp64 for fp64); returns o and lse in
    that dtype. Fully masked rows give o = 0, lse = -inf. Differentiable by autograd as well.
    """
    batch, hq, tq, dim = q.shape
    hkv = k.shape[1]
    acc = accumulation_dtype(q.dtype)
    qg = q.to(acc).reshape(batch, hkv, hq // hkv, tq, dim)
    scores = torch.matmul(qg, k.to(acc).unsqueeze(2).transpose(-1, -2)) * scale  # [B, Hkv, g, Tq, Tk]
    scores = _apply_masks(scores, causal, mask)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - _finite_or_zero(lse).unsqueeze(-1))
    out = torch.matmul(probs, v.to(acc).unsqueeze(2))
    return out.reshape(batch, hq, tq, v.shape[-1]), lse.reshape(batch, hq, tq)


def _apply_masks(scores: torch.Tensor, causal: bool, mask: torch.Tensor | None) -> torch.Tensor:
    tq, tk = scores.shape[-2:]
    if causal:
        scores = scores.masked_fill(_causal_block_mask(tq, tk, scores.device), float("-inf"))
    if mask is not None:
        keep = mask.reshape(mask.shape[0], 1, 1, tq, tk) if mask.dim() == 4 else mask
        scores = scores.masked_fill(~keep, float("-inf"))
    return scores


def torch_block_attention_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                   out: torch.Tensor, lse: torch.Tensor, scale: float, causal: bool
                                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of one block, given the FINAL output and lse of the rows (flash-attention backward).

    With P = exp(S - lse_final) the block's share of the softmax: dV = P^T dO, dS = P (dO V^T -
    rowsum(dO o O)), dQ = scale dS K, dK = scale dS^T Q. dk, dv are summed over each K/V head's
    query group. Results in the accumulation dtype.
    """
    batch, hq, tq, dim = q.shape
    hkv = k.shape[1]
    groups = hq // hkv
    acc = accumulation_dtype(q.dtype)
    value_shape5 = (batch, hkv, groups, tq, v.shape[-1])
    qg, dog = q.to(acc).reshape(batch, hkv, groups, tq, dim), dout.to(acc).reshape(value_shape5)
    kk, vv = k.to(acc).unsqueeze(2), v.to(acc).unsqueeze(2)
    delta = (dog * out.to(acc).reshape(value_shape5)).sum(-1, keepdim=True)
    scores = _apply_masks(torch.matmul(qg, kk.transpose(-1, -2)) * scale, causal, None)
    probs = torch.exp(scores - _finite_or_zero(lse.to(acc)).reshape(batch, hkv, groups, tq, 1))
    dv = torch.matmul(probs.transpose(-1, -2), dog).sum(2)
    dscores = probs * (torch.matmul(dog, vv.transpose(-1, -2)) - delta)
    dq = torch.matmul(dscores, kk).reshape(batch, hq, tq, dim) * scale
    dk = torch.matmul(dscores.transpose(-1, -2), qg).sum(2) * scale
    return dq, dk, dv


def fused_block_available() -> bool:
    """Whether this torch has the CPU flash-attention op that returns (and takes back) the lse."""
    return hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu") and hasattr(
        torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward")


def pad_head_width(x: torch.Tensor, width: int) -> torch.Tensor:
    """x [..., D] zero-padded to [..., width] (x itself when D == width)."""
    return x if x.shape[-1] == width else F.pad(x, (0, width - x.shape[-1]))


def fused_block_attention(q, k, v, scale, causal=False):
    """(o, lse) of one block with the CPU flash-attention op (GQA handled by the op).

    The op takes one head width: the narrower of Q/K and V is zero-padded for it (zero channels
    change neither the scores, whose scale is explicit, nor the kept output columns).
    """
    width = max(q.shape[-1], v.shape[-1])
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        pad_head_width(q, width), pad_head_width(k, width), pad_head_width(v, width), 0.0, causal, scale=scale)
    return out[..., :v.shape[-1]], lse


def fused_block_attention_backward(dout, q, k, v, out, lse, scale, causal):
    """(dq, dk, dv) of one block with the CPU flash-attention backward fed the FINAL out and lse
    (padded to one head width as in `fused_block_attention`)."""
    width = max(q.shape[-1], v.shape[-1])
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        *(pad_head_width(t, width).contiguous() for t in (dout, q, k, v, out)),
        lse.contiguous(), 0.0, causal, scale=scale)
    return dq[..., :q.shape[-1]], dk[..., :k.shape[-1]], dv[..., :v.shape[-1]]


@dataclass(frozen=True)
class BlockKernel:
    """A partial-attention kernel pair: forward -> (o, lse), backward(final out, final lse) -> grads."""

    name: str
    forward: Callable
    backward: Callable


TORCH_KERNEL = BlockKernel("torch", torch_block_attention, torch_block_attention_backward)
FUSED_KERNEL = BlockKernel("fused", fused_block_attention, fused_block_attention_backward)


def resolve_block_kernel(kernel: str, device: torch.device) -> BlockKernel:
    """"torch", "fused" (CPU only; an error where unavailable) or "auto" (fused on CPU when present)."""
    if kernel not in BLOCK_KERNELS:
        raise ValueError(f"unknown ring attention block kernel {kernel!r}; choose one of {BLOCK_KERNELS}")
    fused_ok = device.type == "cpu" and fused_block_available()
    if kernel == "fused" and not fused_ok:
        raise ValueError(f"ring attention kernel 'fused' needs CPU tensors and torch's "
                         f"_scaled_dot_product_flash_attention_for_cpu op (device {device}); use 'torch'")
    if kernel == "fused" or (kernel == "auto" and fused_ok):
        return FUSED_KERNEL
    return TORCH_KERNEL


# ---- ring attention -----------------------------------------------------------------------------


def ring_block_plan(step: int, rank: int, cp_size: int, local_len: int, zigzag: bool = True
                    ) -> list[tuple[slice, slice, bool]]:
    """What rank `rank` computes at ring step `step`: [(query slice, key slice, causal)] (pure).

    Slices index the local sequence (length local_len). See the module docstring for the rule.
    """
    source = (rank - step) % cp_size
    whole = slice(0, local_len)
    if step == 0:
        return [(whole, whole, True)]
    if not zigzag:
        return [(whole, whole, False)] if source < rank else []
    half = local_len // 2
    if source < rank:
        return [(whole, slice(0, half), False)]
    return [(slice(half, local_len), whole, False)]


def pack_kv(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """K and V as one flat message of exactly their elements (their widths may differ)."""
    return torch.cat([k.reshape(-1), v.reshape(-1)])


def unpack_kv(flat: torch.Tensor, k_shape: torch.Size, v_shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
    """Contiguous views of K and V in a `pack_kv` message (or an accumulator laid out like one)."""
    split = math.prod(k_shape)
    return flat[:split].view(k_shape), flat[split:].view(v_shape)


def _ring_forward(q, k, v, comm: AxisGroup, zigzag: bool, scale: float, kernel: BlockKernel):
    batch, hq, tlocal, _ = q.shape
    acc = accumulation_dtype(q.dtype)
    out = torch.zeros(batch, hq, tlocal, v.shape[-1], dtype=acc, device=q.device)
    lse = torch.full((batch, hq, tlocal), float("-inf"), dtype=acc, device=q.device)
    ring = RingExchange(comm)
    kv = pack_kv(k, v)  # one message per step
    for step in range(comm.size):
        incoming = ring.exchange(kv, KV_TAG) if step < comm.size - 1 else None
        block_k, block_v = unpack_kv(kv, k.shape, v.shape)
        for rows, cols, causal in ring_block_plan(step, comm.rank, comm.size, tlocal, zigzag):
            block_out, block_lse = kernel.forward(q[:, :, rows], block_k[:, :, cols], block_v[:, :, cols],
                                                  scale, causal)
            out[:, :, rows], lse[:, :, rows] = merge_attention_partials(
                out[:, :, rows], lse[:, :, rows], block_out, block_lse.to(acc))
        if incoming is not None:
            kv = incoming.wait()
    return out, lse


def _ring_backward(dout, q, k, v, out, lse, comm: AxisGroup, zigzag, scale, kernel: BlockKernel):
    tlocal = q.shape[2]
    acc = accumulation_dtype(q.dtype)
    ring = RingExchange(comm)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    kv = pack_kv(k, v)
    dkv_incoming = None
    for step in range(comm.size):
        incoming = ring.exchange(kv, KV_TAG) if step < comm.size - 1 else None
        block_k, block_v = unpack_kv(kv, k.shape, v.shape)
        # This step's contribution to the dK/dV of the block held (owned by rank - step).
        dkv = torch.zeros(kv.shape, dtype=acc, device=q.device)
        block_dk, block_dv = unpack_kv(dkv, k.shape, v.shape)
        for rows, cols, causal in ring_block_plan(step, comm.rank, comm.size, tlocal, zigzag):
            dq_b, dk_b, dv_b = kernel.backward(dout[:, :, rows], q[:, :, rows], block_k[:, :, cols],
                                               block_v[:, :, cols], out[:, :, rows], lse[:, :, rows],
                                               scale, causal)
            dq[:, :, rows] += dq_b
            block_dk[:, :, cols] += dk_b
            block_dv[:, :, cols] += dv_b
        if dkv_incoming is not None:  # the same block's accumulator from the ranks before us
            dkv += dkv_incoming.wait()
        dkv_incoming = ring.exchange(dkv, DKV_TAG)  # P hops in all: the last one brings it home
        if incoming is not None:
            kv = incoming.wait()
    dk, dv = unpack_kv(dkv_incoming.wait(), k.shape, v.shape)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, comm, zigzag, scale, kernel):
        out, lse = _ring_forward(q, k, v, comm, zigzag, scale, kernel)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.comm, ctx.zigzag, ctx.scale, ctx.kernel = comm, zigzag, scale, kernel
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _ring_backward(dout, q, k, v, out, lse, ctx.comm, ctx.zigzag,
                                    ctx.scale, ctx.kernel)
        return dq, dk, dv, None, None, None, None


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or k.shape[:3] != v.shape[:3]:
        raise ValueError(f"expected q [B, Hq, T, D], k [B, Hkv, T, D] and v [B, Hkv, T, Dv]; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if (q.shape[0], q.shape[2], q.shape[3]) != (k.shape[0], k.shape[2], k.shape[3]):
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch, length or head dim")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"{q.shape[1]} query heads cannot share {k.shape[1]} K/V heads evenly")


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cp,
                   zigzag: bool = True, scale: float | None = None, kernel: str = "auto",
                   return_lse: bool = False):
    """Causal attention over a sequence split across the CP group `cp` (ring, see module docstring).

    q [B, Hq, T_local, D], k [B, Hkv, T_local, D], v [B, Hkv, T_local, Dv]: this rank's tokens, in
    the zigzag layout (chunks r and 2P-1-r, T_local even) or, with zigzag=False, the contiguous
    chunk r. `cp`: an AxisGroup (ps.cp). scale defaults to D^-1/2. Returns
    out [B, Hq, T_local, Dv] (q's dtype), and with return_lse also lse [B, Hq, T_local] (the
    accumulation dtype, not differentiable). Differentiable in q, k, v.
    """
    _check_qkv(q, k, v)
    comm = resolve_group(cp)
    if zigzag and q.shape[2] % 2 != 0:
        raise ValueError(f"zigzag ring attention needs an even local length (two chunks); got {q.shape[2]}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    block_kernel = resolve_block_kernel(kernel, q.device)
    out, lse = _RingAttention.apply(q, k, v, comm, zigzag, scale, block_kernel)
    return (out, lse) if return_lse else out


# ---- Ulysses ------------------------------------------------------------------------------------


def ulysses_kv_replication(num_heads: int, num_kv_heads: int, cp_size: int) -> int:
    """How many times each K/V head is repeated before the all-to-all (1 = split as is) (pure).

    Query heads must split over CP. K/V heads split too when cp divides them; when fewer than cp
    and cp % kv_heads == 0, each is repeated cp/kv_heads times so every rank gets the one its
    query heads read. Counts are this rank's heads (per TP rank when TP is on).
    """
    if num_heads % cp_size != 0:
        raise ValueError(f"Ulysses context parallelism splits the {num_heads} query heads of each TP rank "
                         f"(model.num_heads / parallel.tp) over parallel.cp={cp_size} ranks; make "
                         f"model.num_heads / parallel.tp a multiple of parallel.cp, or use ring attention")
    if num_kv_heads % cp_size == 0:
        return 1
    if cp_size % num_kv_heads == 0:
        return cp_size // num_kv_heads
    raise ValueError(f"Ulysses context parallelism: the {num_kv_heads} K/V heads of each TP rank "
                     f"(model.num_kv_heads / parallel.tp) and parallel.cp={cp_size}: one must divide the "
                     f"other (split or replicate the K/V heads); change model.num_kv_heads or parallel.cp, "
                     f"or use ring attention")


def equal_width_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                     **sdpa_kwargs) -> torch.Tensor:
    """F.scaled_dot_product_attention for any value width Dv: [B, Hq, Tq, Dv] out.

    SDPA's fused kernels need one head width and otherwise fall back to the math path, which
    materialises the T x T probabilities (3x slower on CPU at T = 2048); so the narrower of Q/K and
    V is zero-padded to one width and the output cut back. The scale stays that of the true D.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    width = max(q.shape[-1], v.shape[-1])
    out = F.scaled_dot_product_attention(pad_head_width(q, width), pad_head_width(k, width),
                                         pad_head_width(v, width), scale=scale, **sdpa_kwargs)
    return out[..., :v.shape[-1]]


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor,
                     scale: float | None = None) -> torch.Tensor:
    """Default Ulysses attention: SDPA with a boolean mask (True = attend), GQA without repeating K/V;
    `scale` defaults to D^-1/2."""
    return equal_width_sdpa(q, k, v, scale, attn_mask=keep, enable_gqa=q.shape[1] != k.shape[1])


def gather_positions(position_ids: torch.Tensor, cp) -> torch.Tensor:
    """All ranks' position ids [B, T_local] -> [B, T_local * P] in rank order (not differentiable)."""
    comm = resolve_group(cp)
    gathered, handle = all_gather_async(position_ids.transpose(0, 1), comm)
    handle.wait()
    return gathered.transpose(0, 1)


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cp, position_ids: torch.Tensor,
                      attn_fn: Callable[..., torch.Tensor] = masked_attention,
                      scale: float | None = None) -> torch.Tensor:
    """Causal attention over a sequence split across `cp` by head-scattering all-to-alls (Ulysses).

    q [B, Hq, T_local, D], k [B, Hkv, T_local, D], v [B, Hkv, T_local, Dv], position_ids
    [B or 1, T_local]: this rank's tokens with their ORIGINAL positions (any split, zigzag
    included). attn_fn(q, k, v, keep, scale=scale) gets [B, Hq/P, T, D], [B, Hkv', T, D],
    [B, Hkv', T, Dv] and keep [B, 1, T, T] (True = attend), built from the gathered positions;
    scale None means D^-1/2. Returns [B, Hq, T_local, Dv]. Bytes are counted by the collectives
    under the group's name.
    """
    _check_qkv(q, k, v)
    comm = resolve_group(cp)
    repeats = ulysses_kv_replication(q.shape[1], k.shape[1], comm.size)
    if repeats > 1:
        k, v = k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1)
    if position_ids.shape[-1] != q.shape[2]:
        raise ValueError(f"position_ids {tuple(position_ids.shape)} do not match the local length {q.shape[2]}")
    positions = gather_positions(position_ids.expand(q.shape[0], -1), comm)
    # [B, H, T/P, D] -> [B, H/P, T, D]; K and V go in one all-to-all, side by side in the head width.
    q_heads = all_to_all_scatter_gather(q, comm, scatter_dim=1, gather_dim=2)
    kv_heads = all_to_all_scatter_gather(torch.cat([k, v], dim=-1), comm, scatter_dim=1, gather_dim=2)
    k_heads, v_heads = kv_heads.split([k.shape[-1], v.shape[-1]], dim=-1)
    keep = causal_mask_from_positions(positions, positions)
    out = attn_fn(q_heads, k_heads, v_heads, keep, scale=scale)
    return all_to_all_scatter_gather(out, comm, scatter_dim=2, gather_dim=1)
