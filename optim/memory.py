"""Bytes per parameter of model state: the analytic figures and what a rank really holds.

Analytic (Megatron-LM's table, d = data-parallel ranks the optimizer is sharded over):

    fp32                       4 weights + 4 grads + 8 Adam moments   = 16
    fp32, distributed          4 + 4 + 8/d                            = 8 + 8/d
    bf16 + fp32 master         2 + 4 + 4 master + 8 moments           = 18
    bf16, distributed          2 + 4 + 12/d                           = 6 + 12/d

`measured_state_bytes` counts the tensors an optimizer step holds on its rank for the model shard:
parameter and gradient storage, optimizer state, separate master copies; bucket padding is reported
apart.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from optim.step import BucketedOptimizerStep

WEIGHT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def analytic_bytes_per_param(precision: str, distributed: bool, d: int = 1) -> float:
    """Bytes of weights + gradients + optimizer state per parameter (see the module docstring)."""
    if precision not in WEIGHT_BYTES:
        raise ValueError(f"precision={precision!r}: one of {', '.join(WEIGHT_BYTES)}")
    if d < 1:
        raise ValueError(f"d={d}: the number of ranks must be >= 1")
    weights, grads = WEIGHT_BYTES[precision], 4
    # fp32 master weights: the parameters themselves in fp32, a separate copy for 2-byte weights.
    optimizer = 8 if weights == 4 else 12
    return weights + grads + (optimizer / d if distributed else optimizer)


@dataclass
class StateBytes:
    """What one rank holds for its model shard."""

    params: int  # parameters of this rank's model shard (each counted once)
    weights: int  # bytes of their values
    grads: int  # bytes of their gradients (fp32 main gradients; buffer padding excluded)
    optimizer: int  # bytes of optimizer state tensors (moments; the step counters excluded)
    masters: int  # bytes of master weights kept apart from the parameters
    padding: int  # bytes of bucket padding (gradient and parameter buffers)

    @property
    def per_param(self) -> float:
        return (self.weights + self.grads + self.optimizer + self.masters) / max(self.params, 1)


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def measured_state_bytes(step: BucketedOptimizerStep, unstepped: bool = False) -> StateBytes:
    """Count the state tensors a bucketed optimizer step (plain or distributed) holds on this rank.

    `unstepped`: AdamW has not stepped yet (launch/memory.py builds the step on the meta device and
    never runs it), so its moments are counted as what its first step allocates: two fp32 tensors
    shaped like each parameter it updates (the masters, or this rank's shard pieces)."""
    params = list({id(p): p for p in step.params if p.requires_grad}.values())
    grads = [step.reducers.main_grad(p) for p in params]
    grad_buffers = [b.buffer for r in step.reducers.reducers for b in r.buckets]
    param_buffers = step.param_buffers()
    padding = _nbytes(grad_buffers) - _nbytes(grads)
    if param_buffers:
        padding += _nbytes(param_buffers) - _nbytes(params)
    if unstepped:
        optim_bytes = 2 * 4 * sum(q.numel() for group in step.optimizer.param_groups for q in group["params"])
    else:
        optim_bytes = sum(t.numel() * t.element_size() for state in step.optimizer.state.values()
                          for key, t in state.items() if torch.is_tensor(t) and key != "step")
    return StateBytes(sum(p.numel() for p in params), _nbytes(params), _nbytes(grads), optim_bytes,
                      _nbytes(step.master_weights()), padding)
