"""One process simulating G workers of an outer optimizer: the reference the distributed outer step
is tested against (docs/co2.md, "Invariants").

Deliberately plain: every worker is a list of tensors with its own inner torch optimizer, every
average is a Python mean over the workers, and the stale update reads the anchors and averages of
earlier rounds from a history instead of keeping pseudo-gradients or momentum norms in flight.
Works in any dtype (float64 for the invariants, float32 to match ranks).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from optim.config import CO2Config
from optim.outer.penalty import staleness_penalty

# grad_fn(worker, step, params) -> (that worker's loss, its gradients), at the worker's current params.
GradFn = Callable[[int, int, list[torch.Tensor]], tuple[float, list[torch.Tensor]]]
InnerFactory = Callable[[list[torch.Tensor]], torch.optim.Optimizer]


@dataclass
class SimulatedRun:
    """What the simulation went through, step by step and round by round."""

    losses: list[list[float]] = field(default_factory=list)  # [step][worker], before the step's update
    params: list[list[list[torch.Tensor]]] = field(default_factory=list)  # [step][worker] after the step
    anchors: list[list[torch.Tensor]] = field(default_factory=list)  # x_0, x_1, ... (one per round + 1)
    averages: list[list[torch.Tensor]] = field(default_factory=list)  # xbar_t of each round t
    momenta: list[list[torch.Tensor]] = field(default_factory=list)  # m after each applied outer update
    applied: list[int] = field(default_factory=list)  # the round whose average each update applied
    penalties: list[float] = field(default_factory=list)


def _norm(tensors: list[torch.Tensor]) -> float:
    return float(torch.sqrt(sum((t.double() ** 2).sum() for t in tensors)))


def simulate(x0: list[torch.Tensor], grad_fn: GradFn, steps: int, workers: int, outer: str, cfg: CO2Config,
             make_inner: InnerFactory, lr_at: Callable[[int], float] | None = None) -> SimulatedRun:
    """Run `steps` inner steps on `workers` workers from `x0` under optim.outer=`outer` with `cfg`."""
    run = SimulatedRun(anchors=[[x.detach().clone() for x in x0]])
    params = [[x.detach().clone() for x in x0] for _ in range(workers)]
    optimizers = [make_inner(p) for p in params]
    momentum = [torch.zeros_like(x) for x in x0]
    penalty = staleness_penalty(cfg.penalty)
    for step in range(steps):
        losses = []
        for w in range(workers):
            loss, grads = grad_fn(w, step, params[w])
            losses.append(loss)
            for p, g in zip(params[w], grads):
                p.grad = g.detach().clone()
            if lr_at is not None:
                for group in optimizers[w].param_groups:
                    group["lr"] = lr_at(step)
            optimizers[w].step()
        run.losses.append(losses)
        if (step + 1) % cfg.tau == 0:
            t = (step + 1) // cfg.tau - 1  # the round that just ended
            x_t = run.anchors[t]
            run.averages.append([sum(params[w][i].detach() for w in range(workers)) / workers for i in range(len(x0))])
            used = t - 1 if outer == "co2" else t  # co2 applies the average launched one round earlier
            if used >= 0:
                delta = [a - b for a, b in zip(run.anchors[used], run.averages[used])]
                lam = 1.0
                if outer == "co2":
                    lam = penalty(_norm(delta), _norm([a - b for a, b in zip(x_t, run.anchors[used])]))
                momentum = [cfg.beta * m + lam * d for m, d in zip(momentum, delta)]
                if cfg.clip > 0:
                    momentum = [m.clamp(-cfg.clip, cfg.clip) for m in momentum]
                if outer == "diloco":
                    x_next = [x - cfg.alpha * (d + cfg.beta * m) for x, d, m in zip(x_t, delta, momentum)]
                else:
                    x_next = [x - cfg.alpha * m for x, m in zip(x_t, momentum)]
                run.momenta.append([m.clone() for m in momentum])
                run.applied.append(used)
                run.penalties.append(lam)
            else:
                x_next = [x.clone() for x in x_t]
            run.anchors.append(x_next)
            with torch.no_grad():
                for w in range(workers):
                    for p, x in zip(params[w], x_next):
                        p.copy_(x)
        run.params.append([[p.detach().clone() for p in params[w]] for w in range(workers)])
    return run
