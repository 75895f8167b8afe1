"""Column- and row-parallel linear layers (Megatron-LM), and the gradient sync of TP-replicated params.

Each sharded weight is a slice of the full weight a one-process model gets: the parameter carries
`shard = (dim, index, count)` in its metadata (parallel_state.params) and models.init.materialize generates the FULL tensor from
(seed, global name) and copies this rank's slice. With tp = 1 both layers are ordinary linears.

    ColumnParallelLinear  W [out/tp, in]: y_r = x W_r^T        (output split over TP)
    RowParallelLinear     W [out, in/tp]: y = sum_r x_r W_r^T  (input split over TP, output reduced)

A Column -> Row pair (MLP, attention) communicates once each way: without sequence parallelism the
Column input is `copy_to_tp_region` (all-reduce in backward) and the Row output is
`reduce_from_tp_region` (all-reduce in forward). With sequence parallelism activations outside the
pair are split along the sequence; the Column input is all-gathered (reduce-scattered in backward)
and the Row output reduce-scattered (all-gathered in backward): same bytes, 1/tp of the activation
memory in norms, dropout and residuals.

`tp` is the ParallelState's TP AxisGroup, or `AxisGroup.single("tp")` for no tensor parallelism
(then nothing is communicated, even inside a multi-rank job).

Several Column layers reading the same input (q/k/v, gate/up) should share one input collective:
`x_tp = first.prepare_input(x)` then `layer(x_tp, input_prepared=True)` for each.

Parameters replicated over TP whose gradient is a partial sum (norm gains and the Row bias under
SP, a replicated GQA K/V projection with kv_heads < tp) are marked `tp_partial_grad` in their
metadata; the optimizer step (optim/step.py) sums their gradients over TP after backward so the
replicas never drift.
"""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.init import ParamInit, zeros_init
from parallel_state.collectives import (
    SEQUENCE_DIM,
    CompletedHandle,
    all_reduce_async,
    copy_to_tp_region,
    copy_to_tp_region_async_grad,
    gather_from_sequence_parallel_region,
    gather_from_sequence_parallel_region_async_grad,
    gather_from_tp_region,
    reduce_from_tp_region,
    reduce_scatter_to_sequence_parallel_region,
    reduce_scatter_to_sequence_parallel_region_async,
    resolve_group,
    scatter_to_tp_region,
)
from parallel_state.groups import AxisGroup
from parallel_state.params import mark_shard, set_param_meta
from parallel_state.rng import RNGStreams


def divide_exactly(total: int, parts: int, what: str) -> int:
    """total / parts, or a ValueError naming `what` when it does not divide."""
    if total % parts != 0:
        raise ValueError(f"{what}={total} is not divisible by tensor-parallel size {parts}; "
                         f"choose a tp that divides {total}")
    return total // parts


# Attribute set on a tensor that has already been through a TP region's input mapping (see
# `enter_tp_region_deferred_grad`); the mixers' own mapping then passes it through unchanged.
_IN_TP_REGION = "_foldtron_in_tp_region"


def tp_region_input(x: torch.Tensor, tp: AxisGroup, sequence_parallel: bool) -> torch.Tensor:
    """Enter a TP region with the full activation: all-gather the sequence under SP (reduce-scatter
    in backward), else identity forward with an all-reduce in backward.

    A tensor that `enter_tp_region_deferred_grad` produced is already inside the region and is
    returned as is, so a mixer keeps one code path whether or not its caller defers the reduction.
    """
    if getattr(x, _IN_TP_REGION, False):
        return x
    if sequence_parallel:
        # The gathered sequence is a strided view; made contiguous once here, it is saved once for
        # backward, instead of one contiguous copy saved by each projection that reads it.
        return gather_from_sequence_parallel_region(x, tp, tensor_parallel_output_grad=True).contiguous()
    return copy_to_tp_region(x, tp)


def enter_tp_region_deferred_grad(x: torch.Tensor, tp: AxisGroup, sequence_parallel: bool,
                                  grad_handles: list) -> torch.Tensor:
    """`tp_region_input` whose backward collective is only launched: its handle is appended to
    `grad_handles`, and the input gradient is valid once the caller has waited on it.

    The ladder residual (models/block.py, docs/ladder.md) enters a mixer's TP region itself with
    this, so that the reduction of the mixer's input gradient overlaps the previous module's
    backward. With one TP rank nothing is communicated and x is returned unchanged.
    """
    comm = resolve_group(tp)
    if comm.size == 1:
        return x
    if sequence_parallel:
        y = gather_from_sequence_parallel_region_async_grad(x, comm, grad_handles)
    else:
        y = copy_to_tp_region_async_grad(x, comm, grad_handles)
    setattr(y, _IN_TP_REGION, True)
    return y


