"""Discrete-event simulation of pipeline orders: deadlock, idle time, bubble and activation memory.

Pure (no processes, no tensors). Every pp rank runs its order (trainer/pipeline/orders.py) strictly in
sequence; an action starts when its rank is free and its inputs exist:

    F(stage s, m)  needs F(s-1, m) finished (s > 0): the activation from the previous stage
    B(stage s, m)  needs F(s, m) finished (its own graph) and B(s+1, m) (s < S-1): the output grad

where chunk c of rank r is virtual stage s = c*P + r and S = P*V. Communication is free unless
`p2p_latency` is given (added to every dependency between different ranks). This is exactly the
blocking structure of trainer/pipeline/executor.py, whose sends never block and whose receives
block until the producer has computed.

Definitions used for the bubble (uniform costs; Narayanan et al. 2021, section 2.2):
- a rank's *busy time* is the sum of its actions' costs; the *ideal time* of the step is the
  busiest rank's busy time (for uniform costs every rank's: M*V*(f+b) with f, b the per-chunk
  costs, i.e. M*(F+B) for whole-rank costs F = V*f, B = V*b);
- the *makespan* is when the last action of any rank finishes (all ranks start at 0);
- the *bubble fraction* is (makespan - ideal) / ideal, the pipeline flush overhead relative to
  perfect overlap. For 1F1B and interleaved 1F1B with uniform costs this is (P-1)/(V*M);
- a rank's *idle time* is makespan - its busy time (waiting inside the step plus at its ends).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from trainer.pipeline.orders import Action  # (kind "F"|"B", chunk, microbatch)

CostFn = Callable[[str, int, int], float]  # (kind, virtual stage, microbatch) -> time


@dataclass(frozen=True)
class Wait:
    """A rank stuck at `action` (its next one) because `needs` (kind, virtual stage, microbatch)
    never finishes: it is not in any rank's order, or it is behind a cycle of waits."""

    rank: int
    action: Action
    needs: tuple[str, int, int]

    def __str__(self) -> str:
        k, c, m = self.action
        nk, ns, nm = self.needs
        return f"rank {self.rank} waits at {k}(chunk {c}, mb {m}) for {nk}(stage {ns}, mb {nm})"


class PipelineDeadlock(RuntimeError):
    """The orders cannot all finish; `waits` lists each stuck rank and what it waits for."""

    def __init__(self, waits: Sequence[Wait]):
        super().__init__("pipeline deadlock: " + "; ".join(str(w) for w in waits))
        self.waits = tuple(waits)


@dataclass(frozen=True)
class SimResult:
    """Outcome of `simulate`. Times are in the cost model's unit; per-rank lists are indexed by pp rank.

    `deadlock` is empty when every order finished; otherwise the other fields describe the part
    that ran. `start`/`end` map (rank, position in its order) to the action's start/end time.
    """

    makespan: float
    busy: tuple[float, ...]
    idle: tuple[float, ...]
    start: dict[tuple[int, int], float]
    end: dict[tuple[int, int], float]
    max_in_flight: tuple[int, ...]  # most (chunk, microbatch) forwards held (not yet backpropagated) per rank
    deadlock: tuple[Wait, ...] = ()

    @property
    def ideal(self) -> float:
        """The busiest rank's compute time: the step time with perfect overlap (no bubble)."""
        return max(self.busy)

    @property
    def bubble_fraction(self) -> float:
        """(makespan - ideal) / ideal; (P-1)/(V*M) for (interleaved) 1F1B with uniform costs."""
        return (self.makespan - self.ideal) / self.ideal

    def idle_fraction(self, rank: int) -> float:
        """The share of the makespan that `rank` spends not computing."""
        return self.idle[rank] / self.makespan

    def raise_if_deadlock(self) -> SimResult:
        if self.deadlock:
            raise PipelineDeadlock(self.deadlock)
        return self


