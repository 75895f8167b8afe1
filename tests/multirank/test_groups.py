"""Process groups on real gloo ranks (world 8) and on a fake 1024-rank world."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from parallel_state.groups import init
from parallel_state.topology import GROUP_NAMES, Topology
from tests.multirank.harness import fake_world

pytestmark = pytest.mark.xdist_group("rank_pool")

LAYOUTS = [  # world 8; (kwargs, what it exercises)
    {"tp": 2, "pp": 2},
    {"tp": 2, "ep": 8, "etp": 1},  # EP spans all ranks although dp is 4
    {"tp": 2, "cp": 2, "ep": 4, "etp": 1},  # CP folded into EP
    {"tp": 2, "pp": 2, "ep": 2, "etp": 1, "order": "tp-cp-ep-pp-dp"},
    {"tp": 2, "ep": 2},  # etp defaults to tp: expert groups of etp * ep = 4 ranks, edp 2
]


def sum_over_every_group(kwargs: dict) -> dict:
    """On every rank: all-reduce 2**rank over each of its groups; the sum's bits name the members."""
    ps = init(Topology(dist.get_world_size(), **kwargs))
    out = {"first": ps.is_first_stage, "last": ps.is_last_stage}
    for name in GROUP_NAMES:
        axis = ps.axis(name)
        if axis.group is None:  # the rank alone (the embedding group of a middle stage)
            out[name] = {"single": list(axis.ranks), "size": axis.size}
            continue
        x = torch.tensor([2.0 ** dist.get_rank()], dtype=torch.float64)
        dist.all_reduce(x, group=axis.group)
        out[name] = {"mask": int(x.item()), "ranks": list(axis.ranks), "rank": axis.rank, "size": axis.size,
                         "torch_ranks": dist.get_process_group_ranks(axis.group),
                         "torch_rank": dist.get_rank(axis.group)}
    ps.destroy()
    return out


@pytest.mark.parametrize("kwargs", LAYOUTS, ids=lambda k: "-".join(f"{a}{v}" for a, v in k.items()))
def test_all_reduce_sums_exactly_the_listed_ranks(rank_pools, kwargs):
    world = 8
    results = rank_pools.get(world).run(sum_over_every_group, kwargs)
    topo = Topology(world, **kwargs)
    for rank, out in enumerate(results):
        for name in GROUP_NAMES:
            expected = topo.group_of(name, rank)
            if expected is None:  # a middle stage: its embedding group is the rank alone, a real group
                assert name == "embedding" and out[name] == {"single": [rank], "size": 1}
                continue
            got = out[name]
            members = [r for r in range(world) if got["mask"] >> r & 1]
            assert members == expected, (rank, name)
            assert got["ranks"] == got["torch_ranks"] == expected, (rank, name)
            assert got["rank"] == got["torch_rank"] == expected.index(rank), (rank, name)
            assert got["size"] == len(expected)
        pp_coord = topo.coords(rank).pp
        assert out["first"] == (pp_coord == 0) and out["last"] == (pp_coord == topo.pp - 1)


def two_states_interleaved() -> list:
    """Two layouts over the same ranks, used alternately: neither disturbs the other."""
    world = dist.get_world_size()
    a = init(Topology(world, tp=2, pp=2))
    b = init(Topology(world, tp=4, ep=2))
    sums = []
    for ps in (a, b, a, b):
        x = torch.tensor([float(dist.get_rank())])
        dist.all_reduce(x, group=ps.tp.group)
        sums.append(x.item())
    a.destroy()
    x = torch.tensor([1.0])
    dist.all_reduce(x, group=b.ep.group)  # b still works after a is gone
    b.destroy()
    return sums + [x.item()]


def test_two_parallel_states_coexist(rank_pools):
    results = rank_pools.get(8).run(two_states_interleaved)
    for rank, sums in enumerate(results):
        tp2 = float(sum(range(rank - rank % 2, rank - rank % 2 + 2)))
        tp4 = float(sum(range(rank - rank % 4, rank - rank % 4 + 4)))
        assert sums == [tp2, tp4, tp2, tp4, 2.0], rank


# ---------------------------------------------------------------------------------------------
# A 1024-rank world in one process: only membership matters, which the fake backend provides.

def strided(rank: int, stride: int, size: int) -> list[int]:
    """The ranks that differ from `rank` only in the coordinate with this stride and size."""
    base = rank - (rank // stride) % size * stride
    return [base + i * stride for i in range(size)]


def expected_1024(rank: int) -> dict[str, list[int]]:
    """tp8 cp2 pp8 ep16 (dp8, etp8, edp1) in order tp-cp-ep-dp-pp, derived by hand from the strides:
    dense tp 1, cp 8, dp 16, pp 128; expert etp 1, ep 8, pp 128."""
    pp_group = strided(rank, 128, 8)
    return {
        "tp": strided(rank, 1, 8), "cp": strided(rank, 8, 2), "dp": strided(rank, 16, 8), "pp": pp_group,
        "dp_cp": sorted(c for d in strided(rank, 16, 8) for c in strided(d, 8, 2)),
        "tp_dp_cp": strided(rank, 1, 128),
        "mp": sorted(t for p in pp_group for t in strided(p, 1, 8)),
        "ep": strided(rank, 8, 16), "etp": strided(rank, 1, 8), "edp": [rank],
        "etp_ep": strided(rank, 1, 128),
        "embedding": [pp_group[0], pp_group[-1]] if rank in (pp_group[0], pp_group[-1]) else None,
    }


@pytest.mark.parametrize("rank", [0, 1, 517, 1023])
def test_fake_world_1024_membership(rank):
    topo = Topology(1024, tp=8, cp=2, pp=8, ep=16)
    with fake_world(rank, 1024):
        ps = init(topo)
        for name, expected in expected_1024(rank).items():
            axis = ps.axis(name)
            if expected is None:  # a middle stage's embedding group: the rank alone
                assert axis.ranks == (rank,) and axis.size == 1 and axis.group is None, name
                continue
            assert list(axis.ranks) == expected, name
            assert dist.get_process_group_ranks(axis.group) == expected, name
            assert dist.get_rank(axis.group) == expected.index(rank) == axis.rank, name
            assert dist.get_world_size(axis.group) == len(expected), name
        assert ps.is_first_stage == (rank < 128) and ps.is_last_stage == (rank >= 896)
        ps.destroy()
