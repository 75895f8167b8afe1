"""Pipeline bubble: simulated (and optionally measured) against Megatron's (P-1)/(V*M).

Default (pure, instant): for several (pp P, vpp V, microbatches M) it simulates 1F1B (V = 1) and
interleaved 1F1B with uniform costs (F = 1, B = 2 per chunk; trainer/pipeline/simulator.py) and prints
the bubble fraction (makespan - ideal) / ideal next to (P-1)/(V*M) and their ratio.

`--real`: runs trainer/pipeline/executor.py on 4 gloo CPU ranks (pp = 4, worker processes from
tests/multirank/harness.RankPool) with a toy model (Linear + tanh layers, 2 per virtual stage) and
prints each rank's measured idle fraction, time blocked waiting for receives / step time (median
over steps), next to the simulated per-rank idle fraction (makespan - busy) / makespan. CPU and
gloo on a shared small machine are noisy, and p2p latency is not free there: read the measured
numbers as "does the bubble shrink with V and M as predicted", not as a GPU estimate.

    .venv/bin/python bench/pipeline_bubble.py
    .venv/bin/python bench/pipeline_bubble.py --real [--hidden 1024] [--steps 5]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trainer.pipeline.orders import pipeline_orders
from trainer.pipeline.simulator import simulate, uniform_cost

SIM_CONFIGS = [(2, 1, 4), (2, 2, 4), (4, 1, 4), (4, 1, 8), (4, 2, 8), (4, 4, 8), (8, 1, 16), (8, 2, 16),
               (8, 4, 32), (4, 2, 12)]
REAL_CONFIGS = [(1, 4), (1, 8), (2, 4), (2, 8), (4, 8)]  # (vpp, microbatches) at pp = 4
REAL_PP = 4


def simulated_table() -> None:
    print(f"{'P':>3} {'V':>3} {'M':>4} {'simulated':>10} {'(P-1)/(VM)':>11} {'ratio':>6}")
    for P, V, M in SIM_CONFIGS:
        res = simulate(pipeline_orders(P, V, M), V, uniform_cost(1.0, 2.0)).raise_if_deadlock()
        formula = (P - 1) / (V * M)
        print(f"{P:>3} {V:>3} {M:>4} {res.bubble_fraction:>10.4f} {formula:>11.4f} {res.bubble_fraction / formula:>6.3f}")


def _rank_step(vpp: int, num_mb: int, hidden: int, steps: int) -> list[float]:
    """On one rank of the pool: time `steps` pipeline steps; return the idle fraction of each."""
    from parallel_state.groups import init
    from parallel_state.topology import Topology
    from trainer.pipeline.executor import PipelineTiming, forward_backward_pipelining

    ps = init(Topology(REAL_PP, pp=REAL_PP))
    try:
        torch.manual_seed(0)
        layers_per_stage, batch, seq = 2, 4, 32
        chunks = []
        for _ in range(vpp):
            # A chunk is the fixed cost unit (2 layers) whatever V is, as in the simulator's costs.
            layers = [torch.nn.Linear(hidden, hidden) for _ in range(layers_per_stage)]

            def run(x, mb, layers=layers):
                h = x["x"] if isinstance(x, dict) else x
                for layer in layers:
                    h = torch.tanh(layer(h))
                return h
            chunks.append(run)
        microbatches = [{"x": torch.randn(batch, seq, hidden)} for _ in range(num_mb)]
        orders = pipeline_orders(REAL_PP, vpp, num_mb)
        fractions = []
        for step in range(steps + 1):
            timing = PipelineTiming()
            forward_backward_pipelining(orders, chunks, microbatches, lambda out, mb: out.float().pow(2).sum(),
                                        1.0, ps.pp, vpp, (batch, seq, hidden), torch.float32, "cpu", timing=timing)
            torch.distributed.barrier()
            if step:  # the first step warms up allocators and gloo connections
                fractions.append(timing.idle_fraction)
        return fractions
    finally:
        ps.destroy()


def real_table(hidden: int, steps: int) -> None:
    from tests.multirank.harness import RankPool

    pool = RankPool(REAL_PP, timeout_s=600)
    try:
        print(f"pp={REAL_PP} gloo CPU ranks, hidden {hidden}, median over {steps} steps; idle = time in "
              "recv waits / step time")
        print("(the simulated idle share of the step is bubble / (1 + bubble), bubble = (P-1)/(VM))")
        print(f"{'V':>3} {'M':>4} {'(P-1)/(VM)':>11}  measured idle per rank   simulated idle per rank")
        for vpp, num_mb in REAL_CONFIGS:
            per_rank = pool.run(_rank_step, vpp, num_mb, hidden, steps)
            measured = [statistics.median(f) for f in per_rank]
            res = simulate(pipeline_orders(REAL_PP, vpp, num_mb), vpp, uniform_cost(1.0, 2.0))
            simulated = [res.idle_fraction(r) for r in range(REAL_PP)]
            print(f"{vpp:>3} {num_mb:>4} {(REAL_PP - 1) / (vpp * num_mb):>11.3f}  "
                  f"{' '.join(f'{x:.3f}' for x in measured):<24} {' '.join(f'{x:.3f}' for x in simulated)}")
    finally:
        pool.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real", action="store_true", help="also run the executor on 4 gloo CPU ranks")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    simulated_table()
    if args.real:
        real_table(args.hidden, args.steps)


if __name__ == "__main__":
    main()
