"""Plain collectives of the training step: small sums (token counts, loss sums) and the flat
gradient all-reduce.

The trainer reduces gradients with trainer.grad_reducer (bucketed, overlapped with backward);
`allreduce_gradients` is the obviously-correct reference it is tested and benchmarked against.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist

from parallel_state.collectives import all_reduce_grads_coalesced


def allreduce_gradients(params: Iterable[torch.nn.Parameter], group: dist.ProcessGroup | None = None) -> None:
    """Sum gradients over `group` in one flat buffer (a missing grad counts as zeros)."""
    all_reduce_grads_coalesced(params, group)


def allreduce_sum(value: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Sum a small tensor (token counts, loss sums) over `group`; identity on one process."""
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM, group=group)
    return value
