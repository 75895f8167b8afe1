"""Differentiable collectives for tensor, sequence and expert parallelism (Megatron's mappings).

Every function takes the group explicitly as an `AxisGroup` (from a ParallelState, or
`AxisGroup.single(name)` for no parallelism along an axis); its `name`, e.g. "tp", labels the bytes
in CommStats. On a group of size 1 every function is the identity and nothing is sent or counted.
The bytes this rank sends go to the group's own CommStats (`AxisGroup.stats`, shared by every group
of a ParallelState; convention in parallel_state/comm_stats.py), so no call can skip the accounting.

Forward / backward pairs (n = group size; "dim" is the sequence dim, 1 for [B, T, H]):

    copy_to_tp_region                   identity            all-reduce
    reduce_from_tp_region               all-reduce          identity
    scatter_to_tp_region                split last dim      all-gather last dim
    gather_from_tp_region               all-gather last     split last dim
    scatter_to_sequence_parallel_region split dim           all-gather dim
    gather_from_sequence_parallel_region all-gather dim     reduce-scatter dim (tensor_parallel_output_grad)
                                                            or split dim (otherwise)
    reduce_scatter_to_sequence_parallel_region reduce-scatter dim   all-gather dim
    all_to_all                          all-to-all dim 0 (even or uneven splits)   the reverse all-to-all
    all_to_all_scatter_gather           split scatter_dim, concat gather_dim        the swapped one

`gather_from_sequence_parallel_region(tensor_parallel_output_grad=True)` is the one in front of a
column-parallel linear: each rank's gradient w.r.t. the gathered input is a partial sum over its
output shard, so the backward sums and scatters. With False (the gathered tensor feeds replicated
computation, e.g. a loss every rank computes in full) each rank keeps its own slice.

Async variants (`all_reduce_async`, `all_gather_async`, `reduce_scatter_async`,
`reduce_scatter_to_sequence_parallel_region_async`) launch the
collective and return `(out, handle)`; `out` is valid only after `handle.wait()`. The
`*_async_grad` input mappings launch their backward collective instead and leave its handle in a
list the caller waits on (docs/ladder.md).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from parallel_state.comm_stats import ring_bytes_sent
from parallel_state.groups import AxisGroup

SEQUENCE_DIM = 1  # activations are [batch, sequence, hidden]

# torch 2.13 renamed the tensor-in/tensor-out collectives; older CUDA builds only have the old names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def resolve_group(group: AxisGroup) -> AxisGroup:
    """`group` itself, after checking it is an AxisGroup: the only group type (None is not a group)."""
    if not isinstance(group, AxisGroup):
        raise TypeError(f"collectives take an AxisGroup (a ParallelState group, or AxisGroup.single(name) for "
                        f"one rank); got {type(group).__name__}")
    return group


def count(comm: AxisGroup, op: str, nbytes: float) -> None:
    """Add the bytes this rank sends for one `op` on `comm` to the group's CommStats (nothing on one rank)."""
    if comm.stats is not None and comm.size > 1:
        comm.stats.record(op, comm.name, nbytes)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# ---- raw (non-differentiable) building blocks, each counted -------------------------------------


