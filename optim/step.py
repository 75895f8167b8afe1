"""The optimizer step of one global batch, behind one interface the trainer drives.

An `OptimizerStep` owns everything between the last backward and the next forward: the gradient
buffers and their reduction, the gradient syncs of tied and TP-replicated parameters, clipping by
the global norm, the learning rate, the update and zeroing. The trainer calls, per global batch:

    with step.no_sync(): backward of every microbatch but the last   # accumulate, no communication
    backward of the last microbatch                                   # reductions may start here
    grad_norm = step.reduce_and_clip()                                # every gradient complete
    lr = step.apply(index, update=finite)                             # lr of step `index`, update
    step.zero_grad()

`BucketedOptimizerStep` is the default: bucketed reductions overlapped with backward, AdamW. Other
implementations (a sharded optimizer, an outer optimizer) are built from the same `StepInputs`
and handed to the trainer as a factory.
"""
from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from optim.adamw import build_optimizer
from optim.clip import clip_grad_norm_
from optim.config import OptimConfig
from optim.grad_buffers import BucketedGradReducer, GradReducers
from optim.schedules import LRScheduler
from parallel_state.collectives import all_reduce_grads_coalesced, all_reduce_inplace, all_reduce_sum
from parallel_state.groups import AxisGroup, ParallelState
from parallel_state.params import is_tp_duplicate, param_meta, tp_partial_grad_params


@dataclass
class StepInputs:
    """What an optimizer step is built from."""

    named_params: list[tuple[str, nn.Parameter]]  # this rank's parameters (a tied weight once)
    cfg: OptimConfig
    max_steps: int  # the LR schedule's length
    ps: ParallelState
    bucket_size_mb: float  # gradient bucket size of the reductions
    # This rank's copy of the embedding tied over pipeline stages (the embedding on the first stage,
    # the head on the last), or None: its gradient is summed over the embedding group.
    tied_weight: nn.Parameter | None = None
    # The model's modules (a step may hook their forward, e.g. to wait for a parameter all-gather).
    modules: list[nn.Module] = field(default_factory=list)


