"""Which rank holds which coordinate: the 5D layout with MoE parallel folding, as pure arithmetic.

Two grids cover the same ranks. The dense grid has axes (tp, cp, dp, pp); the expert grid has axes
(etp, ep, edp, pp), with edp = world / (etp * ep * pp). Both are laid out by one order string that
lists axes fastest-varying first (Megatron-Core's RankGenerator rule): a rank's number is the sum of
its coordinates times the running products of the sizes before them. The dense grid reads the order
with ep taken as 1; the expert grid reads it with cp taken as 1, tp as etp and dp as edp. A group
over a set of axes is the set of ranks that differ only on those axes. The two grids must agree on
the pipeline groups, otherwise a pipeline stage would hold dense layers of one stage and expert
layers of another.

An outer optimizer (CO2, local SGD, DiLoCo; optim/outer) splits the data-parallel ranks into
`workers` blocks of contiguous ranks: the worker axis is the slowest-varying one (like a node), and
inside each block the layout above repeats with dp / workers data-parallel ranks. Every dense and
expert group then lies inside one worker (synchronous DP or ZeRO-1 within it); the `outer` groups
join the ranks at the same place in every worker (they average the workers' parameters). With one
worker nothing changes: no axis is added and the worker groups are the world and single ranks.

Nothing here touches torch.distributed; parallel_state.groups turns these lists into process groups.
"""
from __future__ import annotations

from dataclasses import dataclass

from parallel_state.config import ParallelConfig
from parallel_state.errors import ConfigError

ORDER_AXES = ("tp", "cp", "ep", "dp", "pp")  # the names an order string is made of
DEFAULT_ORDER = "tp-cp-ep-dp-pp"  # Megatron-Core's default
# The two orders the trainer accepts; any permutation of ORDER_AXES is laid out correctly here.
STANDARD_ORDERS = ("tp-cp-ep-dp-pp", "tp-cp-ep-pp-dp")

# Group name -> (grid, axes the group spans). Every process group of the trainer comes from these
# tables (docs/loss_and_layout.md, "Rank layout").
DENSE_GROUPS = {
    "tp": ("tp",),
    "cp": ("cp",),
    "dp": ("dp",),
    "pp": ("pp",),
    "dp_cp": ("cp", "dp"),  # dense gradient reduction
    "tp_cp": ("tp", "cp"),
    "tp_dp_cp": ("tp", "cp", "dp"),  # everything within one pipeline stage
    "mp": ("tp", "pp"),  # model parallel: one model replica's weights
}
EXPERT_GROUPS = {
    "ep": ("ep",),
    "etp": ("etp",),
    "edp": ("edp",),  # expert gradient reduction
    "etp_ep": ("etp", "ep"),  # token dispatch spans expert tensor and expert parallel ranks
    "etp_ep_pp": ("etp", "ep", "pp"),  # expert model parallel: one replica of the expert weights
}
# Every name `Topology.groups` answers, in the order process groups are created on every rank.
GROUP_NAMES = tuple(DENSE_GROUPS) + ("embedding",) + tuple(EXPERT_GROUPS)
WORKER_AXIS = "worker"
# The groups of an outer optimizer's workers (created only when there is more than one worker).
WORKER_GROUPS = {
    "worker": ("tp", "cp", "dp", "pp"),  # every rank of one worker (its inner optimizer's world)
    "outer": (WORKER_AXIS,),  # the same place in every worker: the outer average
}


