"""Ring attention load balance: per-rank attention FLOPs of the zigzag vs the contiguous split.

For each CP rank, walks the block plan ring attention actually executes
(models.layers.context_parallel.ring_block_plan) and counts the score-matrix entries it computes
unmasked (a causal diagonal block counts n(n+1)/2, a full block Tq*Tk), times 4*D*H FLOPs per
entry (QK^T and PV, forward). The slowest rank sets the step time, so the figure of merit is
max/mean over ranks (1.0 = perfectly balanced). Sanity check: over all ranks the entries add up to
the causal count T(T+1)/2 for both splits.

Target: zigzag max/mean <= 1.05 at every cp (PASS/FAIL printed; exit status 1 on FAIL).

    .venv/bin/python bench/cp_balance.py
    .venv/bin/python bench/cp_balance.py --seq-len 131072 --cps 2 4 8 16
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models.layers.context_parallel import ring_block_plan

TARGET = 1.05


def unmasked_entries(rows: slice, cols: slice, causal: bool, local_len: int) -> int:
    """Score entries of one planned block that are not masked."""
    tq, tk = len(range(local_len)[rows]), len(range(local_len)[cols])
    return tq * (tq + 1) // 2 if causal else tq * tk


def per_rank_entries(seq_len: int, cp: int, zigzag: bool) -> list[int]:
    """Unmasked score entries each CP rank computes over the whole ring."""
    local_len = seq_len // cp
    return [sum(unmasked_entries(rows, cols, causal, local_len)
                for step in range(cp)
                for rows, cols, causal in ring_block_plan(step, rank, cp, local_len, zigzag))
            for rank in range(cp)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=32768)
    parser.add_argument("--cps", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=128)
    args = parser.parse_args()
    flops_per_entry = 4 * args.head_dim * args.heads
    causal_total = args.seq_len * (args.seq_len + 1) // 2
    ok = True
    print(f"seq_len={args.seq_len} heads={args.heads} head_dim={args.head_dim}; forward attention GFLOP per rank")
    print(f"{'cp':>3} {'split':>10} {'min':>9} {'max':>9} {'mean':>9} {'max/mean':>9}")
    for cp in args.cps:
        if args.seq_len % (2 * cp):
            print(f"{cp:>3} skipped: seq_len {args.seq_len} is not a multiple of 2*cp = {2 * cp}")
            continue
        for zigzag in (True, False):
            entries = per_rank_entries(args.seq_len, cp, zigzag)
            assert sum(entries) == causal_total, "the plan must compute every causal pair exactly once"
            gflop = [e * flops_per_entry / 1e9 for e in entries]
            mean = sum(gflop) / cp
            ratio = max(gflop) / mean
            verdict = ""
            if zigzag:
                passed = ratio <= TARGET
                ok &= passed
                verdict = f"  {'PASS' if passed else 'FAIL'} (target <= {TARGET})"
            name = "zigzag" if zigzag else "contiguous"
            print(f"{cp:>3} {name:>10} {min(gflop):9.1f} {max(gflop):9.1f} {mean:9.1f} {ratio:9.3f}{verdict}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
