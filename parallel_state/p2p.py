"""Point-to-point transfers between pipeline neighbours: batched isend/irecv, bytes counted.

Peers are given as ranks *within* the group (pp ranks); the AxisGroup maps them to global ranks.
Every call posts all its operations at once with `dist.batch_isend_irecv` and returns the works
without waiting: the caller waits for receives when it needs the data and for sends before it
reuses or frees their buffers.

Message matching: no tags are used (NCCL has none), so between two ranks the k-th send of one
meets the k-th receive of the other. Callers must post receives from a peer in the order that
peer posts its sends (trainer/pipeline/executor.py derives that order from the peer's schedule).

Bytes: each send adds its tensor's bytes to the group's CommStats as op "send" on its name ("pp" for
ParallelState.pp). The receiver counts nothing, following comm_stats' "bytes sent by one rank".
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from parallel_state.collectives import count
from parallel_state.groups import AxisGroup

SEND_OP = "send"  # CommStats op label of point-to-point sends





def batch_send_recv(group: AxisGroup, sends: Sequence[tuple[torch.Tensor, int]] = (),
                    recvs: Sequence[tuple[torch.Tensor, int]] = ()) -> list:
    """Post `sends` [(tensor, peer)] and `recvs` [(buffer, peer)] as one batch; return one work
    per operation, sends first (with a coalescing backend they are all the batch's BatchWork).

    Peers are ranks within `group`, never this rank itself (a rank does not message itself; the
    executor hands such tensors over locally). Tensors must be contiguous; receive buffers get
    the data once their work has been waited for.
    """
    ops = []
    for tensor, peer in sends:
        _check_peer(group, peer)
        if not tensor.is_contiguous():
            raise ValueError("batch_send_recv: send tensors must be contiguous (call .contiguous())")
        ops.append(dist.P2POp(dist.isend, tensor, group.ranks[peer], group=group.group))
        count(group, SEND_OP, tensor.numel() * tensor.element_size())
    for buffer, peer in recvs:
        _check_peer(group, peer)
        ops.append(dist.P2POp(dist.irecv, buffer, group.ranks[peer], group=group.group))
    if not ops:
        return []
    works = dist.batch_isend_irecv(ops)
    if len(works) == len(ops):  # gloo and other non-coalescing backends: one work per operation
        return works
    # NCCL coalesces the batch into one work (or none): every operation completes with the batch.
    batch = BatchWork(works)
    return [batch] * len(ops)


class BatchWork:
    """The works of one coalesced batch seen as one: done when all of them are."""

    def __init__(self, works: Sequence):
        self.works = list(works)

    def wait(self) -> bool:
        for w in self.works:
            w.wait()
        return True

    def is_completed(self) -> bool:
        return all(w.is_completed() for w in self.works)


def _check_peer(group: AxisGroup, peer: int) -> None:
    if not 0 <= peer < group.size or peer == group.rank:
        raise ValueError(f"p2p peer {peer} is not another rank of the {group.name} group "
                         f"(size {group.size}, this rank {group.rank})")