def uniform_cost(forward: float = 1.0, backward: float = 2.0) -> CostFn:
    """Every forward of a chunk costs `forward`, every backward `backward` (default 1 and 2)."""
    return lambda kind, stage, mb: forward if kind == "F" else backward


def measured_cost(times: Mapping[tuple[str, int, int], float]) -> CostFn:
    """Per-action measured times keyed by (kind, virtual stage, microbatch)."""
    return lambda kind, stage, mb: times[(kind, stage, mb)]


def simulate(orders: Sequence[Sequence[Action]], vpp_size: int, cost: CostFn | None = None,
             p2p_latency: float = 0.0) -> SimResult:
    """Run every rank's order against the others (orders[r] is pp rank r's) and time it.

    Never raises for a deadlock: the result's `deadlock` says which ranks are stuck and on what
    (`raise_if_deadlock()` turns it into a PipelineDeadlock). A backward whose own forward comes
    later in the same order shows up as that rank waiting for its own forward.
    """
    P = len(orders)
    S = P * vpp_size
    cost = cost or uniform_cost()
    done: dict[tuple[str, int, int], tuple[float, int]] = {}  # (kind, stage, mb) -> (end time, rank)
    start: dict[tuple[int, int], float] = {}
    end: dict[tuple[int, int], float] = {}
    pos = [0] * P
    free_at = [0.0] * P
    busy = [0.0] * P
    progressed = True
    while progressed:
        progressed = False
        for r in range(P):
            # Run this rank as far as its dependencies allow; other ranks catch up on later sweeps.
            while pos[r] < len(orders[r]):
                kind, chunk, mb = orders[r][pos[r]]
                stage = chunk * P + r
                ready = free_at[r]
                missing = None
                for need in _needs(kind, stage, mb, S):
                    if need not in done:
                        missing = need
                        break
                    t, src = done[need]
                    ready = max(ready, t + (p2p_latency if src != r else 0.0))
                if missing is not None:
                    break
                c = cost(kind, stage, mb)
                start[(r, pos[r])], end[(r, pos[r])] = ready, ready + c
                done[(kind, stage, mb)] = (ready + c, r)
                free_at[r] = ready + c
                busy[r] += c
                pos[r] += 1
                progressed = True
    waits = []
    for r in range(P):
        if pos[r] < len(orders[r]):
            kind, chunk, mb = orders[r][pos[r]]
            stage = chunk * P + r
            waits.append(Wait(r, (kind, chunk, mb), next(n for n in _needs(kind, stage, mb, S) if n not in done)))
    makespan = max(free_at) if P else 0.0
    return SimResult(makespan=makespan, busy=tuple(busy), idle=tuple(makespan - b for b in busy),
                     start=start, end=end, max_in_flight=tuple(max_in_flight(o) for o in orders),
                     deadlock=tuple(waits))


def _needs(kind: str, stage: int, mb: int, num_stages: int) -> list[tuple[str, int, int]]:
    if kind == "F":
        return [("F", stage - 1, mb)] if stage > 0 else []
    needs = [("F", stage, mb)]
    if stage < num_stages - 1:
        needs.append(("B", stage + 1, mb))
    return needs


def max_in_flight(order: Sequence[Action]) -> int:
    """The most (chunk, microbatch) forwards whose backward has not run yet, over the order.

    Each one keeps a chunk's activations alive, so rank r's activation memory is this count times
    one chunk-microbatch (1/V of the rank's layers for one microbatch). Bounds (derived in
    tests/unit/test_pipeline_simulator.py): 1F1B min(P - r, M); interleaved min(w_r + 1, M*V) with the
    warmup w_r = 2(P - r - 1) + (V - 1)G, i.e. on rank 0 with G = P about P + (P-1)/V whole-rank
    microbatches, against P for 1F1B.
    """
    held = peak = 0
    for kind, _, _ in order:
        held += 1 if kind == "F" else -1
        peak = max(peak, held)
    return peak
