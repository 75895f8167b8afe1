"""Optimizers, LR schedules, gradient clipping and the `optim.*` config rules. Of foldtron, imports only
parallel_state (docs/architecture.md, "Packages")."""

from optim.adamw import build_optimizer
from optim.check import check, check_backend, outer_topology
from optim.clip import clip_grad_norm_
from optim.config import LRScheduleConfig, OptimConfig, resolved_decay_steps
from optim.param_groups import build_param_groups
from optim.schedules import LRScheduler, lr_at

__all__ = [
    "LRScheduleConfig",
    "LRScheduler",
    "OptimConfig",
    "build_optimizer",
    "build_param_groups",
    "check",
    "check_backend",
    "clip_grad_norm_",
    "lr_at",
    "outer_topology",
    "resolved_decay_steps",
]
