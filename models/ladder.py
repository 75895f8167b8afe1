"""The ladder residual: a run of sub-modules where module j reads the stream without module j-1's output.

Sub-modules f_1..f_m (a layer's token mixer then its channel mixer, each with its pre-norm) update
the stream as s_j = s_{j-1} + f_j(s_{j-2}), with s_{-1} := s_0 (the run's input); the result is
s_m. Because f_j does not need f_{j-1}'s output, f_{j-1}'s TP reduction is left in flight while f_j
computes (docs/ladder.md has the semantics and what overlaps in forward and backward).

How the overlap is arranged:
- Forward: a mixer's output projection defers its reduction (RowParallelLinear.defer_output_reduction)
  and returns a PendingTensor; it is waited on after the next module's forward has been issued.
- Backward: each module enters its TP region through `enter_tp_region_deferred_grad`, whose
  backward only launches the reduction of the module's input gradient. The gradient is read by the
  `_LadderJoin` node that produced the module's input, which waits first. That node is created in
  forward *before* the previous module's compute, so autograd's engine (which runs the ready node
  created last first) runs the previous module's backward while the reduction is in flight.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from models.decode_cache import DecodeCache
from models.layers.norm import RMSNorm
from models.layers.tensor_parallel import PendingTensor, TPContext, enter_tp_region_deferred_grad


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as models.layers.norm.RMSNorm computes it (fp32 statistics, result in x's dtype)."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (normed * weight.float()).to(x.dtype)


@dataclass
class LadderModule:
    """One sub-module of a ladder run: its pre-norm and its mixer.

    `enters_tp_region`: the mixer is a Column -> Row TP region whose input mapping the run applies
    (deferring its backward reduction) and whose output projection defers its forward reduction;
    False for a mixer that completes its own output (MoE: its token exchange is not a row-parallel
    reduction).
    """

    norm: RMSNorm
    mixer: nn.Module
    reads_positions: bool
    enters_tp_region: bool
    tp: TPContext = field(default_factory=TPContext)


class _LadderJoin(torch.autograd.Function):
    """stream = residual + pending; normed = norm(stream), the next module's input.

    Forward only allocates the outputs: `_JoinSlot.fill` writes them once the pending reduction
    has arrived, which is after the previous module's forward was issued (see the module docstring
    for why the node must exist before that). Backward waits on the next module's input-gradient
    reductions (`grad_handles`), then back-propagates through the norm by recomputing it.
    """

    @staticmethod
    def forward(ctx, residual, pending_buffer, norm_weight, eps, grad_handles, pending):
        ctx.eps, ctx.grad_handles, ctx.pending = eps, grad_handles, pending
        # The pending buffer is read through ctx.pending, not saved: the collective writing it bumps
        # its version counter after this point, which save_for_backward would report as an error.
        ctx.save_for_backward(residual, norm_weight)
        return torch.empty_like(residual), torch.empty_like(residual)

    @staticmethod
    def backward(ctx, grad_stream, grad_normed):
        for handle in ctx.grad_handles:
            handle.wait()
        residual, norm_weight = ctx.saved_tensors
        pending = ctx.pending
        with torch.enable_grad():
            stream = residual if pending is None else residual + pending.as_result(pending.partial_result)
            stream = stream.detach().requires_grad_()
            weight = norm_weight.detach().requires_grad_()
            grad_from_norm, grad_weight = torch.autograd.grad(
                rms_norm(stream, weight, ctx.eps), (stream, weight), grad_normed)
        total = grad_from_norm if grad_stream is None else grad_stream + grad_from_norm
        return total, (None if pending is None else pending.as_buffer(total)), grad_weight, None, None, None


class _JoinSlot:
    """The two outputs of one join, written by `fill` when the pending output has arrived."""

    def __init__(self, residual: torch.Tensor, pending: PendingTensor | None, norm: RMSNorm, grad_handles: list):
        self.residual, self.pending, self.norm = residual, pending, norm
        pending_value = None if pending is None else pending.partial_result
        if torch.is_grad_enabled():
            self.stream, self.normed = _LadderJoin.apply(residual, pending_value, norm.weight, norm.eps,
                                                         grad_handles, pending)
            self.deferred = True
        else:  # nothing to order for backward: compute when filled
            self.deferred = False

    def fill(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(stream, normed), waiting for the pending output first."""
        stream = self.residual if self.pending is None else self.residual + self.pending.wait()
        if not self.deferred:
            return stream, self.norm(stream)
        with torch.no_grad():
            self.stream.copy_(stream)
            self.normed.copy_(rms_norm(stream, self.norm.weight, self.norm.eps))
        return self.stream, self.normed


def _call(module: LadderModule, x: torch.Tensor, position_ids: torch.Tensor | None,
          grad_handles: list, cache: DecodeCache | None) -> PendingTensor:
    if module.enters_tp_region:
        x = enter_tp_region_deferred_grad(x, module.tp.group, module.tp.sp, grad_handles)
    if module.reads_positions:
        out = module.mixer(x, position_ids) if cache is None else module.mixer(x, position_ids, cache=cache)
    else:
        out = module.mixer(x)
    return out if isinstance(out, PendingTensor) else PendingTensor.completed(out)


def run_ladder(modules: Sequence[LadderModule], x: torch.Tensor, position_ids: torch.Tensor | None = None,
               caches: Sequence[DecodeCache | None] | None = None) -> torch.Tensor:
    """s_m of the ladder recurrence over `modules` from s_0 = x; one complete tensor.

    `caches` (decoding, launch/generate.py): one per module, handed to the token mixers.
    """
    if not modules:
        return x
    grad_handles: list = []
    residual, normed = _JoinSlot(x, None, modules[0].norm, grad_handles).fill()
    pending: PendingTensor | None = None
    for index, module in enumerate(modules):
        cache = None if caches is None else caches[index]
        following = modules[index + 1] if index + 1 < len(modules) else None
        next_handles: list = []
        # Created before this module's compute, so that its backward runs after that compute's.
        join = _JoinSlot(residual, pending, following.norm, next_handles) if following is not None else None
        out = _call(module, normed, position_ids, grad_handles, cache)
        if join is not None:
            residual, normed = join.fill()
        elif pending is not None:
            residual = residual + pending.wait()
        pending, grad_handles = out, next_handles
    return residual + pending.wait()
