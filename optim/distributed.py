"""The distributed optimizer (ZeRO-1, Megatron's DistributedOptimizer semantics), as an OptimizerStep.

Gradients live in the same contiguous buckets as the default step (backward order, launched from
backward hooks as they fill), padded to a multiple of the group size and reduce-scattered instead
of all-reduced: dense ones over dp x cp, expert ones over edp. The parameters are moved into flat
buffers with the same layout, so rank r's slice of a parameter buffer is its part of the weights.
With fp32 parameters that slice is the master itself (no copy: 4 + 4 + 8/d bytes per parameter);
with bf16/fp16 parameters the rank keeps an fp32 master copy of its slice alone (2 + 4 + 12/d). For
its slice the rank keeps the Adam moments, as "pieces" (one per parameter the slice touches, so each
piece joins its parameter's weight-decay group). After the update the masters are copied into the
slices and every bucket's slices are all-gathered back into the parameter buffer.

The gradient syncs of replicated parameters work on the slices: TP ranks hold identical bucket
layouts, so a TP-partial parameter's slice is summed over TP; the tied embedding gets a bucket
of its own on the first and the last stage, so its slices match and are summed over the embedding
group. The global norm sums each piece once (the pieces of a group partition its parameters).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from optim.adamw import adamw_over
from optim.clip import clip_grad_norm_
from optim.grad_buffers import GradBucket
from optim.param_groups import build_param_groups
from optim.step import (
    BucketedOptimizerStep,
    ParamState,
    StepInputs,
    counted_within_replica,
    param_state_of,
    unscale_grads,
)
from parallel_state.collectives import (
    all_gather_async,
    all_reduce_coalesced,
    all_reduce_inplace,
    all_reduce_sum,
)
from parallel_state.groups import AxisGroup
from parallel_state.params import param_meta


@dataclass
class ShardSlot:
    """One bucket as this rank's optimizer sees it."""

    bucket: GradBucket
    group: AxisGroup  # the ranks the bucket is sharded over
    flat: torch.Tensor  # the parameter buffer: every parameter of the bucket is a view into it
    local: torch.Tensor  # this rank's slice of `flat`
    master: torch.Tensor  # fp32 weights of that slice: `local` itself for fp32 parameters, else a copy


@dataclass
class Piece:
    """The part of one parameter inside this rank's slice of a bucket."""

    master: nn.Parameter  # fp32, a view of the bucket's master slice (what AdamW updates)
    param: nn.Parameter  # the model parameter it belongs to
    bucket: GradBucket
    start: int  # offset in this rank's slice of the bucket
    end: int


def _param_buffer(bucket: GradBucket) -> torch.Tensor:
    """A flat buffer laid out like the bucket's gradients; each parameter becomes a view into it."""
    flat = torch.zeros(bucket.buffer.numel(), dtype=bucket.params[0].dtype, device=bucket.buffer.device)
    with torch.no_grad():
        for p, offset in zip(bucket.params, bucket.offsets):
            flat[offset:offset + p.numel()] = p.detach().reshape(-1)
            p.data = flat[offset:offset + p.numel()].view_as(p)
    return flat


