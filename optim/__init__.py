"""Optimizers, LR schedules and gradient clipping. Imports only torch and the standard library, never
another foldtron package (docs/architecture.md, "Packages")."""

from optim.adamw import build_optimizer
from optim.clip import clip_grad_norm_
from optim.config import LRScheduleConfig, OptimConfig, resolved_decay_steps
from optim.param_groups import build_param_groups
from optim.schedules import LRScheduler, check_schedule_config, lr_at

__all__ = [
    "LRScheduleConfig",
    "LRScheduler",
    "OptimConfig",
    "build_optimizer",
    "build_param_groups",
    "check_schedule_config",
    "clip_grad_norm_",
    "lr_at",
    "resolved_decay_steps",
]
