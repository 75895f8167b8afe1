"""The mean of a flat tensor over the workers (the `outer` group), launched now, waited for later.

The all-reduce runs asynchronously on a communicator of its own (gloo runs it on its own threads,
NCCL on its own stream), so the inner steps of the next round run while it is in flight: the
trainer's own collectives over the workers (the mean of the per-worker losses) use `ps.outer`
and must neither queue behind a round's average nor interleave with one launched from a thread.
A `SlowLink` (benchmarks, tests) models a slow network between workers: before the data moves, a
background thread sleeps latency + bytes / bandwidth, still without blocking the inner steps.
"""
from __future__ import annotations

import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.distributed as dist

from parallel_state.collectives import all_reduce_inplace
from parallel_state.groups import AxisGroup, ParallelState


@dataclass(frozen=True)
class SlowLink:
    """An injected cost of every collective that crosses workers: `latency_s` plus the bytes over
    `bytes_per_s` (0: unlimited bandwidth)."""

    latency_s: float = 0.0
    bytes_per_s: float = 0.0

    def seconds(self, nbytes: int) -> float:
        return self.latency_s + (nbytes / self.bytes_per_s if self.bytes_per_s > 0 else 0.0)

    def pay(self, nbytes: int) -> None:
        """Block for the link's cost of moving `nbytes`."""
        delay = self.seconds(nbytes)
        if delay > 0:
            time.sleep(delay)


class InFlightAverage:
    """One mean over `group` in flight: `wait()` returns it (the tensor passed in, averaged in place)
    and the seconds the caller was blocked."""

    def __init__(self, buffer: torch.Tensor, group: AxisGroup, link: SlowLink | None,
                 executor: ThreadPoolExecutor | None):
        self.buffer, self.size = buffer, group.size
        if link is None or executor is None:
            self._handle, self._future = all_reduce_inplace(buffer, group, async_op=True), None
        else:
            self._handle, self._future = None, executor.submit(_slow_all_reduce, buffer, group, link)

        self.done = False

    def wait(self) -> tuple[torch.Tensor, float]:
        """The mean (later calls return it again, with 0 s waited)."""
        if self.done:
            return self.buffer, 0.0
        start = time.perf_counter()
        if self._future is not None:
            self._future.result()
        else:
            self._handle.wait()
        waited = time.perf_counter() - start
        self.done = True
        return self.buffer.div_(self.size), waited


def _slow_all_reduce(buffer: torch.Tensor, group: AxisGroup, link: SlowLink) -> None:
    link.pay(buffer.numel() * buffer.element_size())
    all_reduce_inplace(buffer, group)


def own_outer_group(ps: ParallelState) -> AxisGroup:
    """`ps.outer` on a communicator of its own (new_group is collective over the world: every rank
    creates every outer group, in the same order)."""
    if ps.outer.size == 1 or not dist.is_initialized():
        return ps.outer
    mine = None
    for members in ps.topology.groups("outer"):
        group = dist.new_group(members)
        if ps.rank in members:
            mine = group
    return dataclasses.replace(ps.outer, group=mine)


class OuterAverager:
    """Launches means over the workers; with a SlowLink, on one background thread (so the link's
    delay overlaps the inner steps, and launches stay in order)."""

    def __init__(self, group: AxisGroup, link: SlowLink | None = None):
        self.group, self.link = group, link
        self.executor = (ThreadPoolExecutor(max_workers=1, thread_name_prefix="outer-average")
                         if link is not None and group.size > 1 else None)

    def launch(self, buffer: torch.Tensor) -> InFlightAverage:
        """Start averaging `buffer` (contiguous; it must not be touched until wait())."""
        return InFlightAverage(buffer, self.group, self.link, self.executor)

    def average(self, buffer: torch.Tensor) -> tuple[torch.Tensor, float]:
        """The mean now (synchronous outer optimizers), and the seconds it took."""
        return self.launch(buffer).wait()
