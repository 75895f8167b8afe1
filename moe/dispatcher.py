"""Token dispatchers: move routed token-slots from the attention layout to the expert layout and back.

MoE parallel folding: on entry each rank holds its own tokens [N, H] (the MoE layer has already
split TP-replicated tokens, so no two ranks of a pipeline stage hold the same token) and routes
them. The experts live on the expert grid: expert e on EP rank e // (E / ep), each expert's
FFN width split over ETP. Both grids cover the same ranks, so any (tp, cp, dp) x (etp, ep, edp)
folding works; only the ep, etp and etp_ep groups are used here.

AllToAllDispatcher (docs/moe.md, "Dispatch and combine"):
  1. permute the active slots to expert-major order (optionally padded to the capacity per expert);
  2. exchange per-expert counts over EP; variable-size all-to-all of the rows over EP;
  3. with etp > 1: all-gather counts and rows over ETP (uneven);
  4. sort the received rows expert-major, grouped expert compute, unsort;
  5. reverse: reduce-scatter over ETP, all-to-all back over EP, unpermute, and combine:
     out[t] = sum over t's active slots of weight * expert output.

AllGatherDispatcher: all-gather tokens and routing over the etp x ep group; each rank computes
its local experts (its FFN slice) on the slots routed to them and combines into the gathered
token buffer; a reduce-scatter over etp x ep sums the experts and ETP partials and returns each
rank its tokens. Needs the same token count on every rank of the group.

Zero slots for an expert, a rank, or everything work in both. Bytes go to ctx.stats.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from moe.context import MoEContext
from moe.experts import GroupedExperts
from moe.router import Routing
from parallel_state.collectives import (
    ResolvedGroup,
    all_to_all,
    gather_from_sequence_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    resolve_group,
)
from parallel_state.uneven_collectives import exchange_counts, gather_counts, gather_v, reduce_scatter_v


def _resolve(group) -> ResolvedGroup:
    """None (no such axis) is a group of one here, never the default group."""
    return ResolvedGroup(None, 1, 0, "none") if group is None else resolve_group(group)


@dataclass
class Permutation:
    """Where each active slot sits in the expert-major buffer."""

    token: torch.Tensor  # [A] token index of each active slot (expert-major order)
    slot: torch.Tensor  # [A] flat slot index n * k + j (for its weight)
    dest: torch.Tensor  # [A] row of the slot in the buffer
    rows_per_expert: list[int]  # [E] rows of each expert's block (the capacity when padded)

    @property
    def num_rows(self) -> int:
        return sum(self.rows_per_expert)


def permute_plan(expert: torch.Tensor, active: torch.Tensor, num_experts: int,
                 block_rows: int | None = None) -> Permutation:
    """Expert-major order of the active slots, token order within an expert.

    block_rows: pad every expert's block to exactly this many rows (pad-to-capacity); the caller
    guarantees no expert has more active slots.
    """
    k = expert.shape[1]
    slot = torch.nonzero(active.reshape(-1), as_tuple=True)[0]
    experts_of_slot = expert.reshape(-1)[slot]
    order = torch.sort(experts_of_slot, stable=True).indices
    slot, experts_of_slot = slot[order], experts_of_slot[order]
    counts = torch.bincount(experts_of_slot, minlength=num_experts)
    if block_rows is None:
        dest = torch.arange(slot.numel(), device=slot.device)
        rows = counts.tolist()
    else:
        if slot.numel() and int(counts.max()) > block_rows:
            raise ValueError(f"an expert has {int(counts.max())} slots, more than the padded block of {block_rows}")
        starts = torch.cumsum(counts, 0) - counts
        dest = experts_of_slot * block_rows + torch.arange(slot.numel(), device=slot.device) - starts[experts_of_slot]
        rows = [block_rows] * num_experts
    return Permutation(token=slot // k, slot=slot, dest=dest, rows_per_expert=rows)


def permute_tokens(x: torch.Tensor, plan: Permutation) -> torch.Tensor:
    """[num_rows, H]: the token of each slot at its row (zeros in padding rows)."""
    rows = x.index_select(0, plan.token)
    if plan.num_rows == plan.token.numel():
        return rows  # no padding: dest is the identity
    return x.new_zeros((plan.num_rows, x.shape[1])).index_copy(0, plan.dest, rows)


def unpermute_combine(y: torch.Tensor, plan: Permutation, weight: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """out [N, H] (fp32 at least) = sum over each token's active slots of weight * its row of y."""
    dtype = torch.promote_types(y.dtype, torch.float32)
    rows = y.index_select(0, plan.dest).to(dtype)
    weighted = rows * weight.reshape(-1).index_select(0, plan.slot).to(dtype).unsqueeze(-1)
    return y.new_zeros((num_tokens, y.shape[1]), dtype=dtype).index_add(0, plan.token, weighted)


