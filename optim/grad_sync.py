"""The flat gradient all-reduce after backward.

The trainer reduces gradients with optim.grad_buffers (bucketed, overlapped with backward);
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