@dataclass
class PendingTensor:
    """A row-parallel output whose reduction (all-reduce, or reduce-scatter under SP) is in flight.

    `partial_result` is the collective's receiving buffer: read it only through `wait()`. With
    `moved_dim` set it holds the result with that dim moved to the front (a reduce-scatter's buffer,
    see parallel_state.collectives), and `wait()` moves it back. A complete tensor (no collective,
    e.g. a MoE output) is wrapped with a CompletedHandle.
    """

    partial_result: torch.Tensor
    handle: Any
    moved_dim: int | None = None

    @classmethod
    def completed(cls, value: torch.Tensor) -> PendingTensor:
        """A tensor that needs no waiting, in the same wrapper."""
        return cls(value, CompletedHandle())

    def wait(self) -> torch.Tensor:
        """The reduced tensor (blocks until the collective is done)."""
        self.handle.wait()
        return self.as_result(self.partial_result)

    def as_result(self, buffer: torch.Tensor) -> torch.Tensor:
        """`buffer` (shaped like partial_result) in the result's layout."""
        return buffer if self.moved_dim is None else buffer.movedim(0, self.moved_dim)

    def as_buffer(self, result: torch.Tensor) -> torch.Tensor:
        """`result` (e.g. its gradient) in partial_result's layout."""
        return result if self.moved_dim is None else result.movedim(self.moved_dim, 0)


@dataclass(frozen=True)
class TPContext:
    """What a model layer needs to shard itself over TP; one per model, handed to every mixer.

    `column(...)` / `row(...)` build the layers with the context's group and SP flag.
    """

    # The TP group (ParallelState.tp); a group of one rank: no tensor parallelism.
    group: AxisGroup = field(default_factory=lambda: AxisGroup.single("tp"))
    sequence_parallel: bool = False  # activations outside Column->Row pairs split along the sequence
    rng: RNGStreams | None = None  # the rank's random streams (dropout on sharded activations)

    @property
    def size(self) -> int:
        return self.group.size

    @property
    def rank(self) -> int:
        return self.group.rank

    @property
    def sp(self) -> bool:
        """Whether sequence parallelism is in effect (requested and tp > 1)."""
        return self.sequence_parallel and self.size > 1

    def sharded_rng(self) -> AbstractContextManager:
        """Draw random numbers (dropout) from the tp-sharded stream: activations that differ per TP
        rank (split heads, channels) need masks that differ too. A no-op without TP or streams."""
        if self.rng is None or self.size == 1:
            return nullcontext()
        return self.rng.fork("tp-sharded")

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        """The input mapping of a TP region that takes the full activation (what every Column layer
        does first): all-gather the sequence under SP, else identity with an all-reduce in backward.

        Layers that read one input into several sharded computations call this once and pass the
        result on with `input_prepared=True`.
        """
        return tp_region_input(x, self.group, self.sp)

    def column(self, in_features: int, out_features: int, init: ParamInit, **kwargs) -> ColumnParallelLinear:
        return ColumnParallelLinear(in_features, out_features, self.group, init=init,
                                    sequence_parallel=self.sequence_parallel, **kwargs)

    def row(self, in_features: int, out_features: int, init: ParamInit, **kwargs) -> RowParallelLinear:
        return RowParallelLinear(in_features, out_features, self.group, init=init,
                                 sequence_parallel=self.sequence_parallel, **kwargs)

    def mark_sequence_parallel(self, *params: nn.Parameter) -> None:
        """Mark TP-replicated params that see only this rank's tokens under SP (norm gains)."""
        if self.sp:
            for p in params:
                set_param_meta(p, tp_partial_grad=True)


class _TPLinear(nn.Module):
    """What Column- and RowParallelLinear share: the resolved group and how their params are seeded."""

    def __init__(self, in_features: int, out_features: int, tp: AxisGroup, init: ParamInit,
                 sequence_parallel: bool):
        super().__init__()
        self.tp = resolve_group(tp)
        self.in_features = in_features
        self.out_features = out_features
        self.sequence_parallel = sequence_parallel and self.tp.size > 1
        self.weight_init = init

    def init_specs(self) -> dict[str, ParamInit]:
        specs = {"weight": self.weight_init}
        if self.bias is not None:
            specs["bias"] = zeros_init()
        return specs