def _all_reduce(x: torch.Tensor, comm: AxisGroup,
                op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
    """A reduced copy of x (x itself untouched)."""
    out = x.contiguous().clone()
    count(comm, "all_reduce", ring_bytes_sent("all_reduce", _nbytes(out), comm.size))
    dist.all_reduce(out, op=op, group=comm.group)
    return out


def _split(x: torch.Tensor, comm: AxisGroup, dim: int) -> torch.Tensor:
    """This rank's 1/n slice of x along `dim` (no communication)."""
    if x.shape[dim] % comm.size != 0:
        raise ValueError(f"cannot split dim {dim} of size {x.shape[dim]} over a group of {comm.size} "
                         f"ranks ({comm.name}); make that size a multiple of {comm.size}")
    return x.chunk(comm.size, dim)[comm.rank].contiguous()


def _all_gather(x: torch.Tensor, comm: AxisGroup, dim: int) -> torch.Tensor:
    """Concatenation along `dim` of every rank's x (all equal shapes)."""
    moved = x.movedim(dim, 0).contiguous()
    out = torch.empty((comm.size * moved.shape[0], *moved.shape[1:]), dtype=x.dtype, device=x.device)
    count(comm, "all_gather", ring_bytes_sent("all_gather", _nbytes(out), comm.size))
    _all_gather_single(out, moved, group=comm.group)
    return out.movedim(0, dim)


def _reduce_scatter(x: torch.Tensor, comm: AxisGroup, dim: int) -> torch.Tensor:
    """This rank's slice along `dim` of the sum of every rank's x."""
    if x.shape[dim] % comm.size != 0:
        raise ValueError(f"cannot reduce-scatter dim {dim} of size {x.shape[dim]} over a group of "
                         f"{comm.size} ranks ({comm.name}); make that size a multiple of {comm.size}")
    moved = x.movedim(dim, 0).contiguous()
    out = torch.empty((moved.shape[0] // comm.size, *moved.shape[1:]), dtype=x.dtype, device=x.device)
    count(comm, "reduce_scatter", ring_bytes_sent("reduce_scatter", _nbytes(moved), comm.size))
    _reduce_scatter_single(out, moved, group=comm.group)
    return out.movedim(0, dim)


def _all_to_all_dim0(x: torch.Tensor, comm: AxisGroup,
                     output_split_sizes: list[int] | None, input_split_sizes: list[int] | None) -> torch.Tensor:
    x = x.contiguous()
    if input_split_sizes is None:
        if x.shape[0] % comm.size != 0:
            raise ValueError(f"all_to_all: dim 0 of size {x.shape[0]} does not split evenly over "
                             f"{comm.size} ranks ({comm.name}); pass input/output_split_sizes")
        sent_rows = x.shape[0] - x.shape[0] // comm.size
        out_rows = x.shape[0]
    else:
        sent_rows = sum(input_split_sizes) - input_split_sizes[comm.rank]
        out_rows = sum(output_split_sizes)
    row_bytes = x[0].numel() * x.element_size() if x.shape[0] else 0  # bytes of one dim-0 row
    out = torch.empty((out_rows, *x.shape[1:]), dtype=x.dtype, device=x.device)
    count(comm, "all_to_all", sent_rows * row_bytes)
    dist.all_to_all_single(out, x, output_split_sizes=output_split_sizes,
                           input_split_sizes=input_split_sizes, group=comm.group)
    return out


def _all_to_all_dims(x: torch.Tensor, comm: AxisGroup,
                     scatter_dim: int, gather_dim: int) -> torch.Tensor:
    inputs = [c.contiguous() for c in _chunks(x, comm, scatter_dim)]
    outputs = [torch.empty_like(inputs[0]) for _ in range(comm.size)]
    count(comm, "all_to_all", _nbytes(x) - _nbytes(inputs[comm.rank]))
    dist.all_to_all(outputs, inputs, group=comm.group)
    return torch.cat(outputs, dim=gather_dim)


def _chunks(x: torch.Tensor, comm: AxisGroup, dim: int) -> tuple[torch.Tensor, ...]:
    if x.shape[dim] % comm.size != 0:
        raise ValueError(f"all_to_all: dim {dim} of size {x.shape[dim]} does not split evenly over "
                         f"{comm.size} ranks ({comm.name})")
    return x.chunk(comm.size, dim)


# ---- autograd functions -------------------------------------------------------------------------


class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, comm):
        ctx.comm = comm
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.comm), None


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, comm):
        return _all_reduce(x, comm)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _Split(torch.autograd.Function):
    """Forward: keep this rank's slice along dim. Backward: all-gather along dim."""

    @staticmethod
    def forward(ctx, x, comm, dim):
        ctx.comm, ctx.dim = comm, dim
        return _split(x, comm, dim)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.comm, ctx.dim), None, None