def divisors(n: int) -> list[int]:
    """The positive divisors of n, ascending (the candidate sizes of an axis)."""
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class Grid:
    """Named axes with sizes, fastest-varying first; rank = sum(coord_i * prod(size_j, j < i))."""

    names: tuple[str, ...]
    sizes: tuple[int, ...]

    @property
    def world_size(self) -> int:
        total = 1
        for s in self.sizes:
            total *= s
        return total

    def coords(self, rank: int) -> dict[str, int]:
        out = {}
        for name, size in zip(self.names, self.sizes):
            out[name] = rank % size
            rank //= size
        return out

    def rank(self, coords: dict[str, int]) -> int:
        rank, stride = 0, 1
        for name, size in zip(self.names, self.sizes):
            c = coords.get(name, 0)
            if not 0 <= c < size:
                raise ValueError(f"coordinate {name}={c} outside [0, {size})")
            rank += c * stride
            stride *= size
        return rank

    def groups(self, axes: tuple[str, ...]) -> list[list[int]]:
        """Ranks that differ only on `axes`; groups ordered by their lowest rank, ranks ascending."""
        unknown = set(axes) - set(self.names)
        if unknown:
            raise ValueError(f"axes {sorted(unknown)} are not on this grid {self.names}")
        fixed = [n for n in self.names if n not in axes]
        by_key: dict[tuple[int, ...], list[int]] = {}
        for r in range(self.world_size):
            c = self.coords(r)
            by_key.setdefault(tuple(c[n] for n in fixed), []).append(r)
        return list(by_key.values())


@dataclass(frozen=True)
class RankCoords:
    """One rank's coordinates on the dense grid (tp, cp, dp, pp) and the expert grid (etp, ep, edp, pp)."""

    rank: int
    tp: int
    cp: int
    dp: int
    pp: int  # the same on both grids (validated)
    etp: int
    ep: int
    edp: int
    worker: int = 0  # the outer optimizer's worker (block of contiguous ranks); dp and edp count inside it

    def as_dict(self) -> dict[str, int]:
        return {"tp": self.tp, "cp": self.cp, "dp": self.dp, "pp": self.pp,
                "etp": self.etp, "ep": self.ep, "edp": self.edp, "worker": self.worker}


def parse_order(order: str) -> tuple[str, ...]:
    """Split an order string such as 'tp-cp-ep-dp-pp'; every axis of ORDER_AXES exactly once."""
    axes = tuple(order.split("-"))
    unknown = [a for a in axes if a not in ORDER_AXES]
    fix = f"use a permutation of {'-'.join(ORDER_AXES)}, e.g. {' or '.join(STANDARD_ORDERS)}"
    if unknown:
        raise ConfigError("parallel.order", order, f"unknown axis {unknown[0]!r} (axes are "
                            f"{', '.join(ORDER_AXES)})", fix)
    repeated = sorted({a for a in axes if axes.count(a) > 1})
    if repeated:
        raise ConfigError("parallel.order", order, f"axis {repeated[0]!r} appears more than once", fix)
    missing = [a for a in ORDER_AXES if a not in axes]
    if missing:
        raise ConfigError("parallel.order", order, f"axis {missing[0]!r} is missing", fix)
    return axes


