"""Communication accounting (pure) and the collectives on one process (no communication at all)."""
from __future__ import annotations

import pytest
import torch

from models.init import generate_full_tensor, generate_full_tensor_padded, normal_init
from parallel_state import collectives as C
from parallel_state.comm_stats import COMM_OPS, CommStats, ring_bytes_sent
from parallel_state.groups import AxisGroup


@pytest.mark.parametrize("n", [2, 4, 8])
def test_ring_convention(n):
    size = 1024
    assert ring_bytes_sent("all_reduce", size, n) == 2 * (n - 1) / n * size
    assert ring_bytes_sent("all_gather", size, n) == (n - 1) / n * size
    assert ring_bytes_sent("reduce_scatter", size, n) == (n - 1) / n * size
    # An all-reduce is a reduce-scatter followed by an all-gather.
    assert ring_bytes_sent("all_reduce", size, n) == (ring_bytes_sent("reduce_scatter", size, n)
                                                      + ring_bytes_sent("all_gather", size, n))


def test_ring_convention_edge_cases():
    assert all(ring_bytes_sent(op, 1000, 1) == 0 for op in ("all_reduce", "all_gather", "reduce_scatter"))
    with pytest.raises(ValueError, match="broadcast"):
        ring_bytes_sent("broadcast", 10, 2)
    with pytest.raises(ValueError, match="splits"):
        ring_bytes_sent("all_to_all", 10, 2)


def test_stats_accumulate_per_op_and_group_and_reset():
    stats = CommStats()
    stats.record("all_reduce", "tp", 100)
    stats.record("all_reduce", "tp", 50)
    stats.record("all_gather", "tp", 10)
    stats.record("all_reduce", "dp_cp", 7)
    assert stats.bytes_sent == {("all_reduce", "tp"): 150, ("all_gather", "tp"): 10, ("all_reduce", "dp_cp"): 7}
    assert stats.calls[("all_reduce", "tp")] == 2
    assert stats.total() == 167
    assert stats.total(group="tp") == 160
    assert stats.total(op="all_reduce") == 157
    assert stats.summary() == {"comm/dp_cp/all_reduce_bytes": 7, "comm/tp/all_gather_bytes": 10,
                               "comm/tp/all_reduce_bytes": 150, "comm/total_bytes": 167}
    with pytest.raises(ValueError, match="unknown collective"):
        stats.record("gossip", "tp", 1)
    stats.reset()
    assert stats.total() == 0 and not stats.calls and stats.summary() == {"comm/total_bytes": 0}
    assert set(COMM_OPS) == {"all_reduce", "all_gather", "reduce_scatter", "all_to_all", "send"}


def test_collectives_on_one_process_are_identities_and_send_nothing():
    """A group of one rank (AxisGroup.single): every op returns its input and sends nothing."""
    stats = CommStats()
    one = AxisGroup.single("tp")
    x = torch.randn(2, 4, 6, requires_grad=True)
    outs = [
        C.copy_to_tp_region(x, one), C.reduce_from_tp_region(x, one),
        C.scatter_to_tp_region(x, one), C.gather_from_tp_region(x, one),
        C.scatter_to_sequence_parallel_region(x, one),
        C.gather_from_sequence_parallel_region(x, one),
        C.reduce_scatter_to_sequence_parallel_region(x, one),
        C.all_to_all(x, one), C.all_to_all_scatter_gather(x, one, 2, 1),
        C.all_reduce_async(x, one)[0], C.all_gather_async(x, one)[0],
        C.reduce_scatter_async(x, one)[0], C.all_reduce_max(x, one),
        C.all_reduce_sum(x, one),
    ]
    assert all(out is x for out in outs)
    assert C.all_reduce_async(x, one)[1].wait() and C.all_reduce_inplace(x.detach(), one) is None
    assert not stats.bytes_sent


@pytest.mark.parametrize("not_a_group", [None, "tp", 3])
def test_none_or_a_raw_handle_is_not_a_group(not_a_group):
    with pytest.raises(TypeError, match=r"collectives take an AxisGroup .*AxisGroup\.single"):
        C.all_reduce_sum(torch.ones(2), not_a_group)


def test_padded_init_keeps_the_real_rows():
    """A vocabulary padded from 13 to 16 rows: rows 0..12 are the unpadded tensor, the rest zeros."""
    init = normal_init(0.02)
    real = generate_full_tensor(init, 3, "embedding.weight", (13, 8))
    padded = generate_full_tensor_padded(init, 3, "embedding.weight", (16, 8), (0, 13))
    assert torch.equal(padded[:13], real) and torch.equal(padded[13:], torch.zeros(3, 8))
    assert torch.equal(generate_full_tensor_padded(init, 3, "embedding.weight", (13, 8), None), real)
