"""Token dispatchers: move routed token-slots from the attention layout to the expert layout and back.

MoE parallel folding: on entry each rank holds its own tokens [N, H] (the MoE layer has already
split TP-replicated tokens, so no two ranks of a pipeline stage hold the same token) and routes
them. The experts live on the expert grid: expert e on EP rank e // (E / ep), each expert's
FFN width split over ETP. Both grids cover the same ranks, so any (tp, cp, dp) x (etp, ep, edp)
folding works; only the ep, etp and etp_ep groups are used here.

Interface (the MoE layer runs the experts in between; docs/moe.md, "Dispatch and combine"):

    rows, meta = dispatcher.dispatch(x, routing, block_rows)   # rows: this rank's expert inputs,
    y = experts(rows, meta.rows_per_expert)                    #   expert-major
    out = dispatcher.combine(y, meta)                          # [N, H]: sum_j weight_j * y of slot j

`launch(...)` is `dispatch` split at the token exchange: it returns a `PendingDispatch` as soon
as the exchange is started, so the caller can compute something else (the shared experts) before
`wait()` hands over (rows, meta).

AllToAllDispatcher:
  1. permute the active slots to expert-major order (optionally padded to the capacity per expert);
  2. exchange per-expert counts over EP; start the variable-size all-to-all of the rows over EP;
  3. with etp > 1: all-gather counts (while the rows travel) and then rows over ETP (uneven);
  4. sort the received rows expert-major (only when they come from more than one rank);
  combine: unsort, reduce-scatter over ETP, all-to-all back over EP, unpermute and
     out[t] = sum over t's active slots of weight * expert output.

AllGatherDispatcher: all-gather the routing over the etp x ep group, plan the slots of this rank's
local experts, then all-gather the tokens (started before the plan is needed); combine sums the
weighted expert outputs into the gathered token buffer and reduce-scatters it over etp x ep
(summing the experts and ETP partials, returning each rank its tokens). Needs the same token count
on every rank of the group.

Zero slots for an expert, a rank, or everything work in both. Bytes go to the groups' CommStats, counted
exactly as the blocking collectives of parallel_state count them.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from moe.context import MoEContext
from moe.router import Routing
from parallel_state.collectives import (
    all_gather_async,
    all_to_all,
    count,
    gather_from_sequence_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    resolve_group,
)
from parallel_state.groups import AxisGroup
from parallel_state.uneven_collectives import exchange_counts, gather_counts, gather_v, reduce_scatter_v


def _resolve(group: AxisGroup) -> AxisGroup:
    return resolve_group(group)


# ---- local permutation: slots <-> expert-major rows ------------------------------------------------


@dataclass
class Permutation:
    """Where each active slot sits in the expert-major buffer."""

    token: torch.Tensor  # [A] token index of each active slot (expert-major order)
    slot: torch.Tensor  # [A] flat slot index n * k + j (for its weight)
    dest: torch.Tensor | None  # [A] row of the slot in the buffer; None: row i holds slot i (no padding)
    rows_per_expert: list[int]  # [E] rows of each expert's block (the capacity when padded)

    @property
    def num_rows(self) -> int:
        return sum(self.rows_per_expert)


def permute_plan(expert: torch.Tensor, active: torch.Tensor, num_experts: int,
                 block_rows: int | None = None) -> Permutation:
    """Expert-major order of the active slots, token order (then choice order) within an expert.

    block_rows: pad every expert's block to exactly this many rows (pad-to-capacity); the caller
    guarantees no expert has more active slots.
    """
    k = expert.shape[1]
    # Inactive slots get the key E and sort after every expert: one stable sort orders the active
    # slots, and the counts of the keys say how many there are (one host sync).
    key = torch.where(active.reshape(-1), expert.reshape(-1), num_experts)
    order = torch.sort(key, stable=True).indices
    counts = torch.bincount(key, minlength=num_experts + 1)[:num_experts]
    rows = counts.tolist()
    slot = order[:sum(rows)]
    if block_rows is None:
        return Permutation(token=slot // k, slot=slot, dest=None, rows_per_expert=rows)
    if max(rows, default=0) > block_rows:
        raise ValueError(f"an expert has {max(rows)} slots, more than the padded block of {block_rows}")
    experts_of_slot = key[slot]
    starts = torch.cumsum(counts, 0) - counts
    dest = experts_of_slot * block_rows + torch.arange(slot.numel(), device=slot.device) - starts[experts_of_slot]
    return Permutation(token=slot // k, slot=slot, dest=dest, rows_per_expert=[block_rows] * num_experts)


def permute_tokens(x: torch.Tensor, plan: Permutation) -> torch.Tensor:
    """[num_rows, H]: the token of each slot at its row (zeros in padding rows)."""
    rows = x.index_select(0, plan.token)
    if plan.dest is None:
        return rows
    return x.new_zeros((plan.num_rows, x.shape[1])).index_copy(0, plan.dest, rows)


class _WeightedSum(torch.autograd.Function):
    """out[token[i]] += w[i] * rows[i] for every active slot i, accumulated in fp32 at least.

    The gradients autograd would give `index_add(rows * w)`, with fewer [A, H] temporaries: the
    gathered output gradient is scaled in place into the row gradient, and the weight gradient is
    a row-wise dot product instead of a product then a sum.
    """

    @staticmethod
    def forward(ctx, rows, w, token, num_tokens):
        dtype = torch.promote_types(rows.dtype, torch.float32)
        ctx.save_for_backward(rows, w, token)
        weighted = rows.to(dtype) * w.to(dtype).unsqueeze(-1)
        return rows.new_zeros((num_tokens, rows.shape[1]), dtype=dtype).index_add_(0, token, weighted)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        rows, w, token = ctx.saved_tensors
        grad = grad_out.index_select(0, token)  # [A, H]: each slot's share of its token's gradient
        grad_w = torch.linalg.vecdot(grad, rows.to(grad.dtype)).to(w.dtype) if ctx.needs_input_grad[1] else None
        grad_rows = grad.mul_(w.to(grad.dtype).unsqueeze(-1)).to(rows.dtype) if ctx.needs_input_grad[0] else None
        return grad_rows, grad_w, None, None


def unpermute_combine(y: torch.Tensor, plan: Permutation, weight: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """out [N, H] (fp32 at least) = sum over each token's active slots of weight * its row of y."""
    rows = y if plan.dest is None else y.index_select(0, plan.dest)
    return _WeightedSum.apply(rows, weight.reshape(-1).index_select(0, plan.slot), plan.token, num_tokens)


