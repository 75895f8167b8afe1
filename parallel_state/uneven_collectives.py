"""Collectives with a different row count per rank (MoE token dispatch), next to the even ones of collectives.py.

- `exchange_counts`: all-to-all of per-expert token counts over EP (int64, not differentiable).
- `gather_counts`: all-gather of counts over ETP.
- `gather_v` / `reduce_scatter_v`: all-gather / reduce-scatter along dim 0 with a different row
  count per rank (the tokens each ETP rank received), adjoint to each other for autograd. Both use
  `all_to_all_single` (uneven all-gather is not available on every backend).

Bytes are counted in CommStats by the convention of parallel_state/comm_stats.py, as the bytes
this rank sends: uneven all-gather = its rows x (n - 1); uneven reduce-scatter = the rows it holds
for other ranks; both equal the ring formulas when the rows are even.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from parallel_state.collectives import count
from parallel_state.groups import AxisGroup

# torch 2.13 renamed the tensor-in/tensor-out all-gather; older builds only have the old name.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _row_bytes(x: torch.Tensor) -> int:
    """Bytes of one dim-0 row (also of a tensor with no rows)."""
    return x.shape[1:].numel() * x.element_size()


def exchange_counts(send: torch.Tensor, comm: AxisGroup) -> torch.Tensor:
    """send [n, m]: row j goes to rank j; returns [n, m] with row j from rank j."""
    if comm.size == 1:
        return send
    send = send.contiguous()
    out = torch.empty_like(send)
    count(comm, "all_to_all", (comm.size - 1) * _row_bytes(send))
    dist.all_to_all_single(out, send, group=comm.group)
    return out


def gather_counts(counts: torch.Tensor, comm: AxisGroup) -> torch.Tensor:
    """counts [...] on each rank -> [n, ...] stacked in group-rank order."""
    if comm.size == 1:
        return counts.unsqueeze(0)
    counts = counts.contiguous()
    out = torch.empty((comm.size * counts.shape[0], *counts.shape[1:]), dtype=counts.dtype, device=counts.device)
    count(comm, "all_gather", (comm.size - 1) * counts.numel() * counts.element_size())
    _all_gather_single(out, counts, group=comm.group)
    return out.view(comm.size, *counts.shape)


def _gather_v(x: torch.Tensor, comm: AxisGroup, sizes: list[int]) -> torch.Tensor:
    x = x.contiguous()
    out = x.new_empty((sum(sizes), *x.shape[1:]))
    count(comm, "all_gather", (comm.size - 1) * x.shape[0] * _row_bytes(x))
    dist.all_to_all_single(out, x.repeat(comm.size, *([1] * (x.dim() - 1))),
                           output_split_sizes=sizes, input_split_sizes=[x.shape[0]] * comm.size,
                           group=comm.group)
    return out


def _reduce_scatter_v(y: torch.Tensor, comm: AxisGroup, sizes: list[int]) -> torch.Tensor:
    y = y.contiguous()
    mine = sizes[comm.rank]
    parts = y.new_empty((comm.size * mine, *y.shape[1:]))
    count(comm, "reduce_scatter", (sum(sizes) - mine) * _row_bytes(y))
    dist.all_to_all_single(parts, y, output_split_sizes=[mine] * comm.size, input_split_sizes=sizes,
                           group=comm.group)
    return parts.view(comm.size, mine, *y.shape[1:]).sum(0)


class _GatherV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, comm, sizes):
        ctx.comm, ctx.sizes = comm, sizes
        return _gather_v(x, comm, sizes)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter_v(grad, ctx.comm, ctx.sizes), None, None


class _ReduceScatterV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, comm, sizes):
        ctx.comm, ctx.sizes = comm, sizes
        return _reduce_scatter_v(y, comm, sizes)

    @staticmethod
    def backward(ctx, grad):
        return _gather_v(grad, ctx.comm, ctx.sizes), None, None


def gather_v(x: torch.Tensor, comm: AxisGroup, sizes: list[int]) -> torch.Tensor:
    """Concatenate every rank's x along dim 0 (rank j has sizes[j] rows); backward reduce-scatters."""
    if comm.size == 1:
        return x
    if x.shape[0] != sizes[comm.rank]:
        raise ValueError(f"gather_v: this rank has {x.shape[0]} rows but sizes[{comm.rank}]={sizes[comm.rank]}")
    return _GatherV.apply(x, comm, list(sizes))


def reduce_scatter_v(y: torch.Tensor, comm: AxisGroup, sizes: list[int]) -> torch.Tensor:
    """Sum y over the ranks and keep this rank's rows (rows [sum(sizes[:r]), +sizes[r]]); backward gathers."""
    if comm.size == 1:
        return y
    if y.shape[0] != sum(sizes):
        raise ValueError(f"reduce_scatter_v: {y.shape[0]} rows but sizes sum to {sum(sizes)}")
    return _ReduceScatterV.apply(y, comm, list(sizes))
