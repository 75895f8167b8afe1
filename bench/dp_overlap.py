"""Data-parallel step time: bucketed reduction overlapped with backward vs the flat post-backward all-reduce.

On N gloo ranks (default 2), each rank trains the same model on its own batches, 2 microbatches
per step (the first under no_sync). Modes, timed in alternating rounds in the same run:

    none      no gradient communication (the floor)
    flat      optim/grad_sync.allreduce_gradients after the last backward (no overlap)
    bucketed  BucketedGradReducer with overlap=False (same buckets, all sent in finish())
    overlap   BucketedGradReducer, buckets launched from the backward hooks

Prints the median step time of each mode (the slowest rank's per round) and the medians of the
per-round ratios flat/none, overlap/none, overlap/flat. Modes rotate which goes first in each
round. CPU-only numbers from gloo on a shared 2-core machine are noisy and say little about NCCL
on GPUs; read them as "does overlap hide communication here".

    .venv/bin/python bench/dp_overlap.py [--world 2] [--steps 5] [--rounds 5] [--bucket-mb 4]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models import ModelConfig, build_model
from optim.grad_buffers import BucketedGradReducer
from optim.grad_sync import allreduce_gradients
from parallel_state.groups import init
from parallel_state.topology import Topology
from tests.multirank.harness import RankPool

MODES = ("none", "flat", "bucketed", "overlap")
MICROBATCHES = 2


def time_modes(hidden: int, layers: int, vocab: int, batch: int, seq: int, steps: int, rounds: int,
               bucket_mb: float) -> dict[str, list[float]]:
    """On one rank: seconds per step of every mode, one entry per round (rounds alternate modes)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    ps = init(Topology(world))
    cfg = ModelConfig(vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=max(1, hidden // 64))
    # One model per reducer (a reducer owns its model's .grad views and hooks); the same weights.
    models = {m: build_model(cfg, seed=0) for m in MODES}
    g = torch.Generator().manual_seed(rank)
    data = [torch.randint(0, vocab, (batch, seq + 1), generator=g) for _ in range(MICROBATCHES)]
    reducers = {"bucketed": BucketedGradReducer(models["bucketed"].parameters(), ps.dp_cp, bucket_mb, overlap=False),
                "overlap": BucketedGradReducer(models["overlap"].parameters(), ps.dp_cp, bucket_mb, overlap=True)}

    def step(mode: str) -> None:
        model, reducer = models[mode], reducers.get(mode)
        for i, tokens in enumerate(data):
            if reducer is not None:
                reducer.sync_enabled = i == MICROBATCHES - 1
            loss = model.token_losses(tokens[:, :-1], tokens[:, 1:]).sum() / (world * batch * seq * MICROBATCHES)
            loss.backward()
        if mode == "flat":
            allreduce_gradients(model.parameters(), ps.dp_cp)
        if reducer is not None:
            reducer.finish()
            reducer.zero_grad()
        else:
            model.zero_grad(set_to_none=True)

    times: dict[str, list[float]] = {m: [] for m in MODES}
    for round_index in range(rounds):
        # Rotate which mode goes first, so no mode always pays for what the previous round left.
        for k in range(len(MODES)):
            mode = MODES[(round_index + k) % len(MODES)]
            step(mode)  # warm-up
            dist.barrier()
            start = time.perf_counter()
            for _ in range(steps):
                step(mode)
            dist.barrier()
            times[mode].append((time.perf_counter() - start) / steps)
    ps.destroy()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--bucket-mb", type=float, default=4.0)
    a = parser.parse_args()
    pool = RankPool(a.world, timeout_s=1800)
    try:
        per_rank = pool.run(time_modes, a.hidden, a.layers, a.vocab, a.batch, a.seq, a.steps, a.rounds, a.bucket_mb)
    finally:
        pool.close()
    # A step ends when its slowest rank does: per round, the max over ranks.
    per_round = {m: [max(r[m][i] for r in per_rank) for i in range(a.rounds)] for m in MODES}
    med = {m: statistics.median(per_round[m]) for m in MODES}

    def ratio(num: str, den: str) -> float:
        # Median of per-round ratios: modes of one round share the machine's load at that time.
        return statistics.median(x / y for x, y in zip(per_round[num], per_round[den]))

    params = sum(p.numel() for p in build_model(ModelConfig(vocab_size=a.vocab, hidden_size=a.hidden,
                                                            num_layers=a.layers, num_heads=max(1, a.hidden // 64)),
                                                seed=0).parameters())
    print(f"world={a.world} params={params / 1e6:.2f}M ({params * 4 / 2**20:.1f} MiB fp32 grads) "
          f"bucket={a.bucket_mb} MiB, {MICROBATCHES} microbatches of {a.batch}x{a.seq}, "
          f"{a.rounds} rounds x {a.steps} steps")
    for m in MODES:
        print(f"  {m:9s} {med[m] * 1e3:8.1f} ms/step (median)")
    print(f"ratio flat/none     {ratio('flat', 'none'):.3f}")
    print(f"ratio bucketed/none {ratio('bucketed', 'none'):.3f}")
    print(f"ratio overlap/none  {ratio('overlap', 'none'):.3f}")
    print(f"ratio overlap/flat  {ratio('overlap', 'flat'):.3f}  (< 1: overlap hides communication)")

if __name__ == "__main__":
    main()
