"""Pipeline order generators: Megatron's exact sequences, invariants, errors, torch's notation."""
from __future__ import annotations

import pytest

from trainer.pipeline.orders import (
    check_interleaved,
    interleaved_1f1b_order,
    one_f_one_b_order,
    pipeline_orders,
    to_torch_actions,
)


def parse(text: str) -> list[tuple[str, int, int]]:
    """'F(c0,m1) B(c1,m0)' -> [("F", 0, 1), ("B", 1, 0)]; '|' separators are ignored."""
    out = []
    for tok in text.replace("|", " ").split():
        kind, rest = tok[0], tok[2:-1]
        c, m = rest.split(",")
        out.append((kind, int(c[1:]), int(m[1:])))
    return out


def short(text: str) -> list[tuple[str, int, int]]:
    """'F0 F1 B0' (one chunk) -> [("F", 0, 0), ("F", 0, 1), ("B", 0, 0)]."""
    return [(tok[0], 0, int(tok[1:])) for tok in text.split()]


def test_1f1b_issue_example():
    assert one_f_one_b_order(2, 4, 0) == short("F0 F1 B0 F2 B1 F3 B2 B3")
    assert one_f_one_b_order(2, 4, 1) == short("F0 B0 F1 B1 F2 B2 F3 B3")


def test_1f1b_few_microbatches_is_all_forward_then_all_backward():
    assert one_f_one_b_order(4, 2, 0) == short("F0 F1 B0 B1")


def test_interleaved_issue_example():
    rank0 = ("F(c0,m0) F(c0,m1) F(c1,m0) F(c1,m1) | F(c0,m2) B(c1,m0) F(c0,m3) B(c1,m1) F(c1,m2) B(c0,m0) "
             "F(c1,m3) B(c0,m1) | B(c1,m2) B(c1,m3) B(c0,m2) B(c0,m3)")
    rank1 = ("F(c0,m0) F(c0,m1) | F(c1,m0) B(c1,m0) F(c1,m1) B(c1,m1) F(c0,m2) B(c0,m0) F(c0,m3) B(c0,m1) "
             "F(c1,m2) B(c1,m2) F(c1,m3) B(c1,m3) | B(c0,m2) B(c0,m3)")
    assert interleaved_1f1b_order(2, 2, 4, 0) == parse(rank0)
    assert interleaved_1f1b_order(2, 2, 4, 1) == parse(rank1)


@pytest.mark.parametrize("P,V,M,G", [(1, 1, 3, None), (2, 1, 5, None), (4, 1, 2, None), (2, 2, 4, None),
                                     (4, 2, 8, None), (3, 3, 9, None), (4, 2, 12, 6), (2, 3, 5, 3), (4, 4, 4, None)])
def test_every_chunk_microbatch_once_forward_before_backward(P, V, M, G):
    for r in range(P):
        order = interleaved_1f1b_order(P, V, M, r, G)
        assert sorted(a for a in order if a[0] == "F") == [("F", c, m) for c in range(V) for m in range(M)]
        assert sorted(a for a in order if a[0] == "B") == [("B", c, m) for c in range(V) for m in range(M)]
        for c in range(V):
            for m in range(M):
                assert order.index(("F", c, m)) < order.index(("B", c, m))
            # Each chunk sees its microbatches in order, forward and backward (what p2p relies on).
            assert [a[2] for a in order if a[:2] == ("F", c)] == list(range(M))
            assert [a[2] for a in order if a[:2] == ("B", c)] == list(range(M))


@pytest.mark.parametrize("P,V,M", [(2, 2, 4), (4, 2, 8), (4, 3, 16), (3, 2, 3)])
def test_interleaved_warmup_length(P, V, M):
    for r in range(P):
        order = interleaved_1f1b_order(P, V, M, r)
        first_backward = next(i for i, a in enumerate(order) if a[0] == "B")
        warmup = min(2 * (P - r - 1) + (V - 1) * P, M * V)
        # The steady state starts with one more forward before the first backward.
        assert first_backward == min(warmup + 1, M * V)


def test_interleaved_group_size_orders_chunks_by_group():
    order = interleaved_1f1b_order(2, 2, 6, 0, group_size=3)
    forwards = [a[1:] for a in order if a[0] == "F"]
    assert forwards == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (0, 3), (0, 4), (0, 5), (1, 3), (1, 4), (1, 5)]


@pytest.mark.parametrize("P,V,M,G,match", [
    (4, 2, 2, None, r"pp=4, group size=4, microbatches=2; use at least 4 microbatches"),
    (2, 2, 4, 1, r"pp <= microbatch group size <= microbatches, got pp=2, group size=1"),
    (4, 2, 6, None, r"microbatches=6 leaves a last group of 2 microbatches \(group size 4\), fewer than pp=4"),
    (4, 2, 9, 4, r"use a multiple of 4 microbatches \(e.g. 8 or 12\)"),
])
def test_interleaved_rejects_bad_microbatch_counts(P, V, M, G, match):
    with pytest.raises(ValueError, match=match):
        interleaved_1f1b_order(P, V, M, 0, G)


def test_check_interleaved_accepts_a_long_enough_last_group():
    assert check_interleaved(2, 2, 5, 3) == 3  # last group of 2 >= pp = 2
    assert check_interleaved(4, 2, 8) == 4


def test_vpp_one_is_1f1b_and_forward_only_keeps_forwards():
    assert interleaved_1f1b_order(3, 1, 5, 1) == one_f_one_b_order(3, 5, 1)
    orders = pipeline_orders(2, 2, 4, forward_only=True)
    assert orders[0] == [a for a in interleaved_1f1b_order(2, 2, 4, 0) if a[0] == "F"]


def test_bad_rank():
    with pytest.raises(ValueError, match="pp rank 2 is not in a pipeline of 2 ranks"):
        one_f_one_b_order(2, 4, 2)


def test_torch_action_strings():
    assert to_torch_actions([("F", 0, 0), ("B", 1, 2)], pp_size=2, pp_rank=0) == ["0F0", "2B2"]
    assert to_torch_actions([("F", 1, 3)], pp_size=4, pp_rank=3) == ["7F3"]


def _torch_ops(name: str, P: int, M: int, V: int | None) -> list[list[str]]:
    visualizer = pytest.importorskip("torch.distributed.pipelining._schedule_visualizer")
    ops = visualizer.get_schedule_ops(name, P, M, V)
    return [[str(a) for a in rank if a is not None and str(a)[len(str(a.stage_index)):][0] in "FB"]
            for rank in ops]


@pytest.mark.parametrize("P,V,M", [(2, 2, 4), (2, 2, 6), (4, 2, 8), (4, 2, 12), (3, 3, 6), (4, 4, 8)])
def test_interleaved_matches_torch_pipelining(P, V, M):
    """torch's ScheduleInterleaved1F1B uses groups of P microbatches too when P divides M."""
    theirs = _torch_ops("Interleaved1F1B", P, M, V)
    for r in range(P):
        assert to_torch_actions(interleaved_1f1b_order(P, V, M, r), P, r) == theirs[r]


@pytest.mark.parametrize("P,M", [(2, 4), (4, 8), (3, 5)])
def test_1f1b_matches_torch_pipelining_except_last_rank(P, M):
    """torch 2.13's offline listing of Schedule1F1B numbers the last rank's microbatches off by
    one (the schedule it runs is right; docs/pipeline.md, "Orders"), so that rank is compared by hand
    above."""
    theirs = _torch_ops("1F1B", P, M, None)
    for r in range(P - 1):
        assert to_torch_actions(one_f_one_b_order(P, M, r), P, r) == theirs[r]