class _Gather(torch.autograd.Function):
    """Forward: all-gather along dim. Backward: reduce-scatter (reduce_grad) or split."""

    @staticmethod
    def forward(ctx, x, comm, dim, reduce_grad):
        ctx.comm, ctx.dim, ctx.reduce_grad = comm, dim, reduce_grad
        return _all_gather(x, comm, dim)

    @staticmethod
    def backward(ctx, grad):
        if ctx.reduce_grad:
            return _reduce_scatter(grad, ctx.comm, ctx.dim), None, None, None
        return _split(grad, ctx.comm, ctx.dim), None, None, None


class _ReduceScatter(torch.autograd.Function):
    """Forward: reduce-scatter along dim. Backward: all-gather along dim."""

    @staticmethod
    def forward(ctx, x, comm, dim):
        ctx.comm, ctx.dim = comm, dim
        return _reduce_scatter(x, comm, dim)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.comm, ctx.dim), None, None


class _AllToAll(torch.autograd.Function):
    """All-to-all along dim 0 with optional uneven splits; backward sends the gradient back."""

    @staticmethod
    def forward(ctx, x, comm, output_split_sizes, input_split_sizes):
        ctx.comm = comm
        ctx.output_split_sizes, ctx.input_split_sizes = output_split_sizes, input_split_sizes
        return _all_to_all_dim0(x, comm, output_split_sizes, input_split_sizes)

    @staticmethod
    def backward(ctx, grad):
        back = _all_to_all_dim0(grad, ctx.comm, ctx.input_split_sizes, ctx.output_split_sizes)
        return back, None, None, None


class _AllToAllDims(torch.autograd.Function):
    """Split scatter_dim over ranks, concatenate what arrives along gather_dim (Ulysses)."""

    @staticmethod
    def forward(ctx, x, comm, scatter_dim, gather_dim):
        ctx.comm, ctx.scatter_dim, ctx.gather_dim = comm, scatter_dim, gather_dim
        return _all_to_all_dims(x, comm, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad):
        back = _all_to_all_dims(grad, ctx.comm, ctx.gather_dim, ctx.scatter_dim)
        return back, None, None, None


class _AllReduceAsync(torch.autograd.Function):
    """Forward: launch an all-reduce into a copy (handle in `holder`). Backward: identity."""

    @staticmethod
    def forward(ctx, x, comm, holder):
        out = x.contiguous().clone()
        count(comm, "all_reduce", ring_bytes_sent("all_reduce", _nbytes(out), comm.size))
        holder.append(dist.all_reduce(out, group=comm.group, async_op=True))
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


