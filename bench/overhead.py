"""Trainer overhead: tokens/s of foldtron's Trainer vs a plain PyTorch loop, measured in one run.

Both sides train the same model class from the same seed on the same batches with the same AdamW
settings and gradient clipping; the plain loop is what one would write by hand (mean cross-entropy
per microbatch, divided by the number of microbatches). Rounds alternate A/B to share machine
noise; the median of the per-round ratios is printed. Target: ratio >= 0.97.

    .venv/bin/python bench/overhead.py [--steps 20] [--rounds 3] [overrides ...]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models import build_model
from trainer.config import compose
from trainer.trainer import Trainer


def time_trainer(overrides: list[str], steps: int, run_dir: str) -> float:
    trainer = Trainer(compose(overrides + [f"trainer.max_steps={steps}", f"trainer.run_dir={run_dir}"]))
    start = time.perf_counter()
    trainer.train()
    return time.perf_counter() - start


def time_plain_loop(overrides: list[str], steps: int) -> float:
    cfg = compose(overrides + [f"trainer.max_steps={steps}"])
    # Reuse the trainer's data only to get identical batches; fetched before the clock starts.
    probe = Trainer(compose(overrides + [f"trainer.max_steps={steps}",
                                         f"trainer.run_dir={tempfile.mkdtemp(prefix='plain_')}"]))
    batches = [probe.data.train_microbatches(s) for s in range(steps)]
    model = build_model(probe.cfg.model, seed=cfg.seed)
    o = cfg.optim
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=False)
    model.train()
    start = time.perf_counter()
    for microbatches in batches:
        for mb in microbatches:
            logits = model(mb["input_ids"])
            loss = F.cross_entropy(logits.float().flatten(0, 1), mb["labels"].flatten())
            (loss / len(microbatches)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_grad)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()  # a hand-written loop prints its loss too
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides (default: the quickstart)")
    args = parser.parse_args()
    overrides = ["+experiment=quickstart", "trainer.eval_interval=0", "trainer.eval_at_end=false",
                 "trainer.save_interval=0", "trainer.save_final=false", "trainer.log_interval=10",
                 "trainer.peak_tflops=1.0", "logger=none", "optim.schedule.warmup_steps=1", *args.overrides]
    cfg = compose(overrides)
    tokens = args.steps * cfg.data.global_batch_size * cfg.data.seq_len
    time_trainer(overrides, 2, tempfile.mkdtemp(prefix="warm_"))  # warm up allocator, caches, data
    ratios = []
    for r in range(args.rounds):
        with tempfile.TemporaryDirectory() as d:
            t_foldtron = time_trainer(overrides, args.steps, d)
        t_plain = time_plain_loop(overrides, args.steps)
        ratios.append(t_plain / t_foldtron)
        print(f"round {r}: foldtron {tokens / t_foldtron:,.0f} tok/s | plain PyTorch loop "
              f"{tokens / t_plain:,.0f} tok/s | ratio {t_plain / t_foldtron:.3f}")
    ratio = statistics.median(ratios)
    print(f"overhead ratio (foldtron tokens/s / plain PyTorch loop tokens/s, median of {args.rounds}): "
          f"{ratio:.3f}  target >= 0.97  {'OK' if ratio >= 0.97 else 'BELOW TARGET'}")


if __name__ == "__main__":
    main()
