"""torch.distributed process groups for a Topology, held by an explicit ParallelState object.

`init(topology)` creates every group of every kind on every rank in one fixed order (a collective
requirement of `new_group`) and returns a ParallelState; nothing is stored in module globals, so
two ParallelStates (e.g. two layouts in one test) can live in one process.
"""
from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from parallel_state.comm_stats import CommStats
from parallel_state.topology import GROUP_NAMES, WORKER_GROUPS, RankCoords, Topology


@dataclass(frozen=True)
class AxisGroup:
    """This rank's group along one axis (or set of axes): the process group, its members and our place.

    The only group type: every collective, layer and context takes one. A group of one rank is a
    real AxisGroup too (`AxisGroup.single`), on which every collective is the identity; None is
    never a group.
    """

    name: str  # group kind (one of topology.GROUP_NAMES, or "world"); labels its bytes in CommStats
    group: Any  # torch ProcessGroup; None for a group of one rank (nothing is ever sent on it)
    ranks: tuple[int, ...]  # global ranks of the members, ascending
    rank: int  # this rank's index in `ranks` (its rank within the group)
    # Receives the bytes every collective on this group sends (one CommStats for all the groups of a
    # ParallelState); None counts nothing.
    stats: CommStats | None = field(default=None, compare=False, repr=False)

    @property
    def size(self) -> int:
        return len(self.ranks)

    @classmethod
    def single(cls, name: str, global_rank: int = 0, stats: CommStats | None = None) -> AxisGroup:
        """A group of this rank alone (no parallelism along the axis)."""
        return cls(name=name, group=None, ranks=(global_rank,), rank=0, stats=stats)


@dataclass(frozen=True)
class ParallelState:
    """One rank's view of a parallel layout: an AxisGroup per group kind plus its coordinates.

    Axes: tp, cp, dp, pp, dp_cp, tp_cp, tp_dp_cp, mp (dense grid), ep, etp, edp, etp_ep, etp_ep_pp
    (expert grid), embedding (the first and last pipeline stage; on middle stages, which hold
    neither the input embedding nor the output layer, the rank alone), world (every rank), and an
    outer optimizer's worker (every rank of this rank's worker; the world with one worker) and outer
    (this rank's counterparts in every worker; the rank alone with one worker). With several workers
    every other group lies inside one worker.
    """

    topology: Topology
    coords: RankCoords
    tp: AxisGroup
    cp: AxisGroup
    dp: AxisGroup
    pp: AxisGroup
    dp_cp: AxisGroup
    tp_cp: AxisGroup
    tp_dp_cp: AxisGroup
    mp: AxisGroup
    embedding: AxisGroup
    ep: AxisGroup
    etp: AxisGroup
    edp: AxisGroup
    etp_ep: AxisGroup
    etp_ep_pp: AxisGroup
    world: AxisGroup  # every rank (the default group): grad-norm and metric sums
    worker: AxisGroup  # every rank of this rank's outer-optimizer worker
    outer: AxisGroup  # the ranks at this rank's place in every worker (the outer average)
    stats: CommStats  # the bytes sent on every group of this state (each AxisGroup holds it)
    owned_groups: tuple = ()  # process groups this state created (destroy() releases them)

    @property
    def rank(self) -> int:
        return self.coords.rank

    @property
    def world_size(self) -> int:
        return self.topology.world_size

    @property
    def is_first_stage(self) -> bool:
        """Whether this rank is on the first pipeline stage (holds the input embedding)."""
        return self.pp.rank == 0

    @property
    def is_last_stage(self) -> bool:
        """Whether this rank is on the last pipeline stage (holds the output layer and the loss)."""
        return self.pp.rank == self.pp.size - 1

    @property
    def data_rank(self) -> int:
        """Which of the job's data-parallel ranks this rank reads for (its dp rank with one worker)."""
        return self.topology.data_rank(self.rank)

    @property
    def data_size(self) -> int:
        """How many data-parallel ranks the job's global batch is split over (all workers')."""
        return self.topology.dp

    def axis(self, name: str) -> AxisGroup:
        """The AxisGroup of kind `name` (see topology.GROUP_NAMES and WORKER_GROUPS)."""
        if name not in GROUP_NAMES and name not in WORKER_GROUPS:
            raise KeyError(f"unknown group {name!r}; known: {', '.join(GROUP_NAMES + tuple(WORKER_GROUPS))}")
        return getattr(self, name)

    def within_worker(self) -> ParallelState:
        """This state as the inner optimizer of an outer one sees it: its worker is the whole world
        (sums over "every rank", such as the global grad norm, stay inside the worker)."""
        if self.outer.size == 1:
            return self
        return dataclasses.replace(self, world=dataclasses.replace(self.worker, name="world"))

    def destroy(self) -> None:
        """Release the process groups this state created (the default group stays)."""
        for g in self.owned_groups:
            dist.destroy_process_group(g)