def _launch_reduce_scatter(x: torch.Tensor, comm: AxisGroup, dim: int, holder: list) -> torch.Tensor:
    """Start a reduce-scatter of x along `dim`; its handle goes to `holder`. Returns the receiving
    buffer itself, with `dim` moved to the front: a view of it taken before the collective has
    written it could not be differentiated (autograd forbids in-place writes to a custom Function's
    view output), so the caller moves the dim back after waiting."""
    if x.shape[dim] % comm.size != 0:
        raise ValueError(f"cannot reduce-scatter dim {dim} of size {x.shape[dim]} over a group of "
                         f"{comm.size} ranks ({comm.name}); make that size a multiple of {comm.size}")
    moved = x.movedim(dim, 0).contiguous()
    out = torch.empty((moved.shape[0] // comm.size, *moved.shape[1:]), dtype=x.dtype, device=x.device)
    count(comm, "reduce_scatter", ring_bytes_sent("reduce_scatter", _nbytes(moved), comm.size))
    holder.append(_reduce_scatter_single(out, moved, group=comm.group, async_op=True))
    return out


def _launch_all_reduce(x: torch.Tensor, comm: AxisGroup, holder: list) -> torch.Tensor:
    """Start a sum all-reduce of a copy of x; handle to `holder`, copy valid after its wait."""
    out = x.contiguous().clone()
    count(comm, "all_reduce", ring_bytes_sent("all_reduce", _nbytes(out), comm.size))
    holder.append(dist.all_reduce(out, group=comm.group, async_op=True))
    return out


class _ReduceScatterAsync(torch.autograd.Function):
    """Forward: launch a reduce-scatter along dim (handle in `holder`; the output has dim moved to
    the front). Backward: all-gather."""

    @staticmethod
    def forward(ctx, x, comm, dim, holder):
        ctx.comm, ctx.dim = comm, dim
        return _launch_reduce_scatter(x, comm, dim, holder)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.comm, 0).movedim(0, ctx.dim), None, None, None


class _CopyToRegionAsyncGrad(torch.autograd.Function):
    """Forward: identity. Backward: launch the all-reduce of the gradient (handle in `grad_holder`)
    and return its buffer, which whoever waits on the handle may read."""

    @staticmethod
    def forward(ctx, x, comm, grad_holder):
        ctx.comm, ctx.grad_holder = comm, grad_holder
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _launch_all_reduce(grad, ctx.comm, ctx.grad_holder), None, None


class _GatherAsyncGrad(torch.autograd.Function):
    """Forward: all-gather along dim. Backward: launch the reduce-scatter of the gradient (handle in
    `grad_holder`) and return its buffer, valid once the handle is waited on."""

    @staticmethod
    def forward(ctx, x, comm, dim, grad_holder):
        ctx.comm, ctx.dim, ctx.grad_holder = comm, dim, grad_holder
        return _all_gather(x, comm, dim)

    @staticmethod
    def backward(ctx, grad):
        out = _launch_reduce_scatter(grad, ctx.comm, ctx.dim, ctx.grad_holder)
        return out.movedim(0, ctx.dim), None, None, None


# ---- public API ---------------------------------------------------------------------------------


def copy_to_tp_region(x: torch.Tensor, group) -> torch.Tensor:
    """Identity forward, all-reduce backward (the input of a column-parallel linear)."""
    comm = resolve_group(group)
    return x if comm.size == 1 else _CopyToRegion.apply(x, comm)


def reduce_from_tp_region(x: torch.Tensor, group) -> torch.Tensor:
    """All-reduce forward, identity backward (the output of a row-parallel linear)."""
    comm = resolve_group(group)
    return x if comm.size == 1 else _ReduceFromRegion.apply(x, comm)


def scatter_to_tp_region(x: torch.Tensor, group) -> torch.Tensor:
    """Keep this rank's slice of the last dim forward; all-gather it backward."""
    comm = resolve_group(group)
    return x if comm.size == 1 else _Split.apply(x, comm, x.dim() - 1)


def gather_from_tp_region(x: torch.Tensor, group) -> torch.Tensor:
    """All-gather the last dim forward; keep this rank's slice of the gradient backward."""
    comm = resolve_group(group)
    return x if comm.size == 1 else _Gather.apply(x, comm, x.dim() - 1, False)


def scatter_to_sequence_parallel_region(x: torch.Tensor, group,
                                        dim: int = SEQUENCE_DIM) -> torch.Tensor:
    """Keep this rank's chunk of the sequence forward; all-gather the gradient backward."""
    comm = resolve_group(group)
    return x if comm.size == 1 else _Split.apply(x, comm, dim)


def gather_from_sequence_parallel_region(x: torch.Tensor, group,
                                         dim: int = SEQUENCE_DIM,
                                         tensor_parallel_output_grad: bool = True) -> torch.Tensor:
    """All-gather the sequence forward; backward reduce-scatters (default) or splits the gradient.

    tensor_parallel_output_grad=True when the gathered tensor feeds TP-sharded computation (every
    rank's gradient is a partial sum); False when it feeds computation every rank does in full.
    """
    comm = resolve_group(group)
    return x if comm.size == 1 else _Gather.apply(x, comm, dim, tensor_parallel_output_grad)


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor, group,
                                               dim: int = SEQUENCE_DIM) -> torch.Tensor:
    """Reduce-scatter along the sequence forward (row-parallel output under SP); all-gather backward."""
    comm = resolve_group(group)
    return x if comm.size == 1 else _ReduceScatter.apply(x, comm, dim)


