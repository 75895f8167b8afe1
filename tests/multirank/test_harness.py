"""The rank pool's failure modes: exceptions come back with their rank, hangs come back with stacks."""
from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

from tests.multirank.harness import RankError, RankTimeoutError

pytestmark = pytest.mark.xdist_group("rank_pool")


def rank_and_world(offset: int) -> tuple[int, int]:
    return dist.get_rank() + offset, dist.get_world_size()


def fail_on(bad_rank: int) -> int:
    if dist.get_rank() == bad_rank:
        raise ValueError(f"bad value on purpose on rank {bad_rank}")
    return dist.get_rank()


def fail_while_others_wait(bad_rank: int) -> None:
    if dist.get_rank() == bad_rank:
        raise KeyError("missing on purpose")
    dist.barrier()  # never completes: bad_rank is gone


def sleep_on(slow_rank: int, seconds: float) -> None:
    if dist.get_rank() == slow_rank:
        time.sleep(seconds)
    dist.all_reduce(torch.ones(1))


class Unpicklable(Exception):
    def __init__(self, a, b):  # pickles as Unpicklable(message) and fails to rebuild
        super().__init__(f"{a}/{b}")


def raise_unpicklable() -> None:
    raise Unpicklable("x", "y")


def test_results_are_indexed_by_rank(rank_pools):
    assert rank_pools.get(4).run(rank_and_world, 10) == [(10, 4), (11, 4), (12, 4), (13, 4)]


def test_exception_names_its_rank(rank_pools):
    pool = rank_pools.get(4)
    with pytest.raises(ValueError, match="bad value on purpose on rank 3") as info:
        pool.run(fail_on, 3)
    assert "raised on rank 3 of 4 in fail_on" in info.value.__notes__[0]
    assert "fail_on" in str(info.value.__cause__) and "rank 3" in str(info.value.__cause__)
    assert pool.run(rank_and_world, 0)[3] == (3, 4)  # the pool survives: no rank was left waiting


def test_exception_while_others_block_closes_the_pool(rank_pools):
    pool = rank_pools.get(4)
    start = time.monotonic()
    with pytest.raises(KeyError) as info:
        pool.run(fail_while_others_wait, 1)
    assert time.monotonic() - start < 20
    notes = "\n".join(info.value.__notes__)
    assert "raised on rank 1 of 4" in notes and "ranks [0, 2, 3] were still running" in notes
    assert "fail_while_others_wait" in notes  # the blocked ranks' stacks
    assert pool.closed and not rank_pools.get(4).closed


def test_hang_fails_with_every_rank_stack(rank_pools):
    pool = rank_pools.get(4)
    start = time.monotonic()
    with pytest.raises(RankTimeoutError) as info:
        pool.run(sleep_on, 2, 60.0, timeout_s=3.0)
    assert time.monotonic() - start < 15
    stacks = info.value.stacks
    assert sorted(stacks) == [0, 1, 2, 3]
    assert "sleep_on" in stacks[2]
    assert all("all_reduce" in stacks[r] or "sleep_on" in stacks[r] for r in (0, 1, 3))
    assert "ranks [0, 1, 2, 3] of 4 did not finish within 3 s" in str(info.value)
    assert pool.closed
    assert rank_pools.get(4).run(rank_and_world, 0)[0] == (0, 4)  # a fresh pool replaces it


def test_unpicklable_exception_becomes_rank_error(rank_pools):
    with pytest.raises(RankError, match="Unpicklable: x/y"):
        rank_pools.get(2).run(raise_unpicklable)