def check_sizes(world_size: int, tp: int = 1, cp: int = 1, pp: int = 1, ep: int = 1,
                etp: int | None = None, dp: int | None = None) -> None:
    """Raise ConfigError unless the sizes tile `world_size` ranks on both grids.

    Checked in a fixed order so that the first problem a user meets is always the same one; each
    message lists the values that would work for this world size.
    """
    etp = tp if etp is None else etp
    for field, value in (("tp", tp), ("cp", cp), ("pp", pp), ("ep", ep), ("etp", etp)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"parallel.{field}", value, "must be a positive integer", f"set parallel.{field} >= 1")
    if world_size < 1:
        raise ConfigError("world_size", world_size, "must be a positive integer", "launch at least one rank")
    if world_size % pp:
        raise ConfigError("parallel.pp", pp, f"does not divide the world size {world_size}",
                            f"use one of {divisors(world_size)} or launch a multiple of {pp} ranks")
    per_stage = world_size // pp
    if per_stage % cp:
        raise ConfigError("parallel.cp", cp, f"does not divide world / pp = {world_size} / {pp} = {per_stage}",
                            f"use one of {divisors(per_stage)}")
    if per_stage % (tp * cp):
        raise ConfigError("parallel.tp", tp, f"tp * cp = {tp} * {cp} does not divide world / pp = "
                            f"{world_size} / {pp} = {per_stage}",
                            f"use one of {divisors(per_stage // cp)} (the divisors of world / (cp * pp))")
    dense_dp = per_stage // (tp * cp)
    if dp is not None and dp != dense_dp:
        raise ConfigError("parallel.dp", dp, f"tp * cp * dp * pp = {tp * cp * dp * pp} but the world size is "
                            f"{world_size}", f"leave parallel.dp null (it is inferred as {dense_dp})")
    if per_stage % etp:
        raise ConfigError("parallel.etp", etp, f"does not divide tp * cp * dp = world / pp = {per_stage}",
                            f"use one of {divisors(per_stage)}, or null for etp = tp = {tp}")
    if per_stage % (ep * etp):
        raise ConfigError("parallel.ep", ep, f"ep * etp = {ep} * {etp} does not divide tp * cp * dp = "
                            f"{tp} * {cp} * {dense_dp} = {per_stage}",
                            f"with etp={etp} use ep in {divisors(per_stage // etp)}")


def check_workers(world_size: int, workers: int, tp: int = 1, cp: int = 1, pp: int = 1, ep: int = 1,
                  etp: int | None = None, field: str = "optim.co2.workers") -> None:
    """Raise ConfigError unless `workers` blocks of contiguous ranks each hold whole dense and expert
    grids: workers divides dp = world / (tp*cp*pp), and etp*ep*pp divides the ranks of one worker.
    (Run after check_sizes: the sizes tile the world.)"""
    etp = tp if etp is None else etp
    if not isinstance(workers, int) or workers < 1:
        raise ConfigError(field, workers, "must be a positive integer", f"set {field} >= 1 (1: no outer optimizer)")
    dp = world_size // (tp * cp * pp)
    if dp % workers:
        raise ConfigError(field, workers, f"does not divide dp = world / (tp * cp * pp) = {world_size} / "
                          f"({tp} * {cp} * {pp}) = {dp}: each worker needs the same number of data-parallel ranks",
                          f"use one of {divisors(dp)}, or launch a multiple of {workers * tp * cp * pp} ranks")
    block = world_size // workers
    if block % (etp * ep * pp):
        raise ConfigError(field, workers, f"a worker of {block} ranks cannot hold the expert grid: etp * ep * pp = "
                          f"{etp} * {ep} * {pp} = {etp * ep * pp} does not divide it",
                          f"use workers in {[w for w in divisors(dp) if (world_size // w) % (etp * ep * pp) == 0]}, "
                          "or a smaller parallel.ep")


