"""The flat gradient all-reduce after backward.

The trainer reduces gradients with optim.grad_buffers (bucketed, overlapped with backward);
`allreduce_gradients` is the obviously-correct reference it is tested and benchmarked against.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch

from parallel_state.collectives import all_reduce_grads_coalesced
from parallel_state.groups import AxisGroup


def allreduce_gradients(params: Iterable[torch.nn.Parameter], group: AxisGroup) -> None:
    """Sum gradients over `group` in one flat buffer (a missing grad counts as zeros)."""
    all_reduce_grads_coalesced(params, group)