class OptimizerStep(Protocol):
    """The interface the trainer drives (see the module docstring)."""

    optimizer: torch.optim.Optimizer

    def no_sync(self) -> AbstractContextManager[None]:
        """Backward inside accumulates gradients without communicating (all microbatches but the last)."""

    def reduce_and_clip(self) -> float:
        """After the last backward: complete every gradient and clip; the global norm before clipping."""

    def apply(self, step: int, update: bool) -> float:
        """Set the learning rate of optimizer step `step` (0-based), update the parameters when
        `update`; return the learning rate."""

    def zero_grad(self) -> None:
        """Zero the gradients for the next global batch."""

    def finish_param_sync(self) -> None:
        """Complete any parameter update still in flight (before reading the weights outside a forward:
        checkpoints, tests)."""

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of the step (the optimizer's state)."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from `state_dict()`; this run's config decides the implementation flags."""


OptimizerStepFactory = Callable[[StepInputs], OptimizerStep]


def counted_within_replica(param: torch.Tensor, ps: ParallelState) -> bool:
    """Whether this rank counts `param` among the ranks holding one replica of the model: TP replicas
    on TP rank 0 only, a tied head copy never; expert ones on ETP rank 0 unless ETP-sharded."""
    meta = param_meta(param)
    if meta.expert:
        return meta.shard is not None or ps.etp.rank == 0
    return not is_tp_duplicate(param, ps.tp.rank) and not meta.tied_copy


def counted_in_norm(param: torch.Tensor, ps: ParallelState) -> bool:
    """Whether this rank counts `param` in the global grad norm (summed over all ranks), so every
    parameter counts exactly once: on the first DP x CP replica (EDP for experts), and there as
    `counted_within_replica` says."""
    first_replica = (ps.edp if param_meta(param).expert else ps.dp_cp).rank == 0
    return first_replica and counted_within_replica(param, ps)


def allreduce_tp_partial_grads(params, tp: AxisGroup) -> None:
    """Sum the gradients of the TP-partial parameters over TP in one flat buffer (every TP rank passes
    the same parameter list; a missing grad counts as zeros)."""
    if tp.size > 1:
        all_reduce_grads_coalesced(tp_partial_grad_params(params), tp)


def sync_replicated_grads(inputs: StepInputs, params: list[nn.Parameter]) -> None:
    """Sum the gradients that are partial on each rank holding a replica: the tied embedding over the
    embedding group (first and last stage) and the TP-partial parameters over TP."""
    ps = inputs.ps
    if inputs.tied_weight is not None and ps.embedding.size > 1:
        weight = inputs.tied_weight
        if weight.grad is None:
            weight.grad = torch.zeros_like(weight)
        all_reduce_inplace(weight.grad, ps.embedding)
    allreduce_tp_partial_grads(params, ps.tp)


def clip_by_global_norm(inputs: StepInputs, params: list[nn.Parameter]) -> float:
    """Clip every gradient by the norm over all ranks' parameters (each counted once); returns the
    norm before clipping."""
    ps = inputs.ps
    norm = clip_grad_norm_(params, inputs.cfg.clip_grad, norm_reduce_fn=lambda s: all_reduce_sum(s, ps.world),
                           counted=lambda p: counted_in_norm(p, ps))
    return float(norm)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any], cfg: OptimConfig) -> None:
    """Load an optimizer state dict with this run's fused/foreach flags. The saved groups carry their
    own; setting them before loading lets torch place the step counters for the chosen implementation."""
    for group in state["param_groups"]:
        group["fused"], group["foreach"] = cfg.fused, cfg.foreach
    optimizer.load_state_dict(state)


class AdamWStep:
    """What every AdamW-based step shares: the optimizer, the LR schedule, the update and the state.
    Subclasses say how gradients are buffered and reduced (`no_sync`, `reduce_and_clip`, `zero_grad`)."""

    def __init__(self, inputs: StepInputs):
        self.inputs = inputs
        self.params = [p for _, p in inputs.named_params]
        self.optimizer = self._build_optimizer()
        self.scheduler = LRScheduler(self.optimizer, inputs.cfg.lr, inputs.cfg.schedule, inputs.max_steps)

    def _build_optimizer(self) -> torch.optim.Optimizer:
        """AdamW over the model's parameters (a sharded step builds it over its shard instead)."""
        return build_optimizer(self.inputs.named_params, self.inputs.cfg)

    def apply(self, step: int, update: bool) -> float:
        lr = self.scheduler.apply(step)
        if update:
            self.optimizer.step()
        return lr

    def finish_param_sync(self) -> None:
        """Nothing is in flight: the update writes the parameters directly."""

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_optimizer_state(self.optimizer, state, self.inputs.cfg)


class BucketedOptimizerStep(AdamWStep):
    """AdamW with gradients in flat buckets reduced from backward hooks: dense ones over DP x CP,
    expert ones over EDP (optim.grad_buffers), then the replica syncs, clipping and the update."""

    def __init__(self, inputs: StepInputs, shard: bool = False):
        params = [p for _, p in inputs.named_params]
        # shard: reduce-scatter (the distributed optimizer); the tied embedding then gets a bucket of
        # its own so its slices line up on the first and the last stage.
        own = [inputs.tied_weight] if shard and inputs.tied_weight is not None else []
        # The buckets exist before the optimizer, so its state follows the parameters, not the buffers.
        self.reducers = GradReducers([
            BucketedGradReducer(params, group, bucket_size_mb=inputs.bucket_size_mb, experts=experts, shard=shard,
                                own_bucket=own)
            for group, experts in ((inputs.ps.dp_cp, False), (inputs.ps.edp, True))])
        super().__init__(inputs)

    def no_sync(self) -> AbstractContextManager[None]:
        return self.reducers.no_sync()

    def reduce_and_clip(self) -> float:
        self.reducers.finish()
        sync_replicated_grads(self.inputs, self.params)
        return clip_by_global_norm(self.inputs, self.params)

    def zero_grad(self) -> None:
        self.reducers.zero_grad()  # keeps .grad views into the buckets (never set_to_none)
