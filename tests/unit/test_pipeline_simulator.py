"""The pipeline simulator on the orders of trainer/pipeline/orders.py.

Activation-memory bounds checked here (counted in chunk-microbatches: one microbatch's activations
of one chunk, 1/V of a rank's layers). A rank holds a forward's activations until its backward.
The order runs w_r forwards of warmup, then alternates F, B, so it peaks right after the first
steady-state forward: min(w_r + 1, M*V) held.
- 1F1B (V = 1): w_r = min(P - r - 1, M), so rank r holds at most min(P - r, M) microbatches and
  stage 0 at most P.
- Interleaved (Megatron): w_r = 2(P - r - 1) + (V - 1)G, so rank 0 holds
  min(2(P - 1) + (V - 1)G + 1, M*V) chunk-microbatches; with G = P that is V*P + P - 1, i.e.
  P + (P - 1)/V whole-rank microbatches: (1 + (P-1)/(P V)) times 1F1B's P (Narayanan et al. 2021).
"""
from __future__ import annotations

import pytest

from trainer.pipeline import orders as orders_module
from trainer.pipeline.orders import interleaved_1f1b_order, one_f_one_b_order, pipeline_orders
from trainer.pipeline.simulator import PipelineDeadlock, max_in_flight, measured_cost, simulate, uniform_cost


def valid_configs() -> list[tuple[int, int, int, int | None]]:
    out = []
    for P in (1, 2, 3, 4, 8):
        for V in (1, 2, 3, 4):
            for M in sorted({1, 2, P, P + 1, 2 * P, 2 * P + 1, 3 * P, 16}):
                for G in (None, P + 1):
                    if V == 1 and G is not None:
                        continue
                    try:
                        if V > 1:
                            orders_module.check_interleaved(P, V, M, G)
                    except ValueError:
                        continue
                    out.append((P, V, M, G))
    return out


CONFIGS = valid_configs()


def test_enough_configs():
    assert len(CONFIGS) > 100


@pytest.mark.parametrize("costs", [(1.0, 2.0), (1.0, 1.0), (0.5, 1.5)])
def test_no_deadlock_dependencies_kept_and_bubble_is_megatron(costs):
    f, b = costs
    for P, V, M, G in CONFIGS:
        orders = pipeline_orders(P, V, M, G)
        res = simulate(orders, V, uniform_cost(f, b)).raise_if_deadlock()
        S = P * V
        # Independent check of the timing: every action starts after what it needs has ended.
        end = {}
        for r, order in enumerate(orders):
            for i, (kind, c, m) in enumerate(order):
                end[(kind, c * P + r, m)] = (res.start[(r, i)], res.end[(r, i)])
        for (kind, s, m), (start, _) in end.items():
            if kind == "F" and s > 0:
                assert start >= end[("F", s - 1, m)][1]
            if kind == "B":
                assert start >= end[("F", s, m)][1]
                if s < S - 1:
                    assert start >= end[("B", s + 1, m)][1]
        assert res.ideal == pytest.approx(M * V * (f + b))
        assert res.bubble_fraction == pytest.approx((P - 1) / (V * M), abs=1e-12), (P, V, M, G)
        assert res.makespan == pytest.approx(res.ideal + (P - 1) * (f + b))


def test_1f1b_activation_bound():
    for P in (1, 2, 4, 8):
        for M in (1, 2, P, 3 * P):
            held = [max_in_flight(one_f_one_b_order(P, M, r)) for r in range(P)]
            assert held == [min(P - r, M) for r in range(P)]
            assert held[0] <= P


def test_interleaved_activation_bound():
    for P, V, M, G in CONFIGS:
        if V == 1:
            continue
        group = G or P
        for r in range(P):
            held = max_in_flight(interleaved_1f1b_order(P, V, M, r, G))
            assert held == min(2 * (P - r - 1) + (V - 1) * group + 1, M * V), (P, V, M, G, r)
        if G is None and M >= P:
            rank0 = max_in_flight(interleaved_1f1b_order(P, V, M, 0))
            assert rank0 / V <= P + (P - 1) / V + 1e-12


def test_own_forward_missing_is_reported():
    orders = [[("F", 0, 0), ("B", 0, 0)], [("B", 0, 0), ("F", 0, 0)]]
    res = simulate(orders, 1)
    assert [(w.rank, w.action, w.needs) for w in res.deadlock] == [(0, ("B", 0, 0), ("B", 1, 0)),
                                                                    (1, ("B", 0, 0), ("F", 1, 0))]
    with pytest.raises(PipelineDeadlock, match=r"rank 1 waits at B\(chunk 0, mb 0\) for F\(stage 1, mb 0\)"):
        res.raise_if_deadlock()


def test_cycle_of_waits_is_reported(monkeypatch):
    # check_interleaved rejects this (a last group of 1 < pp); with the check off, the orders deadlock.
    monkeypatch.setattr(orders_module, "check_interleaved", lambda P, V, M, G=None: G)
    orders = [interleaved_1f1b_order(4, 3, 9, r, 4) for r in range(4)]
    res = simulate(orders, 3)
    assert len(res.deadlock) == 4
    for w in res.deadlock:  # each waits for another rank's work, never for its own
        assert w.needs[1] % 4 != w.rank
        assert w.action == orders[w.rank][sum(1 for (r, _) in res.end if r == w.rank)]


def test_measured_costs_and_latency_by_hand():
    orders = [one_f_one_b_order(2, 1, r) for r in range(2)]
    times = {("F", 0, 0): 1.0, ("F", 1, 0): 3.0, ("B", 1, 0): 2.0, ("B", 0, 0): 5.0}
    res = simulate(orders, 1, measured_cost(times))
    assert res.makespan == 11.0 and res.busy == (6.0, 5.0) and res.idle == (5.0, 6.0)
    lat = simulate(orders, 1, uniform_cost(), p2p_latency=0.5)
    assert lat.makespan == pytest.approx(1 + 0.5 + 1 + 2 + 0.5 + 2)
    assert lat.idle_fraction(1) == pytest.approx((7 - 3) / 7)
