"""What logging costs: quickstart tokens/s with every metric and dashboard on vs logging off, one run.

"On": the cross-rank metrics (step/busy/data time, peak memory, bytes summed over ranks) every
`trainer.log_interval` steps, W&B offline and TensorBoard sinks (two runs, one per backend; the
slower is reported), per-layer expert loads for MoE models. "Off": `logger=none` and one log line
at the end. Rounds alternate on/off; each prints tokens/s of both and their ratio; the median ratio
is the figure (target >= 0.97, i.e. logging within 3%).

    .venv/bin/python bench/logging_overhead.py [--steps 40] [--rounds 3] [--log-interval 10] [overrides ...]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trainer.config import compose
from trainer.trainer import Trainer


def tokens_per_s(overrides: list[str], steps: int, run_dir: str) -> float:
    """Tokens/s of trainer.train() over `steps` steps (set-up excluded)."""
    os.environ["WANDB_MODE"] = "offline"
    with contextlib.redirect_stdout(io.StringIO()):
        trainer = Trainer(compose(overrides + [f"trainer.max_steps={steps}", f"trainer.run_dir={run_dir}",
                                               "trainer.eval_interval=0", "trainer.eval_at_end=false",
                                               "trainer.save_interval=0", "trainer.save_final=false",
                                               # the LR schedule does not change the cost of a step, and
                                               # the quickstart's warmup is longer than a short round
                                               "optim.schedule.warmup_steps=0"]))
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    return trainer.tokens_per_step * steps / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--log-interval", type=int, default=10, help="the quickstart's trainer.log_interval")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    base = ["+experiment=quickstart", *args.overrides]
    on = {backend: base + [f"logger={backend}", f"trainer.log_interval={args.log_interval}"]
          for backend in ("wandb", "tensorboard")}
    off = base + ["logger=none", f"trainer.log_interval={args.steps}"]
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        tokens_per_s(off, 3, os.path.join(tmp, "warmup"))  # caches, first-call costs
        for r in range(args.rounds):
            quiet = tokens_per_s(off, args.steps, os.path.join(tmp, f"off{r}"))
            logged = min(tokens_per_s(cfg, args.steps, os.path.join(tmp, f"{name}{r}")) for name, cfg in on.items())
            ratios.append(logged / quiet)
            print(f"round {r + 1}: logging on {logged:,.0f} tok/s, off {quiet:,.0f} tok/s, on/off {ratios[-1]:.3f}")
    print(f"median on/off over {args.rounds} rounds: {statistics.median(ratios):.3f} (target >= 0.97)")


if __name__ == "__main__":
    main()
