"""Bytes per parameter of model state: the analytic figures and what a rank really holds.

Analytic (Megatron-LM's table, d = data-parallel ranks the optimizer is sharded over):

    fp32                       4 weights + 4 grads + 8 Adam moments   = 16
    fp32, distributed          4 + 4 + 8/d                            = 8 + 8/d
    bf16 + fp32 master         2 + 4 + 4 master + 8 moments           = 18
    bf16, distributed          2 + 4 + 12/d                           = 6 + 12/d

`measured_state_bytes` counts the tensors a rank holds for its model shard: parameter and
gradient storage, optimizer state, separate master copies; bucket padding is reported apart.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

WEIGHT_BYTES = {"fp32": 4, "bf16": 2}


def analytic_bytes_per_param(precision: str, distributed: bool, d: int = 1) -> float:
    """Bytes of weights + gradients + optimizer state per parameter (see the module docstring)."""
    if precision not in WEIGHT_BYTES:
        raise ValueError(f"precision={precision!r}: one of {', '.join(WEIGHT_BYTES)}")
    if d < 1:
        raise ValueError(f"d={d}: the number of ranks must be >= 1")
    weights, grads = WEIGHT_BYTES[precision], 4
    # fp32 master weights: the parameters themselves in fp32, a separate copy in bf16.
    optimizer = 8 if precision == "fp32" else 12
    return weights + grads + (optimizer / d if distributed else optimizer)


@dataclass
class StateBytes:
    """What one rank holds for its model shard."""

    params: int  # parameters of this rank's model shard (each counted once)
    weights: int  # bytes of their values
    grads: int  # bytes of their gradients (buffer padding excluded)
    optimizer: int  # bytes of optimizer state tensors (moments; the step counters excluded)
    masters: int  # bytes of master weights kept apart from the parameters
    padding: int  # bytes of bucket padding (gradient and parameter buffers)

    @property
    def per_param(self) -> float:
        return (self.weights + self.grads + self.optimizer + self.masters) / max(self.params, 1)


def _unique(tensors) -> list[torch.Tensor]:
    seen, out = set(), []
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def measured_state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                         grad_buffers: list[torch.Tensor] | None = None,
                         separate_masters: list[torch.Tensor] | None = None) -> StateBytes:
    """Count the state tensors `model` and `optimizer` hold on this rank.

    grad_buffers: flat gradient buckets (their extra elements beyond the parameters are padding);
    separate_masters: master weights that are not the parameters' own storage.
    """
    params = _unique(p for p in model.parameters() if p.requires_grad)
    numel = sum(p.numel() for p in params)
    weights = sum(p.numel() * p.element_size() for p in params)
    grads = sum(p.numel() * (p.grad.element_size() if p.grad is not None else 0) for p in params)
    padding = 0
    if grad_buffers:
        held = sum(b.numel() * b.element_size() for b in grad_buffers)
        padding = held - grads
    optim_bytes = sum(t.numel() * t.element_size() for state in optimizer.state.values()
                      for key, t in state.items() if torch.is_tensor(t) and key != "step")
    masters = sum(t.numel() * t.element_size() for t in (separate_masters or []))
    return StateBytes(numel, weights, grads, optim_bytes, masters, padding)
