"""The `optim.*` rules, checked once before anything is built (the optimizer and schedules trust them)."""
from __future__ import annotations

from optim.config import OPTIMIZER_NAMES, SCHEDULE_NAMES, WSD_DECAY_SHAPES, OptimConfig
from parallel_state.errors import require, require_choice, require_positive


def check(cfg: OptimConfig, max_steps: int, loss_scaling: bool = False) -> None:
    """Raise ConfigError on the first bad `optim.*` value for a run of `max_steps` steps
    (`loss_scaling`: the precision needs a dynamic loss scale, trainer.precision=fp16)."""
    s = cfg.schedule
    require_choice("optim.name", cfg.name, OPTIMIZER_NAMES)
    require_positive("optim.lr", cfg.lr)
    require(cfg.weight_decay >= 0, "optim.weight_decay", cfg.weight_decay, "must be >= 0", "use e.g. 0.1")
    for name in ("beta1", "beta2"):
        value = getattr(cfg, name)
        require(0.0 <= value < 1.0, f"optim.{name}", value, "must lie in [0, 1)", "use e.g. 0.9 / 0.95")
    require_positive("optim.eps", cfg.eps)
    require(cfg.clip_grad >= 0, "optim.clip_grad", cfg.clip_grad, "must be >= 0", "use 1.0, or 0 to disable")
    require(not (cfg.fused and cfg.foreach), "optim.fused", cfg.fused,
            "cannot be combined with optim.foreach=true (torch's AdamW takes one implementation)",
            "set optim.foreach=null (or false) to use the fused kernel, or optim.fused=false")
    require(cfg.distributed or not cfg.overlap_param_gather, "optim.overlap_param_gather",
            cfg.overlap_param_gather, "overlaps the distributed optimizer's parameter all-gather",
            "set optim.distributed=true, or optim.overlap_param_gather=false")
    if loss_scaling:
        require(cfg.loss_scale_window is not None and cfg.loss_scale_window >= 1, "optim.loss_scale_window",
                cfg.loss_scale_window, "trainer.precision=fp16 needs a dynamic loss scale that grows back after "
                "this many clean steps", "set optim.loss_scale_window=1000 (Megatron's default), or use "
                "trainer.precision=bf16, which needs no loss scale")
        require(cfg.min_loss_scale > 0, "optim.min_loss_scale", cfg.min_loss_scale, "must be > 0", "use 1.0")
        require(cfg.initial_loss_scale >= cfg.min_loss_scale, "optim.initial_loss_scale", cfg.initial_loss_scale,
                f"is below optim.min_loss_scale={cfg.min_loss_scale}", "use e.g. 65536")
    require_choice("optim.schedule.name", s.name, SCHEDULE_NAMES)
    require_choice("optim.schedule.wsd_decay_shape", s.wsd_decay_shape, WSD_DECAY_SHAPES)
    require(0 <= s.warmup_steps < max_steps, "optim.schedule.warmup_steps",
            s.warmup_steps, f"must be smaller than trainer.max_steps={max_steps}",
            f"use fewer warmup steps (e.g. {max(max_steps // 10, 0)}) or train longer")
    if s.decay_steps is not None:
        require_positive("optim.schedule.decay_steps", s.decay_steps)
        require(s.warmup_steps + s.decay_steps <= max_steps, "optim.schedule.decay_steps", s.decay_steps,
                f"warmup {s.warmup_steps} + decay {s.decay_steps} exceeds trainer.max_steps={max_steps}",
                "shorten decay_steps, or leave it null to decay over the remaining steps")
    require(0.0 <= s.min_lr_ratio <= 1.0, "optim.schedule.min_lr_ratio", s.min_lr_ratio,
            "must lie in [0, 1]", "use e.g. 0.1")
    require(0.0 < s.wsd_decay_fraction <= 1.0, "optim.schedule.wsd_decay_fraction", s.wsd_decay_fraction,
            "must lie in (0, 1]", "use e.g. 0.2 (decay over the last 20% of steps)")
