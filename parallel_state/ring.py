"""A ring of point-to-point exchanges over one group (context parallelism), and the zigzag layout.

`RingExchange(group)` sends a tensor to the next rank of the group and receives the same
shape from the previous one, asynchronously: `exchange(x)` launches both and returns a
`PendingRecv` whose `wait()` gives the received tensor. Ring attention launches the exchange of
the next K/V block before computing on the current one, so the transfer overlaps the compute.

Byte accounting: each exchange counts the bytes this rank sends as op "send" on the group's
name, e.g. ("send", "cp"), as the pipeline's p2p does (parallel_state/collectives.py `count`). A
group of size 1 exchanges with itself: nothing is sent or counted and `wait()` returns the
tensor given.

The zigzag layout (pure): a sequence of length T is cut into 2*cp chunks and CP rank r holds
chunks r and 2*cp-1-r, so each rank gets one early and one late chunk and causal attention work
is the same on every rank.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from parallel_state.collectives import count, resolve_group
from parallel_state.groups import AxisGroup
from parallel_state.p2p import SEND_OP


def zigzag_chunks(cp_size: int, cp_rank: int) -> tuple[int, int]:
    """The two chunk indices (of 2*cp_size) that CP rank `cp_rank` holds: (r, 2*cp-1-r) (pure)."""
    if cp_size < 1 or not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank={cp_rank} must be in [0, cp_size={cp_size})")
    return cp_rank, 2 * cp_size - 1 - cp_rank


@dataclass
class PendingRecv:
    """A launched exchange: `wait()` completes the send and the receive and returns the received tensor."""

    received: torch.Tensor
    requests: list = field(default_factory=list)

    def wait(self) -> torch.Tensor:
        for request in self.requests:
            request.wait()
        self.requests = []
        return self.received


class RingExchange:
    """Send to the next rank of a group and receive from the previous one (group order, wrapping).

    `group` is an AxisGroup (ParallelState.cp).
    """

    def __init__(self, group: AxisGroup):
        self.comm = comm = resolve_group(group)
        self.size, self.rank, self.group = comm.size, comm.rank, comm.group
        if self.size > 1:
            self.next_peer = comm.ranks[(self.rank + 1) % self.size]
            self.prev_peer = comm.ranks[(self.rank - 1) % self.size]

    def exchange(self, tensor: torch.Tensor, tag: int = 0) -> PendingRecv:
        """Launch: send `tensor` to the next rank, receive a tensor like it from the previous one."""
        if self.size == 1:
            return PendingRecv(tensor)
        tensor = tensor.contiguous()
        received = torch.empty_like(tensor)
        ops = [dist.P2POp(dist.isend, tensor, self.next_peer, self.group, tag),
               dist.P2POp(dist.irecv, received, self.prev_peer, self.group, tag)]
        count(self.comm, SEND_OP, tensor.numel() * tensor.element_size())
        # The send buffer stays referenced by its request until wait().
        # Tags keep two rings in flight (K/V and dK/dV) apart on gloo; NCCL ignores tags, and there
        # every rank posts the two rings' messages in the same order, so they match by order.
        return PendingRecv(received, list(dist.batch_isend_irecv(ops)))