def all_to_all(x: torch.Tensor, group,
               output_split_sizes: Sequence[int] | None = None,
               input_split_sizes: Sequence[int] | None = None) -> torch.Tensor:
    """All-to-all along dim 0: rows input_split_sizes[j] go to rank j (equal splits when None).

    Give both split lists or neither (the MoE token dispatch primitive). Backward returns each
    gradient row to the rank it came from.
    """
    if (output_split_sizes is None) != (input_split_sizes is None):
        raise ValueError("all_to_all: pass both output_split_sizes and input_split_sizes, or neither")
    comm = resolve_group(group)
    if comm.size == 1:
        return x
    out_splits = None if output_split_sizes is None else [int(s) for s in output_split_sizes]
    in_splits = None if input_split_sizes is None else [int(s) for s in input_split_sizes]
    for what, splits in (("output_split_sizes", out_splits), ("input_split_sizes", in_splits)):
        if splits is not None and len(splits) != comm.size:
            raise ValueError(f"all_to_all: {what} has {len(splits)} entries for a group of {comm.size}")
    if in_splits is not None and sum(in_splits) != x.shape[0]:
        raise ValueError(f"all_to_all: input_split_sizes sum to {sum(in_splits)} but dim 0 is {x.shape[0]}")
    return _AllToAll.apply(x, comm, out_splits, in_splits)


