"""Learning-rate schedules: linear warmup, then cosine | linear | WSD | constant.

Step convention (as Megatron): `step` is the 0-based index of the optimizer step about to be
taken, and the schedule is a function of n = step + 1, the number of steps done once it is taken.
  warmup  (n <= W):  lr * n / W            -> step 0 is lr/W, never 0; step W-1 is exactly lr.
  decay   (n >  W):  progress p = (n - W) / D, clamped to [0, 1]
                     lr_t = min_lr + (lr - min_lr) * shape(p)
With D = max_steps - W (the default), the last training step (step = max_steps - 1) runs at
exactly min_lr; any step past the decay phase stays at min_lr.
WSD keeps shape = 1 for p <= 1 - wsd_decay_fraction and then decays over the remaining fraction.

The scheduler holds no state beyond its arguments, so resuming only needs the step counter.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from optim.config import LRScheduleConfig, resolved_decay_steps

# Decay shapes map progress q in [0, 1] to a multiplier of (lr - min_lr), 1 -> 0.
_SHAPES: dict[str, Callable[[float], float]] = {
    "linear": lambda q: 1.0 - q,
    "cosine": lambda q: 0.5 * (1.0 + math.cos(math.pi * q)),
    "sqrt": lambda q: 1.0 - math.sqrt(q),
}


def lr_at(step: int, base_lr: float, cfg: LRScheduleConfig, max_steps: int) -> float:
    """Learning rate for the optimizer step with 0-based index `step` (see module docstring)."""
    if step < 0:
        raise ValueError(f"lr_at got step={step}; steps are 0-based indices >= 0")
    done = step + 1
    warmup = cfg.warmup_steps
    if done <= warmup:
        return base_lr * done / warmup
    if cfg.name == "constant":
        return base_lr

    decay_steps = resolved_decay_steps(cfg, max_steps)
    progress = 1.0 if decay_steps == 0 else min((done - warmup) / decay_steps, 1.0)
    if cfg.name == "wsd":
        stable = 1.0 - cfg.wsd_decay_fraction
        if progress <= stable:
            return base_lr
        multiplier = _SHAPES[cfg.wsd_decay_shape]((progress - stable) / cfg.wsd_decay_fraction)
    else:
        multiplier = _SHAPES[cfg.name](progress)
    min_lr = base_lr * cfg.min_lr_ratio
    return min_lr + (base_lr - min_lr) * multiplier


class LRScheduler:
    """Sets the optimizer's lr from lr_at each step; a group's `lr_mult` (default 1) scales it."""

    def __init__(
        self, optimizer: torch.optim.Optimizer, base_lr: float, cfg: LRScheduleConfig, max_steps: int
    ) -> None:
        self.optimizer = optimizer
        self.base_lr = base_lr
        self.cfg = cfg
        self.max_steps = max_steps

    def lr(self, step: int) -> float:
        return lr_at(step, self.base_lr, self.cfg, self.max_steps)

    def apply(self, step: int) -> float:
        """Set every group's lr for optimizer step `step`; returns the unscaled lr (for logging)."""
        lr = self.lr(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
        return lr
