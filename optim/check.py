"""The `optim.*` rules, checked once before anything is built (the optimizer and schedules trust them)."""
from __future__ import annotations

import importlib.util

from optim.config import (
    BACKENDS,
    OPTIMIZER_NAMES,
    OUTER_NAMES,
    SCHEDULE_NAMES,
    STALENESS_PENALTIES,
    WSD_DECAY_SHAPES,
    OptimConfig,
)
from parallel_state.errors import require, require_choice, require_positive
from parallel_state.topology import Topology, check_workers


def check(cfg: OptimConfig, max_steps: int, loss_scaling: bool = False, topology: Topology | None = None) -> None:
    """Raise ConfigError on the first bad `optim.*` value for a run of `max_steps` steps
    (`loss_scaling`: the precision needs a dynamic loss scale, trainer.precision=fp16) on the layout
    `topology` (its worker rules are skipped without one)."""
    s = cfg.schedule
    require_choice("optim.name", cfg.name, OPTIMIZER_NAMES)
    require(0.0 <= cfg.momentum < 1.0, "optim.momentum", cfg.momentum, "must lie in [0, 1)", "use e.g. 0.9, or 0")
    require(not cfg.nesterov or (cfg.name == "sgd" and cfg.momentum > 0), "optim.nesterov", cfg.nesterov,
            "is Nesterov momentum of optim.name=sgd and needs optim.momentum > 0",
            "set optim.name=sgd optim.momentum=0.9, or optim.nesterov=false")
    require(cfg.name != "sgd" or not cfg.distributed, "optim.name", cfg.name,
            "SGD runs with the all-reduce step only (the distributed optimizer shards AdamW's state)",
            "set optim.distributed=false with optim.name=sgd, or optim.name=adamw")
    check_outer(cfg, topology)
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


def check_outer(cfg: OptimConfig, topology: Topology | None) -> None:
    """The outer optimizer's rules (`optim.outer`, `optim.co2.*`; docs/co2.md)."""
    c = cfg.co2
    require_choice("optim.outer", cfg.outer, OUTER_NAMES)
    if cfg.outer == "none":
        require(c.workers == 1, "optim.co2.workers", c.workers, "splits the data-parallel ranks into workers, "
                "but no outer optimizer averages them (optim.outer=none)",
                "set optim.outer=co2 (or localsgd / diloco), or optim.co2.workers=1")
        return
    # The DeepSpeed engine owns the whole step; an outer optimizer wraps foldtron's own.
    require(cfg.backend != "deepspeed", "optim.outer", cfg.outer,
            "wraps foldtron's own optimizer step and cannot drive the DeepSpeed engine (optim.backend=deepspeed)",
            "set optim.backend=native with an outer optimizer, or optim.outer=none with DeepSpeed")
    require(isinstance(c.workers, int) and c.workers >= 1, "optim.co2.workers", c.workers, "must be a positive integer",
            "set it to the number of workers (e.g. nodes), 1 for none")
    require(isinstance(c.tau, int) and c.tau >= 1, "optim.co2.tau", c.tau,
            "is the number of inner steps per outer round and must be >= 1", "use e.g. 12 (the paper: 12-48)")
    require_positive("optim.co2.alpha", c.alpha)
    require(0.0 <= c.beta < 1.0, "optim.co2.beta", c.beta, "must lie in [0, 1)",
            "use e.g. 0.5 (co2) or 0.9 (diloco), 0 for none")
    require(c.clip >= 0, "optim.co2.clip", c.clip, "must be >= 0", "use e.g. 1.0, or 0 to disable clipping")
    require_choice("optim.co2.penalty", c.penalty, STALENESS_PENALTIES)
    require(cfg.outer == "co2" or c.penalty == "constant", "optim.co2.penalty", c.penalty,
            f"penalises the staleness of co2's one-round-late average; optim.outer={cfg.outer} has none",
            "set optim.co2.penalty=constant, or optim.outer=co2")
    if topology is not None:
        check_workers(topology.world_size, c.workers, tp=topology.tp, cp=topology.cp, pp=topology.pp,
                      ep=topology.ep, etp=topology.etp)


def check_backend(cfg: OptimConfig, topology: Topology, precision: str, nan_policy: str) -> None:
    """`optim.backend` and `optim.deepspeed.*` (docs/deepspeed.md): DeepSpeed's engine runs data
    parallelism only, in fp32, instead of foldtron's step, and needs the deepspeed package."""
    require_choice("optim.backend", cfg.backend, BACKENDS)
    if cfg.backend != "deepspeed":
        return
    d = cfg.deepspeed
    require(d.stage in (1, 2, 3), "optim.deepspeed.stage", d.stage, "is DeepSpeed's ZeRO stage: 1, 2 or 3",
            "use 1 (optimizer state sharded), 2 (+ gradients) or 3 (+ parameters)")
    require_positive("optim.deepspeed.bucket_size", d.bucket_size)
    sizes = {"parallel.tp": topology.tp, "parallel.pp": topology.pp, "parallel.cp": topology.cp,
             "parallel.ep": topology.ep}
    for field_name, size in sizes.items():
        require(size == 1, field_name, size,
                "is not supported with optim.backend=deepspeed: the DeepSpeed engine runs data parallelism "
                "only (foldtron's own TP/PP/CP/EP layers and reductions need its native step)",
                f"set {field_name}=1 (all ranks data-parallel), or optim.backend=native")
    require(not cfg.distributed, "optim.distributed", cfg.distributed,
            "is foldtron's distributed optimizer (ZeRO-1); with optim.backend=deepspeed, DeepSpeed shards the "
            "optimizer state itself", "set optim.distributed=false and choose optim.deepspeed.stage")
    require(cfg.name == "adamw", "optim.name", cfg.name, "the DeepSpeed engine runs foldtron's AdamW only",
            "use optim.name=adamw with optim.backend=deepspeed")
    require(precision == "fp32", "trainer.precision", precision,
            "is not implemented with optim.backend=deepspeed (DeepSpeed's engine is driven in fp32 here)",
            "use trainer.precision=fp32, or optim.backend=native")
    require(nan_policy == "stop", "trainer.nan_policy", nan_policy,
            "skip needs to drop an update after seeing the grad norm, but DeepSpeed's step updates in the same call",
            "use trainer.nan_policy=stop with optim.backend=deepspeed")
    require(not cfg.fused, "optim.fused", cfg.fused, "is not passed to the DeepSpeed engine",
            "set optim.fused=false with optim.backend=deepspeed")
    require(importlib.util.find_spec("deepspeed") is not None, "optim.backend", cfg.backend,
            "needs the deepspeed package, which is not installed",
            "pip install 'deepspeed>=0.14' (the [deepspeed] or [dev] extra; on CPU set DS_BUILD_OPS=0), "
            "or optim.backend=native")


def outer_topology(cfg: OptimConfig, topology: Topology) -> Topology:
    """The layout split into the outer optimizer's workers (unchanged without an outer optimizer)."""
    return topology.with_workers(cfg.co2.workers if cfg.outer != "none" else 1)
