"""The optimizer step of one global batch, behind one interface the trainer drives.

An `OptimizerStep` owns everything between the last backward and the next forward: the gradient
buffers and their reduction, the gradient syncs of tied and TP-replicated parameters, clipping by
the global norm, the learning rate, the update and zeroing. The trainer calls, per global batch:

    with step.no_sync(): backward of every microbatch but the last   # accumulate, no communication
    backward of the last microbatch                                   # reductions may start here
    grad_norm = step.reduce_and_clip()                                # every gradient complete
    lr = step.apply(index, update=finite)                             # lr of step `index`, update
    step.zero_grad()

With bf16/fp16 parameters (trainer.precision=bf16 or fp16) a step keeps fp32 master weights: the
gradients accumulate in fp32 main-gradient buckets, AdamW updates the masters and the parameters are
copied from them; with fp32 parameters the parameters are their own masters.

`BucketedOptimizerStep` is the default: bucketed reductions overlapped with backward, AdamW. Other
implementations (a sharded optimizer, an outer optimizer) are built from the same `StepInputs`
and handed to the trainer as a factory.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from optim.adamw import build_optimizer
from optim.clip import clip_grad_norm_
from optim.config import OptimConfig
from optim.grad_buffers import BucketedGradReducer, GradReducers
from optim.schedules import LRScheduler
from parallel_state.collectives import all_reduce_grads_coalesced, all_reduce_inplace, all_reduce_sum
from parallel_state.groups import AxisGroup, ParallelState
from parallel_state.params import is_tp_duplicate, param_meta, set_param_meta, tp_partial_grad_params


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
    # Microbatches per optimizer step on this rank (the DeepSpeed engine's gradient accumulation steps).
    microbatches: int = 1


class OptimizerStep(Protocol):
    """The interface the trainer drives (see the module docstring)."""

    optimizer: torch.optim.Optimizer

    def no_sync(self) -> AbstractContextManager[None]:
        """Backward inside accumulates gradients without communicating (all microbatches but the last)."""

    def reduce_and_clip(self, unscale: float = 1.0) -> float:
        """After the last backward: complete every gradient, multiply it by `unscale` (1 / the fp16 loss
        scale) and clip; the global norm before clipping (non-finite when a gradient overflowed)."""

    def apply(self, step: int, update: bool) -> float:
        """Set the learning rate of optimizer step `step` (0-based), update the parameters when
        `update`; return the learning rate."""

    def zero_grad(self) -> None:
        """Zero the gradients for the next global batch."""

    def finish_param_sync(self) -> None:
        """Complete any parameter update still in flight (before reading the weights outside a forward:
        checkpoints, tests)."""

    def param_states(self) -> list[ParamState]:
        """The optimizer state per parameter (whole or flat ranges of it), as views a checkpoint
        reads and writes in place; created empty if the optimizer has not stepped yet."""

    def finish_state_import(self, masters_loaded: bool) -> None:
        """After a checkpoint was read into the parameters and `param_states()`: derive what it did
        not hold (masters from the weights) and make the weights the forward uses current."""


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


def sync_replicated_grads(ps: ParallelState, tied_weight: torch.Tensor | None, params: list[torch.Tensor]) -> None:
    """Sum the gradients that are partial on each rank holding a replica: the tied embedding over the
    embedding group (first and last stage) and the TP-partial parameters over TP."""
    if tied_weight is not None and ps.embedding.size > 1:
        if tied_weight.grad is None:
            tied_weight.grad = torch.zeros_like(tied_weight)
        all_reduce_inplace(tied_weight.grad, ps.embedding)
    allreduce_tp_partial_grads(params, ps.tp)


def clip_by_global_norm(inputs: StepInputs, params: list[torch.Tensor]) -> float:
    """Clip every gradient by the norm over all ranks' parameters (each counted once); returns the
    norm before clipping."""
    ps = inputs.ps
    norm = clip_grad_norm_(params, inputs.cfg.clip_grad, norm_reduce_fn=lambda s: all_reduce_sum(s, ps.world),
                           counted=lambda p: counted_in_norm(p, ps))
    return float(norm)


def unscale_grads(params: list[torch.Tensor], unscale: float) -> None:
    """Multiply the gradients by `unscale` (an overflowed inf stays inf, so the norm reports it)."""
    if unscale != 1.0:
        torch._foreach_mul_([p.grad for p in params if p.grad is not None], unscale)


def fp32_master(param: nn.Parameter) -> nn.Parameter:
    """An fp32 copy of a low-precision parameter for the optimizer, with the same metadata (norm
    counting, TP syncs); an fp32 parameter is its own master."""
    if param.dtype == torch.float32:
        return param
    master = nn.Parameter(param.detach().float().clone())
    return set_param_meta(master, **dataclasses.asdict(param_meta(param)))


@dataclass
class ParamState:
    """AdamW's state of elements [start, end) (row-major) of this rank's tensor of one parameter, as
    flat fp32 views: a checkpoint reads and writes them in place, keyed by the parameter, so the
    all-reduce step (whole parameters) and the distributed optimizer (pieces) map to the same keys."""

    param: nn.Parameter  # the model parameter
    start: int
    end: int
    # "exp_avg", "exp_avg_sq", and "master" where fp32 master weights are kept apart from the weights
    tensors: dict[str, torch.Tensor]
    step: torch.Tensor  # AdamW's step count of these elements (0-d)


def adam_state(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> dict[str, torch.Tensor]:
    """`param`'s AdamW state, created as torch's first step would (zero moments, step 0) if it does
    not exist yet, so a checkpoint can be loaded into an optimizer that has not stepped."""
    state = optimizer.state[param]
    if not state:
        group = next(g for g in optimizer.param_groups if any(q is param for q in g["params"]))
        on_device = group.get("fused") or group.get("capturable")
        dtype = torch.float64 if torch.get_default_dtype() == torch.float64 and not group.get("fused") else torch.float32
        state["step"] = torch.zeros((), dtype=dtype, device=param.device if on_device else "cpu")
        state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
    return state


def param_state_of(optimizer: torch.optim.Optimizer, master: torch.Tensor, param: nn.Parameter, start: int,
                   separate_master: bool) -> ParamState:
    """The ParamState of `master` (what AdamW updates) for elements of `param` from `start` on."""
    state = adam_state(optimizer, master)
    tensors = {"exp_avg": state["exp_avg"].view(-1), "exp_avg_sq": state["exp_avg_sq"].view(-1)}
    if separate_master:
        tensors["master"] = master.detach().view(-1)
    return ParamState(param, start, start + master.numel(), tensors, state["step"])


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

    def param_states(self) -> list[ParamState]:
        """AdamW's state of every trainable parameter, whole (the parameters are their own masters)."""
        return [param_state_of(self.optimizer, p, p, 0, False) for p in dict.fromkeys(self.params) if p.requires_grad]

    def finish_state_import(self, masters_loaded: bool) -> None:
        """Nothing to derive: AdamW updates the parameters themselves."""