class DistributedOptimizerStep(BucketedOptimizerStep):
    """AdamW over this rank's shard of the master weights; see the module docstring."""

    def __init__(self, inputs: StepInputs):
        super().__init__(inputs, shard=True)
        self.pending: dict[int, tuple[torch.Tensor, torch.Tensor, Any]] = {}  # bucket slot -> gather in flight
        self._hooks = self._register_gather_waits(inputs.modules) if inputs.cfg.overlap_param_gather else []

    def _build_optimizer(self) -> torch.optim.Optimizer:
        """Move the parameters into flat buffers, cut this rank's slices into pieces, AdamW over them."""
        self.slots: list[ShardSlot] = []
        self.pieces: list[Piece] = []
        for reducer in self.reducers.reducers:
            rank = reducer.group.rank
            for bucket in reducer.buckets:
                flat = _param_buffer(bucket)
                local = flat[rank * bucket.shard_numel:(rank + 1) * bucket.shard_numel]
                master = local if local.dtype == torch.float32 else local.float()
                self.slots.append(ShardSlot(bucket, reducer.group, flat, local, master))
                self.pieces += self._pieces_of(bucket, master, rank)
        return adamw_over(self._piece_groups(), self.inputs.cfg)

    @staticmethod
    def _pieces_of(bucket: GradBucket, master: torch.Tensor, rank: int) -> list[Piece]:
        lo, hi = rank * bucket.shard_numel, (rank + 1) * bucket.shard_numel
        pieces = []
        for p, offset in zip(bucket.params, bucket.offsets):
            start, end = max(offset, lo), min(offset + p.numel(), hi)
            if start < end:
                pieces.append(Piece(nn.Parameter(master[start - lo:end - lo]), p, bucket, start - lo, end - lo))
        return pieces

    def _piece_groups(self) -> list[dict]:
        """The model's weight-decay groups with each parameter replaced by this rank's pieces of it."""
        by_param: dict[int, list[nn.Parameter]] = {}
        for piece in self.pieces:
            by_param.setdefault(id(piece.param), []).append(piece.master)
        groups = build_param_groups(self.inputs.named_params, self.inputs.cfg)
        for group in groups:
            group["params"] = [m for p in group["params"] for m in by_param.get(id(p), [])]
            group.pop("names", None)
        return groups

    def reduce_and_clip(self, unscale: float = 1.0) -> float:
        self.reducers.finish()
        for piece in self.pieces:
            piece.master.grad = piece.bucket.shard_grad[piece.start:piece.end]
        unscale_grads([piece.master for piece in self.pieces], unscale)
        self._sync_replicated()
        return self._clip()

    def _sync_replicated(self) -> None:
        ps = self.inputs.ps
        all_reduce_coalesced([p.master.grad for p in self.pieces if param_meta(p.param).tp_partial_grad], ps.tp)
        tied = self.inputs.tied_weight
        if tied is not None and ps.embedding.size > 1:
            bucket = next(slot.bucket for slot in self.slots if any(p is tied for p in slot.bucket.params))
            all_reduce_inplace(bucket.shard_grad, ps.embedding)

    def _clip(self) -> float:
        """clip_grad_norm_ over the pieces (the same fp64 sum of per-chunk squares and fp32 coefficient)."""
        # The pieces partition a group's parameters over its ranks: only the TP (ETP) replicas and the
        # tied head copy are left out.
        counted = {id(p.master) for p in self.pieces if counted_within_replica(p.param, self.inputs.ps)}
        masters = [p.master for p in self.pieces]
        norm = clip_grad_norm_(masters, self.inputs.cfg.clip_grad, counted=lambda m: id(m) in counted,
                               norm_reduce_fn=lambda s: all_reduce_sum(s, self.inputs.ps.world))
        return float(norm)

    @torch.no_grad()
    def _publish_update(self) -> None:
        """Copy the updated masters into this rank's slices and all-gather every bucket's slices into
        its parameter buffer (the parameters' storage); with overlap_param_gather they stay in flight
        until a forward needs them."""
        for index, slot in enumerate(self.slots):
            if slot.master is not slot.local:
                slot.local.copy_(slot.master)
            self.pending[index] = (slot.flat, *all_gather_async(slot.local, slot.group))
        if not self._hooks:
            self.finish_param_sync()

    @torch.no_grad()
    def _wait_gather(self, slot: int) -> None:
        flat, full, handle = self.pending.pop(slot)
        handle.wait()
        if full.data_ptr() != flat.data_ptr():
            flat.copy_(full)

    def finish_param_sync(self) -> None:
        for slot in sorted(self.pending):
            self._wait_gather(slot)

    def _register_gather_waits(self, modules: list[nn.Module]) -> list:
        """A forward pre-hook on every module that holds parameters directly: it waits for the
        gathers of the buckets those parameters live in (the first forward use of each)."""
        slot_of = {id(p): index for index, slot in enumerate(self.slots) for p in slot.bucket.params}
        slots_of: dict[nn.Module, set[int]] = {}
        for root in modules:
            for module in root.modules():
                # Parameter containers are never called: their parameters wait in the module that owns
                # the container (e.g. the experts' ParameterDicts in GroupedExperts).
                for child in module.children():
                    if isinstance(child, (nn.ParameterDict, nn.ParameterList)):
                        slots_of.setdefault(module, set()).update(
                            slot_of[id(p)] for p in child.parameters() if id(p) in slot_of)
                own = {slot_of[id(p)] for p in module.parameters(recurse=False) if id(p) in slot_of}
                if own and not isinstance(module, (nn.ParameterDict, nn.ParameterList)):
                    slots_of.setdefault(module, set()).update(own)
        return [module.register_forward_pre_hook(self._waiter(sorted(slots))) for module, slots in slots_of.items()]

    def _waiter(self, slots: list[int]):
        def wait(_module, _args) -> None:
            for slot in slots:
                if slot in self.pending:
                    self._wait_gather(slot)
        return wait

    def master_weights(self) -> list[torch.Tensor]:
        return [slot.master for slot in self.slots if slot.master is not slot.local]

    def param_buffers(self) -> list[torch.Tensor]:
        return [slot.flat for slot in self.slots]

    def param_states(self) -> list[ParamState]:
        """AdamW's state of this rank's pieces: each covers a flat range of its parameter."""
        states = []
        for slot in self.slots:
            lo = slot.group.rank * slot.bucket.shard_numel
            offset_of = {id(p): offset for p, offset in zip(slot.bucket.params, slot.bucket.offsets)}
            for piece in self.pieces:
                if piece.bucket is slot.bucket:
                    start = lo + piece.start - offset_of[id(piece.param)]
                    states.append(param_state_of(self.optimizer, piece.master, piece.param, start,
                                                 slot.master is not slot.local))
        return states

    @torch.no_grad()
    def finish_state_import(self, masters_loaded: bool) -> None:
        """After a checkpoint was read into the parameter buffers and `param_states()`: masters the
        checkpoint did not hold start from the loaded weights; then every rank's slices are gathered."""
        if not masters_loaded:
            for slot in self.slots:
                if slot.master is not slot.local:
                    slot.master.copy_(slot.local)
        self._publish_update()