def expert_major(counts: torch.Tensor) -> torch.Tensor | None:
    """Rows arrive as counts [S, E_local] blocks (source-major); the permutation to expert-major
    order (stable within an expert), or None when they already are (a single source)."""
    sources, num_local = counts.shape
    if sources == 1:
        return None
    local_expert = torch.arange(num_local, device=counts.device).repeat(sources)
    of_row = torch.repeat_interleave(local_expert, counts.reshape(-1))
    return torch.sort(of_row, stable=True).indices


def _blocks(values: list[int], size: int) -> list[list[int]]:
    """values cut into consecutive blocks of `size`."""
    return [values[i:i + size] for i in range(0, len(values), size)]


def _inverse(perm: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return inv


class _PermuteRows(torch.autograd.Function):
    """x[perm] for a permutation of the rows; backward gathers with the inverse permutation
    instead of scattering into zeros (index_select's backward), the same values."""

    @staticmethod
    def forward(ctx, x, perm, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(0, perm)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


# ---- collectives started without waiting ---------------------------------------------------------


class _AllToAllStart(torch.autograd.Function):
    """Forward: start the uneven all-to-all of x along dim 0 (its handle goes to `holder`); the
    output is valid after handle.wait(). Backward: the blocking reverse all-to-all. Bytes as
    parallel_state.collectives.all_to_all counts them."""

    @staticmethod
    def forward(ctx, x, comm, output_split_sizes, input_split_sizes, holder):
        ctx.comm = comm
        ctx.output_split_sizes, ctx.input_split_sizes = output_split_sizes, input_split_sizes
        x = x.contiguous()
        out = x.new_empty((sum(output_split_sizes), *x.shape[1:]))
        sent_rows = sum(input_split_sizes) - input_split_sizes[comm.rank]
        count(comm, "all_to_all", sent_rows * x.shape[1:].numel() * x.element_size())
        holder.append(dist.all_to_all_single(out, x, output_split_sizes=output_split_sizes,
                                             input_split_sizes=input_split_sizes, group=comm.group,
                                             async_op=True))
        return out

    @staticmethod
    def backward(ctx, grad):
        back = all_to_all(grad, ctx.comm, output_split_sizes=ctx.input_split_sizes,
                          input_split_sizes=ctx.output_split_sizes)
        return back, None, None, None, None


class _AllGatherStart(torch.autograd.Function):
    """Forward: start the all-gather of x along dim 0 (handle to `holder`). Backward: the blocking
    reduce-scatter, as gather_from_sequence_parallel_region(dim=0) does."""

    @staticmethod
    def forward(ctx, x, comm, holder):
        ctx.comm = comm
        out, handle = all_gather_async(x, comm)
        holder.append(handle)
        return out

    @staticmethod
    def backward(ctx, grad):
        return reduce_scatter_to_sequence_parallel_region(grad, ctx.comm, dim=0), None, None


class _Done:
    """The handle of an exchange that needed no communication."""

    def wait(self) -> bool:
        return True


def start_all_to_all(x: torch.Tensor, comm: AxisGroup, output_split_sizes: list[int],
                     input_split_sizes: list[int]):
    """(out, handle): an uneven all-to-all along dim 0 in flight; differentiable."""
    if comm.size == 1:
        return x, _Done()
    holder: list = []
    out = _AllToAllStart.apply(x, comm, output_split_sizes, input_split_sizes, holder)
    return out, holder[0]


def start_all_gather(x: torch.Tensor, comm: AxisGroup):
    """(out, handle): an all-gather along dim 0 in flight; differentiable (backward reduce-scatters)."""
    if comm.size == 1:
        return x, _Done()
    holder: list = []
    out = _AllGatherStart.apply(x, comm, holder)
    return out, holder[0]


# ---- dispatchers ---------------------------------------------------------------------------------


@dataclass
class DispatchMeta:
    """What combine needs to reverse a dispatch (common part)."""

    rows_per_expert: list[int]  # rows of each local expert in the dispatched rows, in order
    plan: Permutation  # slots -> rows of the (send) buffer
    weight: torch.Tensor  # [N', k] combine weights of the slots the plan indexes
    num_tokens: int  # N': rows of the combined buffer
    dtype: torch.dtype  # the tokens' dtype (combine accumulates in fp32 at least)


@dataclass
class AllToAllMeta(DispatchMeta):
    """Plus the exchange to undo: split sizes over EP and ETP and the expert-major sort."""

    send_splits: list[int]  # rows sent to each EP rank
    recv_splits: list[int]  # rows received from each EP rank
    etp_sizes: list[int] | None  # rows held by each ETP rank before the ETP gather (None: etp = 1)
    expert_order: tuple[torch.Tensor, torch.Tensor] | None  # received rows -> expert-major, and back


class PendingDispatch:
    """A dispatch whose token exchange may still be in flight; `wait()` -> (rows, meta)."""

    def __init__(self, finish: Callable[[], tuple[torch.Tensor, DispatchMeta]]):
        self._finish = finish

    def wait(self) -> tuple[torch.Tensor, DispatchMeta]:
        return self._finish()


class TokenDispatcher:
    """Moves each rank's routed token-slots to the ranks of their experts (`dispatch` / `launch`)
    and the experts' outputs back, weighted and summed per token (`combine`)."""

    def launch(self, x: torch.Tensor, routing: Routing, block_rows: int | None = None) -> PendingDispatch:
        raise NotImplementedError

    def combine(self, y: torch.Tensor, meta: DispatchMeta) -> torch.Tensor:
        raise NotImplementedError

    def dispatch(self, x: torch.Tensor, routing: Routing,
                 block_rows: int | None = None) -> tuple[torch.Tensor, DispatchMeta]:
        """(rows [R, H] this rank's local experts process, expert-major, meta for combine).

        block_rows: pad each expert's block of this rank's slots to this many rows (capacity).
        """
        return self.launch(x, routing, block_rows).wait()


class AllToAllDispatcher(TokenDispatcher):
    """Variable-size all-to-all over EP (+ uneven all-gather over ETP); see the module docstring."""

    def __init__(self, num_experts: int, ctx: MoEContext):
        self.num_experts, self.ctx = num_experts, ctx
        self.ep, self.etp = _resolve(ctx.ep), _resolve(ctx.etp)
        self.num_local = num_experts // self.ep.size

    def launch(self, x: torch.Tensor, routing: Routing, block_rows: int | None = None) -> PendingDispatch:
        plan = permute_plan(routing.expert, routing.active, self.num_experts, block_rows)
        rows = permute_tokens(x, plan)
        send = _blocks(plan.rows_per_expert, self.num_local)  # [EP rank, local expert]
        recv, counts = self._exchange_counts(send, x.device)
        send_splits, recv_splits = [sum(r) for r in send], [sum(r) for r in recv]
        rows, exchange = start_all_to_all(rows, self.ep, recv_splits, send_splits)
        etp_sizes, sources = None, recv  # sources: rows per (source rank, local expert), as received
        if self.etp.size > 1:  # the counts travel while the rows do
            every = gather_counts(counts, self.etp)  # [etp, ep source, local expert]
            blocks = every.tolist()
            etp_sizes = [sum(map(sum, block)) for block in blocks]
            sources = [row for block in blocks for row in block]
            counts = every.reshape(-1, self.num_local)
        rows_per_expert = [sum(column) for column in zip(*sources)]
        order = expert_major(counts)
        order = None if order is None else (order, _inverse(order))

        def finish() -> tuple[torch.Tensor, AllToAllMeta]:
            exchange.wait()
            received = rows if etp_sizes is None else gather_v(rows, self.etp, etp_sizes)
            meta = AllToAllMeta(rows_per_expert=rows_per_expert, plan=plan, weight=routing.weight,
                                num_tokens=x.shape[0], dtype=x.dtype, send_splits=send_splits,
                                recv_splits=recv_splits, etp_sizes=etp_sizes, expert_order=order)
            return (received if order is None else _PermuteRows.apply(received, *order)), meta

        return PendingDispatch(finish)

    def _exchange_counts(self, send: list[list[int]], device: torch.device) -> tuple[list[list[int]], torch.Tensor]:
        """Rows each EP rank sends this one per local expert, as a list and as a tensor [ep, E_local]."""
        counts = torch.tensor(send, dtype=torch.int64, device=device)
        if self.ep.size == 1:  # nothing to exchange: skip the host sync
            return send, counts
        recv = exchange_counts(counts, self.ep)
        return recv.tolist(), recv

    def combine(self, y: torch.Tensor, meta: AllToAllMeta) -> torch.Tensor:
        if meta.expert_order is not None:
            to_expert_major, back = meta.expert_order
            y = _PermuteRows.apply(y, back, to_expert_major)
        if meta.etp_sizes is not None:
            y = reduce_scatter_v(y, self.etp, meta.etp_sizes)
        y = all_to_all(y, self.ep, output_split_sizes=meta.send_splits, input_split_sizes=meta.recv_splits)
        return unpermute_combine(y, meta.plan, meta.weight, meta.num_tokens).to(meta.dtype)


class AllGatherDispatcher(TokenDispatcher):
    """All-gather over etp x ep, local experts only, reduce-scatter back; see the module docstring."""

    def __init__(self, num_experts: int, ctx: MoEContext):
        self.num_experts, self.ctx = num_experts, ctx
        self.group = _resolve(ctx.etp_ep)
        ep = _resolve(ctx.ep)
        self.num_local = num_experts // ep.size
        self.first = ep.rank * self.num_local

    def _gather_plain(self, t: torch.Tensor) -> torch.Tensor:
        return gather_counts(t, self.group).reshape(-1, *t.shape[1:])

    def launch(self, x: torch.Tensor, routing: Routing, block_rows: int | None = None) -> PendingDispatch:
        g = self.group
        # The routing first (small): the plan of the local experts' slots is made while x travels.
        weight_all = gather_from_sequence_parallel_region(routing.weight, g, dim=0)
        expert_all = self._gather_plain(routing.expert.contiguous())
        active_all = self._gather_plain(routing.active.to(torch.uint8)).bool()
        x_all, exchange = start_all_gather(x, g)
        local = active_all & (expert_all >= self.first) & (expert_all < self.first + self.num_local)
        plan = permute_plan((expert_all - self.first).clamp(0, self.num_local - 1), local, self.num_local,
                            None if block_rows is None else block_rows * g.size)

        def finish() -> tuple[torch.Tensor, DispatchMeta]:
            exchange.wait()
            meta = DispatchMeta(rows_per_expert=plan.rows_per_expert, plan=plan, weight=weight_all,
                                num_tokens=x_all.shape[0], dtype=x.dtype)
            return permute_tokens(x_all, plan), meta

        return PendingDispatch(finish)

    def combine(self, y: torch.Tensor, meta: DispatchMeta) -> torch.Tensor:
        out = unpermute_combine(y, meta.plan, meta.weight, meta.num_tokens).to(meta.dtype)
        return reduce_scatter_to_sequence_parallel_region(out, self.group, dim=0)


def make_dispatcher(kind: str, num_experts: int, ctx: MoEContext) -> TokenDispatcher:
    """The dispatcher named by MoEConfig.dispatcher."""
    if kind == "alltoall":
        return AllToAllDispatcher(num_experts, ctx)
    if kind == "allgather":
        return AllGatherDispatcher(num_experts, ctx)
    raise ValueError(f"unknown dispatcher {kind!r}; use alltoall or allgather")
