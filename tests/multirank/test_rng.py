"""Random streams on 8 gloo ranks: dropout masks agree exactly where the weights are replicated."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from parallel_state.groups import init
from parallel_state.rng import STREAM_AXES, RNGStreams
from parallel_state.topology import Topology

pytestmark = pytest.mark.xdist_group("rank_pool")

LAYOUT = {"tp": 2, "pp": 2, "ep": 2, "etp": 1}  # world 8: dp 2, edp 2


def gather_dropout_masks(seed: int) -> dict[str, list[list[float]]]:
    """Every rank draws a dropout mask from each stream; all ranks get all masks."""
    ps = init(Topology(dist.get_world_size(), **LAYOUT))
    streams = RNGStreams(seed, ps.coords)
    out = {}
    for name in STREAM_AXES:
        with streams.fork(name):
            mask = F.dropout(torch.ones(64), p=0.5)
        gathered = [torch.empty(64) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, mask)
        out[name] = [g.tolist() for g in gathered]
    ps.destroy()
    return out


def test_masks_shared_exactly_within_replica_groups(rank_pools):
    results = rank_pools.get(8).run(gather_dropout_masks, 1234)
    assert all(r == results[0] for r in results)  # every rank gathered the same masks
    masks = results[0]
    topo = Topology(8, **LAYOUT)
    # The ranks that replicate the weights a stream serves: a pipeline stage (tp-replicated), a TP
    # shard's DP x CP replicas (tp-sharded), an expert shard's EDP replicas (expert).
    replicas = {"tp-replicated": "tp_dp_cp", "tp-sharded": "dp_cp", "expert": "edp"}
    for name, group_kind in replicas.items():
        for a in range(8):
            for b in range(8):
                same = topo.group_of(group_kind, a) == topo.group_of(group_kind, b)
                assert (masks[name][a] == masks[name][b]) == same, (name, a, b)
    again = rank_pools.get(8).run(gather_dropout_masks, 1234)[0]
    assert again == masks  # reproducible from the seed
