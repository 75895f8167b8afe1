"""Forward-backward schedules over the microbatches of one global batch.

The loss contract (SPECS.md): each microbatch backpropagates its *sum* of token losses divided by
the number of loss tokens in the whole global batch (all microbatches, all DP and CP ranks), so the
accumulated gradient is the same for every microbatch split and layout. Pipeline schedules (1F1B,
interleaved) join this module with the pipeline issue.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext

import torch

LossSumFn = Callable[[dict], torch.Tensor]


def forward_backward_no_pipelining(loss_sum_fn: LossSumFn, microbatches: Sequence[dict],
                                   num_loss_tokens: torch.Tensor | float, forward_only: bool = False,
                                   no_sync: Callable[[], AbstractContextManager] = nullcontext) -> torch.Tensor:
    """Run every microbatch forward (and backward); return the detached sum of their token losses.

    `loss_sum_fn(microbatch)` returns the microbatch's sum of masked token losses (a scalar).
    Every backward but the last runs under `no_sync()`, so the gradient reduction (launched from
    backward hooks) communicates once per step, overlapped with the last microbatch's backward.
    """
    total = torch.zeros((), dtype=torch.float32)
    for i, microbatch in enumerate(microbatches):
        if forward_only:
            with torch.no_grad():
                loss_sum = loss_sum_fn(microbatch)
        else:
            with no_sync() if i < len(microbatches) - 1 else nullcontext():
                loss_sum = loss_sum_fn(microbatch)
                (loss_sum / num_loss_tokens).backward()
        total = total.to(loss_sum.device) + loss_sum.detach().float()
    return total