def all_to_all_scatter_gather(x: torch.Tensor, group, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """Split `scatter_dim` into n chunks, send chunk j to rank j, concatenate arrivals along `gather_dim`.

    Ulysses: [B, T/n, H, D] with scatter_dim=2, gather_dim=1 -> [B, T, H/n, D], and back.
    """
    comm = resolve_group(group)
    if comm.size == 1:
        return x
    return _AllToAllDims.apply(x, comm, scatter_dim, gather_dim)


class NoGradWait:
    """A collective's handle whose wait runs with autograd off.

    gloo finishes a reduce-scatter by copying into the output on the waiting thread; with grad mode
    on, autograd would record that copy as an in-place op on a tensor that requires grad and cut
    its history (its gradient would silently become zero).
    """

    def __init__(self, work):
        self.work = work

    def wait(self) -> bool:
        with torch.no_grad():
            self.work.wait()
        return True

    def is_completed(self) -> bool:
        return self.work.is_completed()


class CompletedHandle:
    """The handle of a collective that needed no communication (group of size 1)."""

    def wait(self) -> bool:
        return True

    def is_completed(self) -> bool:
        return True


def all_reduce_async(x: torch.Tensor, group):
    """Launch a sum all-reduce of a copy of x; returns (out, handle), out valid after handle.wait().

    Differentiable like reduce_from_tp_region (identity backward), so a ladder-residual block can
    overlap a TP all-reduce with the next module's compute.
    """
    comm = resolve_group(group)
    if comm.size == 1:
        return x, CompletedHandle()
    holder: list = []
    out = _AllReduceAsync.apply(x, comm, holder)
    return out, holder[0]


def all_reduce_inplace(tensor: torch.Tensor, group,
                       op: dist.ReduceOp = dist.ReduceOp.SUM, async_op: bool = False):
    """Reduce a buffer (e.g. flat gradients) in place, not differentiable; the handle if async_op."""
    comm = resolve_group(group)
    if comm.size == 1:
        return CompletedHandle() if async_op else None
    if not tensor.is_contiguous():
        raise ValueError("all_reduce_inplace needs a contiguous tensor (reduce a flat buffer)")
    count(comm, "all_reduce", ring_bytes_sent("all_reduce", _nbytes(tensor), comm.size))
    return dist.all_reduce(tensor, op=op, group=comm.group, async_op=async_op)


def all_reduce_coalesced(tensors: Sequence[torch.Tensor], group) -> None:
    """Sum `tensors` over `group` in one flat buffer, each in place. Every rank of the group must pass
    tensors of the same shapes in the same order."""
    comm = resolve_group(group)
    if comm.size == 1 or not tensors:
        return
    flat = torch._utils._flatten_dense_tensors(tensors)
    all_reduce_inplace(flat, comm)
    for tensor, synced in zip(tensors, torch._utils._unflatten_dense_tensors(flat, tensors)):
        tensor.copy_(synced)


def all_reduce_grads_coalesced(params, group) -> None:
    """Sum the gradients of `params` over `group` in one flat buffer, in place (a missing grad counts
    as zeros). Every rank of the group must pass the same parameters in the same order."""
    params = [p for p in params if p.requires_grad]
    if resolve_group(group).size == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    all_reduce_coalesced([p.grad for p in params], group)


def all_gather_async(x: torch.Tensor, group):
    """Launch an all-gather along dim 0 (not differentiable); returns (out, handle)."""
    comm = resolve_group(group)
    if comm.size == 1:
        return x, CompletedHandle()
    x = x.contiguous()
    out = torch.empty((comm.size * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    count(comm, "all_gather", ring_bytes_sent("all_gather", _nbytes(out), comm.size))
    return out, _all_gather_single(out, x, group=comm.group, async_op=True)


def reduce_scatter_async(x: torch.Tensor, group):
    """Launch a sum reduce-scatter along dim 0 (not differentiable); returns (out, handle)."""
    comm = resolve_group(group)
    if comm.size == 1:
        return x, CompletedHandle()
    if x.shape[0] % comm.size != 0:
        raise ValueError(f"reduce_scatter_async: dim 0 of size {x.shape[0]} does not split over "
                         f"{comm.size} ranks ({comm.name})")
    x = x.contiguous()
    out = torch.empty((x.shape[0] // comm.size, *x.shape[1:]), dtype=x.dtype, device=x.device)
    count(comm, "reduce_scatter", ring_bytes_sent("reduce_scatter", _nbytes(x), comm.size))
    return out, _reduce_scatter_single(out, x, group=comm.group, async_op=True)


def all_reduce_max(x: torch.Tensor, group) -> torch.Tensor:
    """Elementwise max over the group (not differentiable; e.g. the softmax max of a vocab-parallel loss)."""
    comm = resolve_group(group)
    return x if comm.size == 1 else _all_reduce(x, comm, op=dist.ReduceOp.MAX)


def all_reduce_sum(x: torch.Tensor, group) -> torch.Tensor:
    """Elementwise sum over the group (not differentiable); a new tensor."""
    comm = resolve_group(group)
    return x if comm.size == 1 else _all_reduce(x, comm)


def reduce_scatter_to_sequence_parallel_region_async(x: torch.Tensor, group, dim: int = SEQUENCE_DIM):
    """Launch the reduce-scatter of a row-parallel output under SP; returns (out, handle): after
    handle.wait(), out.movedim(0, dim) is the result (out is the receiving buffer, `dim` first, see
    _launch_reduce_scatter). Differentiable like reduce_scatter_to_sequence_parallel_region
    (all-gather backward). On one rank out is x.movedim(dim, 0)."""
    comm = resolve_group(group)
    if comm.size == 1:
        return x.movedim(dim, 0), CompletedHandle()
    holder: list = []
    out = _ReduceScatterAsync.apply(x, comm, dim, holder)
    return out, NoGradWait(holder[0])


def copy_to_tp_region_async_grad(x: torch.Tensor, group, grad_holder: list) -> torch.Tensor:
    """copy_to_tp_region whose backward all-reduce is only launched: its handle is appended to
    `grad_holder`, and the gradient it hands back is valid once that handle is waited on.

    For a consumer that can defer reading the input gradient (the ladder residual, docs/ladder.md),
    so the reduction overlaps other backward work.
    """
    comm = resolve_group(group)
    return x if comm.size == 1 else _CopyToRegionAsyncGrad.apply(x, comm, grad_holder)


def gather_from_sequence_parallel_region_async_grad(x: torch.Tensor, group, grad_holder: list,
                                                    dim: int = SEQUENCE_DIM) -> torch.Tensor:
    """gather_from_sequence_parallel_region (tensor_parallel_output_grad=True) whose backward
    reduce-scatter is only launched, its handle appended to `grad_holder` (see
    copy_to_tp_region_async_grad). The gradient it hands back is a view of the receiving buffer:
    read it only after the wait."""
    comm = resolve_group(group)
    return x if comm.size == 1 else _GatherAsyncGrad.apply(x, comm, dim, grad_holder)
