"""Fixtures for tests that run on several gloo ranks (see tests/multirank/harness.py)."""
from __future__ import annotations

import pytest

from tests.multirank.harness import RankPools


@pytest.fixture(scope="session")
def rank_pools():
    """Live rank pools by world size, shared by every tests/multirank module of this pytest process.

    `rank_pools.get(8).run(fn, *args)` runs a module-level `fn` on 8 ranks. A pool that failed with
    a timeout is replaced on the next `get`.
    """
    pools = RankPools()
    yield pools
    pools.close()
