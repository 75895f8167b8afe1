"""The outer optimizers' invariants on the one-process simulator of G workers (docs/co2.md,
"Invariants"), in float64 against plain references: data-parallel SGD, delay-1 SGD, local SGD as
a mean of independent runs, each round applied exactly once, the momentum clip bound."""
from __future__ import annotations

import pytest
import torch

from optim.config import CO2Config
from optim.outer.co2 import OuterRule, outer_step
from optim.outer.penalty import constant_penalty, gap_penalty
from optim.outer.simulator import simulate

G, DIM, ROWS, LR = 3, 5, 7, 0.1


def problem(seed: int = 0):
    """Worker i's least-squares loss 0.5 |A_i x - b_i|^2 / rows: a different gradient per worker."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(G, ROWS, DIM, generator=gen, dtype=torch.float64)
    b = torch.randn(G, ROWS, generator=gen, dtype=torch.float64)
    x0 = [torch.randn(DIM, generator=gen, dtype=torch.float64)]

    def grad(w: int, x: torch.Tensor) -> torch.Tensor:
        return a[w].T @ (a[w] @ x - b[w]) / ROWS

    def grad_fn(w, step, params):
        r = a[w] @ params[0].detach() - b[w]
        return float(0.5 * r @ r / ROWS), [grad(w, params[0].detach())]

    return x0, grad, grad_fn


def sgd(momentum: float = 0.0):
    return lambda params: torch.optim.SGD(params, lr=LR, momentum=momentum)


def run(outer: str, steps: int, momentum: float = 0.0, **co2) -> tuple:
    x0, grad, grad_fn = problem()
    params = {"tau": 1, "alpha": 1.0, "beta": 0.0, "clip": 0.0, "penalty": "constant"} | co2
    cfg = CO2Config(workers=G, **params)
    return simulate(x0, grad_fn, steps, G, outer, cfg, sgd(momentum)), x0[0], grad


@pytest.mark.parametrize("outer", ["localsgd", "diloco"])
def test_synchronous_tau1_equals_data_parallel_sgd(outer):
    sim, x, grad = run(outer, steps=8)
    for step in range(8):
        x = x - LR * sum(grad(w, x) for w in range(G)) / G
        for w in range(G):  # every worker restarts from the same anchor
            torch.testing.assert_close(sim.params[step][w][0], x, rtol=1e-12, atol=1e-13)


def test_stale_tau1_equals_delay1_sgd():
    sim, x0, grad = run("co2", steps=8)
    xs = [x0, x0]  # x_1 = x_0: no average has arrived after round 0 (grad(x_{-1}) taken as 0)
    for t in range(1, 8):
        xs.append(xs[t] - LR * sum(grad(w, xs[t - 1]) for w in range(G)) / G)
    for step in range(8):
        torch.testing.assert_close(sim.anchors[step + 1][0], xs[step + 1], rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(sim.params[step][0][0], xs[step + 1], rtol=1e-12, atol=1e-13)
    assert not torch.equal(xs[3], xs[2] - LR * sum(grad(w, xs[2]) for w in range(G)) / G)  # really stale


def test_local_sgd_averages_independent_runs():
    tau, rounds = 4, 3
    sim, x, grad = run("localsgd", steps=tau * rounds, tau=tau)
    for _ in range(rounds):
        ends = []
        for w in range(G):
            y = x.clone()
            for _ in range(tau):
                y = y - LR * grad(w, y)
            ends.append(y)
        x = sum(ends) / G
    torch.testing.assert_close(sim.anchors[-1][0], x, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("outer, expected", [("co2", [0, 1, 2, 3]), ("localsgd", [0, 1, 2, 3, 4]),
                                             ("diloco", [0, 1, 2, 3, 4])])
def test_each_outer_round_is_applied_exactly_once(outer, expected):
    sim, _, _ = run(outer, steps=15, tau=3, beta=0.5, alpha=0.7, momentum=0.9)
    assert sim.applied == expected
    assert len(sim.anchors) == 6 and len(sim.averages) == 5


def test_momentum_clip_bound_holds():
    clip = 0.05
    sim, _, _ = run("co2", steps=24, tau=2, beta=0.9, clip=clip, momentum=0.9)
    unclipped, _, _ = run("co2", steps=24, tau=2, beta=0.9, momentum=0.9)
    assert max(float(m[0].abs().max()) for m in sim.momenta) <= clip
    assert max(float(m[0].abs().max()) for m in unclipped.momenta) > clip  # the bound was active


def test_gap_penalty_shrinks_a_stale_average():
    sim, _, _ = run("co2", steps=12, tau=2, beta=0.5, penalty="gap")
    assert sim.penalties[0] == 1.0  # the anchor has not moved since round 0's average was launched
    assert all(0.0 < lam < 1.0 for lam in sim.penalties[1:])


def test_penalties():
    assert constant_penalty(3.0, 100.0) == 1.0
    assert gap_penalty(2.0, 0.0) == 1.0
    assert gap_penalty(2.0, 2.0) == pytest.approx(0.5)
    assert gap_penalty(0.0, 1.0) == 1.0


@pytest.mark.parametrize("outer", ["localsgd", "diloco", "co2"])
def test_outer_step_rule_matches_the_simulator_formula(outer):
    """The in-place rule the distributed step runs gives the simulator's anchor and momentum."""
    gen = torch.Generator().manual_seed(1)
    anchor, momentum, delta = (torch.randn(6, generator=gen, dtype=torch.float64) for _ in range(3))
    rule = OuterRule(outer, tau=1, alpha=0.7, beta=0.9, clip=0.5, penalty="constant")
    expected_m = (0.9 * momentum + 0.8 * delta).clamp(-0.5, 0.5)
    step = delta + 0.9 * expected_m if outer == "diloco" else expected_m
    expected_x = anchor - 0.7 * step
    outer_step(rule, anchor, momentum, delta, penalty=0.8)
    torch.testing.assert_close(momentum, expected_m)
    torch.testing.assert_close(anchor, expected_x)