class ColumnParallelLinear(_TPLinear):
    """y = x A^T (+ b) with A's output rows split over TP: this rank holds A[out/tp * r : out/tp * (r+1)].

    Input: the full activation [B, T, in] (or, with sequence_parallel, this rank's sequence chunk
    [B, T/tp, in], gathered here). Output: this rank's slice [B, T, out/tp], or the full [B, T, out]
    with gather_output (not allowed with sequence_parallel, whose consumers take the slice).
    """

    def __init__(self, in_features: int, out_features: int, tp: AxisGroup, *,
                 init: ParamInit,
                 bias: bool = False, gather_output: bool = False, sequence_parallel: bool = False):
        if sequence_parallel and gather_output:
            raise ValueError("ColumnParallelLinear: gather_output=True with sequence_parallel=True is not "
                             "supported; feed the output slice to a RowParallelLinear instead")
        super().__init__(in_features, out_features, tp, init, sequence_parallel)
        comm = self.tp
        self.gather_output = gather_output
        self.out_per_rank = divide_exactly(out_features, comm.size, "ColumnParallelLinear out_features")
        self.weight = mark_shard(nn.Parameter(torch.empty(self.out_per_rank, in_features)), 0, comm.rank, comm.size)
        self.bias = None
        if bias:
            self.bias = mark_shard(nn.Parameter(torch.empty(self.out_per_rank)), 0, comm.rank, comm.size)

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        """The input mapping: all-gather the sequence (SP) or copy into the TP region."""
        return tp_region_input(x, self.tp, self.sequence_parallel)

    def forward(self, x: torch.Tensor, input_prepared: bool = False) -> torch.Tensor:
        if not input_prepared:
            x = self.prepare_input(x)
        y = F.linear(x, self.weight, self.bias)
        return gather_from_tp_region(y, self.tp) if self.gather_output else y

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features} ({self.out_per_rank} per rank), "
                f"bias={self.bias is not None}, gather_output={self.gather_output}, sp={self.sequence_parallel}")


class RowParallelLinear(_TPLinear):
    """y = x A^T (+ b) with A's input columns split over TP: this rank holds A[:, in/tp * r : in/tp * (r+1)].

    Input: this rank's slice [B, T, in/tp] (input_is_parallel, e.g. a ColumnParallelLinear's
    output) or the full [B, T, in], split here. Output: the full sum [B, T, out], or with
    sequence_parallel this rank's sequence chunk [B, T/tp, out] (reduce-scattered). The bias is
    replicated and added after the reduction.
    """

    def __init__(self, in_features: int, out_features: int, tp: AxisGroup, *,
                 init: ParamInit,
                 bias: bool = False, input_is_parallel: bool = True, sequence_parallel: bool = False):
        if sequence_parallel and not input_is_parallel:
            raise ValueError("RowParallelLinear: sequence_parallel=True needs input_is_parallel=True")
        super().__init__(in_features, out_features, tp, init, sequence_parallel)
        comm = self.tp
        self.input_is_parallel = input_is_parallel
        self.in_per_rank = divide_exactly(in_features, comm.size, "RowParallelLinear in_features")
        self.weight = mark_shard(nn.Parameter(torch.empty(out_features, self.in_per_rank)), 1, comm.rank, comm.size)
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features))
            # Under SP each rank adds the bias to its own tokens only: its gradient is partial.
            set_param_meta(self.bias, tp_partial_grad=self.sequence_parallel)
        # Return the output as a PendingTensor with its reduction in flight (`defer_output_reduction`).
        self.defer_reduction = False

    def defer_output_reduction(self) -> None:
        """From now on forward returns a PendingTensor: the reduction is launched, not waited on.

        Set by the ladder residual (models/block.py) on a mixer's output projection, whose caller
        waits only when the residual stream needs the value.
        """
        if self.bias is not None:
            raise ValueError("RowParallelLinear with a bias cannot defer its reduction (the bias is added "
                             "after it); build the layer without bias")
        self.defer_reduction = True

    def forward(self, x: torch.Tensor) -> torch.Tensor | PendingTensor:
        if not self.input_is_parallel:
            x = scatter_to_tp_region(x, self.tp)
        partial = F.linear(x, self.weight)
        if self.defer_reduction:
            if self.sequence_parallel:
                out, handle = reduce_scatter_to_sequence_parallel_region_async(partial, self.tp)
                return PendingTensor(out, handle, moved_dim=SEQUENCE_DIM)
            return PendingTensor(*all_reduce_async(partial, self.tp))
        if self.sequence_parallel:
            y = reduce_scatter_to_sequence_parallel_region(partial, self.tp)
        else:
            y = reduce_from_tp_region(partial, self.tp)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"in={self.in_features} ({self.in_per_rank} per rank), out={self.out_features}, "
                f"bias={self.bias is not None}, input_is_parallel={self.input_is_parallel}, "
                f"sp={self.sequence_parallel}")