def expert_major(counts: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Rows arrive as counts [S, E_local] blocks (source-major); the permutation to expert-major
    order (stable within an expert) and the rows per local expert."""
    sources, num_local = counts.shape
    local_expert = torch.arange(num_local, device=counts.device).repeat(sources)
    of_row = torch.repeat_interleave(local_expert, counts.reshape(-1))
    perm = torch.sort(of_row, stable=True).indices
    return perm, counts.sum(0).tolist()


def _inverse(perm: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return inv


class AllToAllDispatcher:
    """Variable-size all-to-all over EP (+ uneven all-gather over ETP); see the module docstring."""

    def __init__(self, num_experts: int, ctx: MoEContext):
        self.num_experts, self.ctx = num_experts, ctx
        self.ep, self.etp = _resolve(ctx.ep), _resolve(ctx.etp)
        self.num_local = num_experts // self.ep.size

    def __call__(self, x: torch.Tensor, routing: Routing, experts: GroupedExperts,
                 block_rows: int | None = None) -> torch.Tensor:
        stats = self.ctx.stats
        plan = permute_plan(routing.expert, routing.active, self.num_experts, block_rows)
        rows = permute_tokens(x, plan)
        send = torch.tensor(plan.rows_per_expert, dtype=torch.int64, device=x.device).view(self.ep.size, self.num_local)
        recv = exchange_counts(send, self.ep, stats)  # [ep source, local expert]
        send_splits, recv_splits = send.sum(1).tolist(), recv.sum(1).tolist()
        rows = all_to_all(rows, self.ep, stats, output_split_sizes=recv_splits, input_split_sizes=send_splits)
        counts = recv
        if self.etp.size > 1:
            every = gather_counts(recv, self.etp, stats)  # [etp, ep, local expert]
            etp_sizes = every.sum((1, 2)).tolist()
            rows = gather_v(rows, self.etp, etp_sizes, stats)
            counts = every.reshape(-1, self.num_local)
        perm, rows_per_local = expert_major(counts.to(x.device))
        y = experts(rows.index_select(0, perm), rows_per_local)
        y = y.index_select(0, _inverse(perm))
        if self.etp.size > 1:
            y = reduce_scatter_v(y, self.etp, etp_sizes, stats)
        y = all_to_all(y, self.ep, stats, output_split_sizes=send_splits, input_split_sizes=recv_splits)
        return unpermute_combine(y, plan, routing.weight, x.shape[0]).to(x.dtype)


class AllGatherDispatcher:
    """All-gather over etp x ep, local experts only, reduce-scatter back; see the module docstring."""

    def __init__(self, num_experts: int, ctx: MoEContext):
        self.num_experts, self.ctx = num_experts, ctx
        self.group = _resolve(ctx.etp_ep)
        ep = _resolve(ctx.ep)
        self.num_local = num_experts // ep.size
        self.first = ep.rank * self.num_local

    def _gather_plain(self, t: torch.Tensor) -> torch.Tensor:
        return gather_counts(t, self.group, self.ctx.stats).reshape(-1, *t.shape[1:])

    def __call__(self, x: torch.Tensor, routing: Routing, experts: GroupedExperts,
                 block_rows: int | None = None) -> torch.Tensor:
        stats, g = self.ctx.stats, self.group
        x_all = gather_from_sequence_parallel_region(x, g, stats, dim=0)
        weight_all = gather_from_sequence_parallel_region(routing.weight, g, stats, dim=0)
        expert_all = self._gather_plain(routing.expert.contiguous())
        active_all = self._gather_plain(routing.active.to(torch.uint8)).bool()
        local = active_all & (expert_all >= self.first) & (expert_all < self.first + self.num_local)
        plan = permute_plan((expert_all - self.first).clamp(0, self.num_local - 1), local, self.num_local,
                            None if block_rows is None else block_rows * g.size)
        y = experts(permute_tokens(x_all, plan), plan.rows_per_expert)
        out = unpermute_combine(y, plan, weight_all, x_all.shape[0]).to(x.dtype)
        return reduce_scatter_to_sequence_parallel_region(out, g, stats, dim=0)


def make_dispatcher(kind: str, num_experts: int, ctx: MoEContext):
    """The dispatcher named by MoEConfig.dispatcher."""
    if kind == "alltoall":
        return AllToAllDispatcher(num_experts, ctx)
    if kind == "allgather":
        return AllGatherDispatcher(num_experts, ctx)
    raise ValueError(f"unknown dispatcher {kind!r}; use alltoall or allgather")