class Topology:
    """The rank layout of one job: group lists and coordinates on the dense and expert grids.

    `Topology(world_size, tp, cp, pp, ep, etp=None, order, workers=1)` with etp=None meaning etp = tp.
    Derived sizes: dp = world / (tp*cp*pp) and edp = world / (etp*ep*pp), the data-parallel widths of
    the whole job; with `workers` > 1 (an outer optimizer) each worker, a block of world / workers
    contiguous ranks, holds dp / workers of them (`worker_dp`, `worker_edp`: the sizes of the dp and
    edp groups). Raises ConfigError for sizes that do not tile the world (or a worker), a bad order
    string, or expert pipeline groups that differ from the dense ones.
    """

    def __init__(self, world_size: int, tp: int = 1, cp: int = 1, pp: int = 1, ep: int = 1,
                 etp: int | None = None, order: str = DEFAULT_ORDER, workers: int = 1):
        axes = parse_order(order)
        check_sizes(world_size, tp=tp, cp=cp, pp=pp, ep=ep, etp=etp)
        check_workers(world_size, workers, tp=tp, cp=cp, pp=pp, ep=ep, etp=etp, field="workers")
        self.world_size, self.tp, self.cp, self.pp, self.ep = world_size, tp, cp, pp, ep
        self.etp = tp if etp is None else etp
        self.order = order
        self.workers = workers
        self.dp = world_size // (tp * cp * pp)
        self.edp = world_size // (self.etp * ep * pp)
        self.worker_dp, self.worker_edp = self.dp // workers, self.edp // workers
        dense_sizes = {"tp": tp, "cp": cp, "ep": 1, "dp": self.worker_dp, "pp": pp}
        expert_sizes = {"tp": self.etp, "cp": 1, "ep": ep, "dp": self.worker_edp, "pp": pp}
        expert_names = {"tp": "etp", "cp": "cp", "ep": "ep", "dp": "edp", "pp": "pp"}
        # The worker axis is the slowest-varying one, on both grids; absent with one worker.
        outer = ((WORKER_AXIS,), (workers,)) if workers > 1 else ((), ())
        # Axes of size 1 that do not belong to a grid (ep on the dense grid, cp on the expert grid) are
        # dropped; they would contribute a zero coordinate and a factor of 1 anyway.
        self.dense = Grid(tuple(a for a in axes if a != "ep") + outer[0],
                          tuple(dense_sizes[a] for a in axes if a != "ep") + outer[1])
        self.expert = Grid(tuple(expert_names[a] for a in axes if a != "cp") + outer[0],
                           tuple(expert_sizes[a] for a in axes if a != "cp") + outer[1])
        dense_pp, expert_pp = self.dense.groups(("pp",)), self.expert.groups(("pp",))
        if dense_pp != expert_pp:
            raise ConfigError(
                "parallel.order", order,
                f"the expert grid (etp={self.etp}, ep={ep}, edp={self.edp}, pp={pp}) gives pipeline groups "
                f"{_preview(expert_pp)} but the dense grid (tp={tp}, cp={cp}, dp={self.dp}, pp={pp}) gives "
                f"{_preview(dense_pp)}",
                f"put pp last ({DEFAULT_ORDER}), or make {_stride_text(self.expert)} equal "
                f"{_stride_text(self.dense)} (the sizes before pp in the order)")
        self._cache: dict[str, list[list[int]]] = {}

    @staticmethod
    def from_config(pcfg: ParallelConfig, world_size: int, workers: int = 1) -> Topology:
        """The topology of `parallel.*` on `world_size` ranks (an explicit parallel.dp is checked),
        split into `workers` outer-optimizer workers."""
        check_sizes(world_size, tp=pcfg.tp, cp=pcfg.cp, pp=pcfg.pp, ep=pcfg.ep, etp=pcfg.etp, dp=pcfg.dp)
        return Topology(world_size, tp=pcfg.tp, cp=pcfg.cp, pp=pcfg.pp, ep=pcfg.ep, etp=pcfg.etp,
                        order=pcfg.order, workers=workers)

    def with_workers(self, workers: int) -> Topology:
        """This layout split into `workers` blocks of contiguous ranks (the same layout for 1)."""
        if workers == self.workers:
            return self
        return Topology(self.world_size, tp=self.tp, cp=self.cp, pp=self.pp, ep=self.ep, etp=self.etp,
                        order=self.order, workers=workers)

    @property
    def sizes(self) -> tuple:
        """(world_size, tp, cp, pp, ep, etp, order, workers): what defines the layout."""
        return (self.world_size, self.tp, self.cp, self.pp, self.ep, self.etp, self.order, self.workers)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Topology) and self.sizes == other.sizes

    def __hash__(self) -> int:
        return hash(self.sizes)

    def __repr__(self) -> str:
        workers = f", workers={self.workers}, worker_dp={self.worker_dp}" if self.workers > 1 else ""
        return (f"Topology(world_size={self.world_size}, tp={self.tp}, cp={self.cp}, dp={self.dp}, "
                f"pp={self.pp}, ep={self.ep}, etp={self.etp}, edp={self.edp}, order={self.order!r}{workers})")

    def groups(self, name: str) -> list[list[int]]:
        """Every group of one kind (see GROUP_NAMES), ordered by lowest rank, ranks ascending."""
        if name not in self._cache:
            self._cache[name] = self._compute_groups(name)
        return [list(g) for g in self._cache[name]]

    def _compute_groups(self, name: str) -> list[list[int]]:
        if name in DENSE_GROUPS:
            return self.dense.groups(DENSE_GROUPS[name])
        if name in EXPERT_GROUPS:
            return self.expert.groups(EXPERT_GROUPS[name])
        if name == "embedding":
            # The input embedding (first stage) and the output layer (last stage) share weights when
            # tied; with one stage the group is the rank itself.
            return [sorted({g[0], g[-1]}) for g in self.dense.groups(("pp",))]
        if name in WORKER_GROUPS:  # with one worker there is no worker axis: "outer" is each rank alone
            return self.dense.groups(tuple(a for a in WORKER_GROUPS[name] if a in self.dense.names))
        raise KeyError(f"unknown group {name!r}; known: {', '.join(GROUP_NAMES + tuple(WORKER_GROUPS))}")

    def group_of(self, name: str, rank: int) -> list[int] | None:
        """The group of kind `name` that holds `rank` (None for middle stages and 'embedding')."""
        for g in self._cache.get(name) or self.groups(name):
            if rank in g:
                return list(g)
        return None

    def coords(self, rank: int) -> RankCoords:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside [0, {self.world_size})")
        d, e = self.dense.coords(rank), self.expert.coords(rank)
        return RankCoords(rank=rank, tp=d["tp"], cp=d["cp"], dp=d["dp"], pp=d["pp"],
                          etp=e["etp"], ep=e["ep"], edp=e["edp"], worker=d.get(WORKER_AXIS, 0))

    def data_rank(self, rank: int) -> int:
        """Which of the job's dp data-parallel ranks `rank` reads for (worker-major: worker w reads
        the samples of data ranks w * worker_dp ..); its dense dp coordinate with one worker."""
        c = self.coords(rank)
        return c.worker * self.worker_dp + c.dp

    def dense_rank(self, tp: int = 0, cp: int = 0, dp: int = 0, pp: int = 0, worker: int = 0) -> int:
        """The rank at these dense-grid coordinates."""
        return self.dense.rank({"tp": tp, "cp": cp, "dp": dp, "pp": pp, WORKER_AXIS: worker})

    def expert_rank(self, etp: int = 0, ep: int = 0, edp: int = 0, pp: int = 0, worker: int = 0) -> int:
        """The rank at these expert-grid coordinates."""
        return self.expert.rank({"etp": etp, "ep": ep, "edp": edp, "pp": pp, WORKER_AXIS: worker})

    def experts_of(self, rank: int, num_experts: int) -> range:
        """Global expert ids held by `rank`: expert e lives on EP rank e // (num_experts / ep)."""
        if num_experts % self.ep:
            raise ConfigError("model.num_experts", num_experts, f"not divisible by parallel.ep={self.ep}",
                                f"use a multiple of {self.ep}")
        per_rank = num_experts // self.ep
        ep_rank = self.coords(rank).ep
        return range(ep_rank * per_rank, (ep_rank + 1) * per_rank)


def _preview(groups: list[list[int]], limit: int = 4) -> str:
    shown = "".join(str(g) for g in groups[:limit])
    return shown + ("..." if len(groups) > limit else "")


def _stride_text(grid: Grid) -> str:
    """'tp * cp = 4': the product of the sizes laid out before pp, i.e. the pipeline stride."""
    before = grid.names[:grid.names.index("pp")]
    stride = 1
    for n in before:
        stride *= grid.sizes[grid.names.index(n)]
    return f"{' * '.join(before) or '1'} = {stride}"
