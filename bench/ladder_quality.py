"""Ladder residual quality: the quickstart trained with standard and with ladder residual.

Both runs use the same data, seed and schedule (+experiment=quickstart vs
+experiment=ladder_quickstart, 200 steps), one process each, one after the other. Prints the final
validation losses and their ratio. Target: ladder within 2% of standard (ratio <= 1.02).

Each run's directory (metrics.jsonl, checkpoints) is kept under --out, so launch/generate.py can
sample from either model afterwards.

    .venv/bin/python bench/ladder_quality.py                  # about 2 x the quickstart's time on CPU
    .venv/bin/python bench/ladder_quality.py --steps 50       # a quicker look (not the README figure)
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trainer.config import compose
from trainer.trainer import Trainer

EXPERIMENTS = {"standard": "quickstart", "ladder": "ladder_quickstart"}
TARGET_RATIO = 1.02


def final_val_loss(experiment: str, run_dir: Path, steps: int | None, threads: int | None) -> float:
    """Train `experiment` in one process and return the validation loss after its last step."""
    overrides = [f"+experiment={experiment}", f"trainer.run_dir={run_dir}", "trainer.eval_at_end=true"]
    if steps is not None:
        overrides.append(f"trainer.max_steps={steps}")
    if threads is not None:
        overrides.append(f"trainer.num_threads={threads}")
    metrics = Trainer(compose(overrides)).train()
    return float(metrics["val_loss"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=f"runs/ladder_quality/{time.strftime('%Y%m%d-%H%M%S')}")
    parser.add_argument("--steps", type=int, default=None, help="override the quickstart's 200 steps")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the trainer's)")
    parser.add_argument("--only", choices=list(EXPERIMENTS), default=None,
                        help="train one of the two (e.g. both at once in two processes), print its loss only")
    args = parser.parse_args()
    losses = {}
    for name, experiment in EXPERIMENTS.items():
        if args.only is not None and name != args.only:
            continue
        start = time.perf_counter()
        losses[name] = final_val_loss(experiment, Path(args.out) / name, args.steps, args.threads)
        print(f"{name:8s} (+experiment={experiment}): final val loss {losses[name]:.4f} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
    if args.only is not None:
        return
    ratio = losses["ladder"] / losses["standard"]
    verdict = "within" if abs(ratio - 1.0) <= TARGET_RATIO - 1.0 else "OUTSIDE"
    print(f"ladder / standard val loss: {ratio:.4f} ({verdict} the 2% target)")


if __name__ == "__main__":
    main()