class BucketedOptimizerStep(AdamWStep):
    """AdamW with gradients in flat buckets reduced from backward hooks: dense ones over DP x CP,
    expert ones over EDP (optim.grad_buffers), then the replica syncs, clipping and the update. With
    low-precision parameters AdamW runs over fp32 masters whose gradients are the fp32 buckets."""

    def __init__(self, inputs: StepInputs, shard: bool = False):
        params = [p for _, p in inputs.named_params]
        # shard: reduce-scatter (the distributed optimizer); the tied embedding then gets a bucket of
        # its own so its slices line up on the first and the last stage.
        own = [inputs.tied_weight] if shard and inputs.tied_weight is not None else []
        # The buckets exist before the optimizer, so its state follows the parameters, not the buffers.
        self.reducers = GradReducers([
            BucketedGradReducer(params, group, bucket_size_mb=inputs.bucket_size_mb, experts=experts, shard=shard,
                                own_bucket=own, grad_dtype=torch.float32)
            for group, experts in ((inputs.ps.dp_cp, False), (inputs.ps.edp, True))])
        if not shard:
            self.master_of = {id(p): self._master(p) for p in params if p.requires_grad}
            self.masters = list(self.master_of.values())
        super().__init__(inputs)

    def _master(self, param: nn.Parameter) -> nn.Parameter:
        master = fp32_master(param)
        if master is not param:
            master.grad = self.reducers.main_grad(param)
        return master

    def _build_optimizer(self) -> torch.optim.Optimizer:
        named = [(name, self.master_of[id(p)]) for name, p in self.inputs.named_params if id(p) in self.master_of]
        return build_optimizer(named, self.inputs.cfg)

    def no_sync(self) -> AbstractContextManager[None]:
        return self.reducers.no_sync()

    def reduce_and_clip(self, unscale: float = 1.0) -> float:
        self.reducers.finish()
        unscale_grads(self.masters, unscale)
        tied = self.inputs.tied_weight
        sync_replicated_grads(self.inputs.ps, self.master_of[id(tied)] if tied is not None else None, self.masters)
        return clip_by_global_norm(self.inputs, self.masters)

    def apply(self, step: int, update: bool) -> float:
        lr = super().apply(step, update)
        if update:
            self._publish_update()
        return lr

    @torch.no_grad()
    def _publish_update(self) -> None:
        """Make the parameters the forward uses hold the updated masters."""
        for p in self.params:
            master = self.master_of.get(id(p), p)
            if master is not p:
                p.copy_(master)

    def zero_grad(self) -> None:
        self.reducers.zero_grad()  # keeps .grad views into the buckets (never set_to_none)

    def master_weights(self) -> list[torch.Tensor]:
        """The fp32 masters kept apart from the parameters (none when the parameters are fp32)."""
        return [m for p in self._trainable() if (m := self.master_of[id(p)]) is not p]

    def param_buffers(self) -> list[torch.Tensor]:
        """Flat buffers the parameters live in (none: each parameter has its own storage)."""
        return []

    def _trainable(self) -> list[nn.Parameter]:
        return [p for p in dict.fromkeys(self.params) if id(p) in self.master_of]

    def param_states(self) -> list[ParamState]:
        """AdamW's state of every trainable parameter, whole (see ParamState)."""
        return [param_state_of(self.optimizer, self.master_of[id(p)], p, 0, self.master_of[id(p)] is not p)
                for p in self._trainable()]

    @torch.no_grad()
    def finish_state_import(self, masters_loaded: bool) -> None:
        """After a checkpoint was read into the parameters and `param_states()`: masters the
        checkpoint did not hold start from the loaded weights, and the weights from the masters."""
        if not masters_loaded:
            for p in self._trainable():
                master = self.master_of[id(p)]
                if master is not p:
                    master.copy_(p)
        self._publish_update()
