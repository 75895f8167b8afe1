"""Checkpoint cost: step time with asynchronous saves every N steps vs no saves vs synchronous saves.

One Trainer (the quickstart model unless overridden) trains through rounds; each round runs the
same number of steps three ways, in turn: without saves, with a synchronous save every N steps,
and with an asynchronous save every N steps (trainer.async_save: the state is copied, then written
by a background thread while training goes on). A segment's time includes every save's blocking
part and, at its end, the wait for its last background save, so a write that outlasts N steps
is paid for. Per round, each mode's mean step time is divided by the no-save one; the medians of
these ratios are printed. Target: async <= 1.10x no-save.

    .venv/bin/python bench/async_save.py [--every 5] [--steps 10] [--rounds 3] [overrides ...]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trainer.checkpointer import Checkpointer
from trainer.config import compose
from trainer.trainer import Trainer


def segment(trainer: Trainer, checkpointer: Checkpointer | None, steps: int, every: int) -> float:
    """Mean seconds per step over `steps` steps, saving every `every` steps with `checkpointer`."""
    start = time.perf_counter()
    for i in range(1, steps + 1):
        trainer.train_step()
        if checkpointer is not None and i % every == 0:
            trainer.checkpointer = checkpointer
            trainer.save()
    if checkpointer is not None:
        checkpointer.wait()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--every", type=int, default=5, help="save every this many steps")
    parser.add_argument("--steps", type=int, default=10, help="steps per mode and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("overrides", nargs="*", default=["+experiment=quickstart"])
    args = parser.parse_args()
    run_dir = tempfile.mkdtemp(prefix="async_save_")
    total = args.steps * 3 * args.rounds + 1
    trainer = Trainer(compose(args.overrides + [f"trainer.max_steps={total}", f"trainer.run_dir={run_dir}",
                                                "trainer.keep_last=1", "trainer.async_save=true"]))
    layout = trainer.checkpointer.layout
    modes = {"none": None,
             "sync": Checkpointer(run_dir, 0, 1, layout, keep_last=1, asynchronous=False),
             "async": trainer.checkpointer}
    trainer.train_step()  # warm-up: allocations, first-step optimizer state
    ratios: dict[str, list[float]] = {"sync": [], "async": []}
    for r in range(args.rounds):
        times = {name: segment(trainer, cp, args.steps, args.every) for name, cp in modes.items()}
        for name, values in ratios.items():
            values.append(times[name] / times["none"])
        print(f"round {r + 1}: step time none {times['none']:.3f} s, sync {times['sync']:.3f} s, "
              f"async {times['async']:.3f} s", flush=True)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(run_dir) for f in files
               if f.endswith(".distcp"))
    print(f"checkpoint {size / 1e6:.1f} MB every {args.every} steps; step time vs no saves (median of "
          f"{args.rounds} rounds): async {statistics.median(ratios['async']):.3f}x "
          f"(rounds {', '.join(f'{x:.3f}' for x in ratios['async'])}), sync {statistics.median(ratios['sync']):.3f}x "
          f"(rounds {', '.join(f'{x:.3f}' for x in ratios['sync'])}); target async <= 1.10x")
    modes["async"].close()


if __name__ == "__main__":
    main()