def default_backend(device: torch.device | str | None) -> str | None:
    """nccl for CUDA tensors (plus gloo for the small CPU ones: token counts, loss sums) on a CUDA
    device, gloo on a CPU one; None (inherit the default group's) for no device."""
    if device is None:
        return None
    return "cpu:gloo,cuda:nccl" if torch.device(device).type == "cuda" else "gloo"


def init(topology: Topology, backend: str | None = None, device: torch.device | str | None = None,
         timeout_s: float | None = None, stats: CommStats | None = None) -> ParallelState:
    """Create every group of `topology` and return this rank's ParallelState.

    Every group counts the bytes its collectives send in `stats` (a new CommStats when None).

    Every rank of the default group must call this with the same topology. `backend` defaults to
    the device's (nccl on CUDA, gloo on CPU) or, with no device, the default group's backend (so a
    `fake` world gets fake groups). Groups with identical members are created once and shared
    between kinds (e.g. dp and edp when etp*ep = tp*cp), which saves communicators. A one-rank job
    without torch.distributed gets groups of one rank (group=None) everywhere.
    """
    if backend is None:
        backend = default_backend(device)
    if not dist.is_initialized():
        if topology.world_size != 1:
            raise RuntimeError(f"parallel_state.init: torch.distributed is not initialized but the topology "
                               f"has {topology.world_size} ranks; call init_process_group first")
        return _build(topology, rank=0, make_group=lambda ranks: None, stats=stats)
    world = dist.get_world_size()
    if world != topology.world_size:
        raise RuntimeError(f"parallel_state.init: the default group has {world} ranks but the topology "
                           f"needs {topology.world_size}: {topology}")
    timeout = None if timeout_s is None else datetime.timedelta(seconds=timeout_s)
    rank = dist.get_rank()
    created: dict[tuple[int, ...], Any] = {}
    mine: dict[tuple[int, ...], Any] = {}
    # Every rank walks the same kinds and groups in the same order: new_group is collective over the
    # default group even for ranks outside the new group.
    # The worker groups exist only with several workers (with one, "worker" is the world itself).
    names = GROUP_NAMES + (tuple(WORKER_GROUPS) if topology.workers > 1 else ())
    for name in names:
        for members in topology.groups(name):
            key = tuple(members)
            if key in created:
                continue
            created[key] = dist.new_group(members, timeout=timeout, backend=backend)
            if rank in members:
                mine[key] = created[key]
    return _build(topology, rank=rank, make_group=lambda ranks: mine[tuple(ranks)], owned=tuple(mine.values()),
                  stats=stats)


def _build(topology: Topology, rank: int, make_group: Callable[[list[int]], Any], owned: tuple = (),
           stats: CommStats | None = None) -> ParallelState:
    stats = stats if stats is not None else CommStats()
    axes: dict[str, AxisGroup] = {}
    for name in GROUP_NAMES:
        members = topology.group_of(name, rank)
        axes[name] = (AxisGroup.single(name, rank, stats) if members is None
                      else AxisGroup(name=name, group=make_group(members), ranks=tuple(members),
                                     rank=members.index(rank), stats=stats))
    world = AxisGroup(name="world", group=dist.group.WORLD if dist.is_initialized() else None,
                      ranks=tuple(range(topology.world_size)), rank=rank, stats=stats)
    for name in WORKER_GROUPS:
        if topology.workers > 1:
            members = topology.group_of(name, rank)
            axes[name] = AxisGroup(name=name, group=make_group(members), ranks=tuple(members),
                                   rank=members.index(rank), stats=stats)
        else:  # no process group of its own: the world, or the rank alone
            axes[name] = (dataclasses.replace(world, name=name) if name == "worker"
                          else AxisGroup.single(name, rank, stats))
    return ParallelState(topology=topology, coords=topology.coords(rank), owned_groups=owned, world=world,
                         stats=stats, **axes)
