"""Typed configuration of the optimizer and the learning-rate schedule.

Only OmegaConf structured-config types are used (no tuples, no unions other than `X | None`) so that
Hydra can compose these dataclasses directly. Cross-field rules that involve other config groups
(e.g. warmup vs. the trainer's max_steps) are checked by the trainer's validation module; this
module only resolves derived values.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SCHEDULE_NAMES = ("cosine", "linear", "wsd", "constant")
WSD_DECAY_SHAPES = ("linear", "cosine", "sqrt")
OPTIMIZER_NAMES = ("adamw", "sgd")
# Outer optimizers over workers (optim/outer, docs/co2.md): none, or the three that average workers.
OUTER_NAMES = ("none", "localsgd", "diloco", "co2")
STALENESS_PENALTIES = ("constant", "gap")


@dataclass
class LRScheduleConfig:
    # Shape of the decay after the linear warmup: cosine | linear | wsd | constant.
    name: str = "cosine"
    # Optimizer steps of linear warmup from lr/warmup_steps up to lr (0: start at lr).
    warmup_steps: int = 0
    # Steps over which lr decays to the floor; None means max_steps - warmup_steps, so the last
    # training step runs at the floor. The trainer supplies max_steps.
    decay_steps: int | None = None
    # Floor of the decay as a fraction of optim.lr (ignored by "constant").
    min_lr_ratio: float = 0.1
    # WSD only: the last fraction of decay_steps decays; the rest stays at lr (the "stable" phase).
    wsd_decay_fraction: float = 0.2
    # WSD only: shape of the final decay: linear | cosine | sqrt (1 - sqrt(progress), as MiniCPM).
    wsd_decay_shape: str = "linear"


@dataclass
class CO2Config:
    """The outer optimizer's settings (docs/co2.md), read by every `optim.outer` but "none"."""

    # Workers the data-parallel ranks are split into: blocks of dp / workers contiguous data-parallel
    # ranks (typically one node each) that train synchronously inside and average every tau steps.
    workers: int = 1
    # Inner optimizer steps per outer round (the paper uses 12-48; DiLoCo hundreds).
    tau: int = 12
    # Outer learning rate: x_{t+1} = x_t - alpha * m_t (1.0 with beta 0: plain parameter averaging).
    alpha: float = 1.0
    # Outer momentum: m_t = beta * m_{t-1} + Lambda_t * Delta (DiLoCo: Nesterov, typically 0.9).
    beta: float = 0.5
    # Element-wise clip of the outer momentum to [-clip, clip]; 0 disables it (the paper's phi).
    clip: float = 0.0
    # co2 only, the staleness gap penalty Lambda_t: "constant" (1, the public code's default) or "gap"
    # (1 / (1 + |x_t - x_{t-1}| / |Delta|): shrinks a stale Delta when the anchor moved far since).
    penalty: str = "constant"


BACKENDS = ("native", "deepspeed")


@dataclass
class DeepSpeedConfig:
    """The DeepSpeed engine's settings (optim.backend=deepspeed; optim/deepspeed_engine.py, docs/deepspeed.md)."""

    # ZeRO stage: 1 shards the optimizer state over the data-parallel ranks, 2 also the gradients,
    # 3 also the parameters (gathered module by module in forward and backward).
    stage: int = 1
    # Bucket size (elements) of ZeRO's gradient reduce and parameter all-gather (DeepSpeed's default 5e8).
    bucket_size: int = 500_000_000


@dataclass
class OptimConfig:
    # Optimizer implementation: "adamw", or "sgd" (torch's SGD with optim.momentum; weight_decay is
    # then L2, added to the gradient; beta1/beta2/eps are unused).
    name: str = "adamw"
    # Peak learning rate; the schedule scales it each step.
    lr: float = 3e-4
    # Decoupled (AdamW) weight decay for the decay group.
    weight_decay: float = 0.1
    # Adam first-moment coefficient.
    beta1: float = 0.9
    # Adam second-moment coefficient (0.95 is the usual LLM choice; more stable than 0.999).
    beta2: float = 0.95
    # Adam denominator epsilon.
    eps: float = 1e-8
    # Megatron/torchtitan default is False: 1-D params (norm weights, biases) get no weight decay.
    decay_norms_and_biases: bool = False
    # Extra substrings of parameter names that get no weight decay (e.g. "embedding").
    no_decay_names: list[str] = field(default_factory=list)
    # Global gradient-norm clip threshold; 0 disables clipping (the norm is still reported).
    clip_grad: float = 1.0
    # Learning-rate schedule.
    schedule: LRScheduleConfig = field(default_factory=LRScheduleConfig)
    # Distributed optimizer (ZeRO-1, Megatron's DistributedOptimizer): gradients are reduce-scattered
    # over dp x cp (experts over edp) and each rank keeps and updates only its shard of the fp32
    # master weights and Adam moments, then the updated parameters are all-gathered.
    distributed: bool = False
    # With the distributed optimizer: launch the parameter all-gathers after the update and wait for
    # each bucket only when the next forward first reaches a module holding its parameters.
    overlap_param_gather: bool = False
    # fp16 only (trainer.precision=fp16), dynamic loss scaling: the loss is multiplied by the scale
    # before backward; a step whose gradients overflow is skipped and halves the scale; this many clean
    # steps in a row double it (Megatron's --loss-scale-window; its default 1000).
    loss_scale_window: int | None = 1000
    # fp16: the scale of the first step (torch.amp's default 2**16; a too-high start only costs a few
    # skipped steps while it halves down).
    initial_loss_scale: float = 65536.0
    # fp16: the scale never halves below this.
    min_loss_scale: float = 1.0
    # torch.optim.AdamW's foreach switch; None lets torch choose for the device.
    foreach: bool | None = None
    # torch.optim.AdamW's fused kernel (CUDA, and CPU since torch 2.4): one kernel per step is
    # faster, but it rounds differently from the for-loop/foreach paths, so it is off by default to
    # keep the pinned one-process losses. Exclusive with foreach=true (torch refuses both).
    fused: bool = False
    # optim.name=sgd: heavy-ball momentum coefficient (0: plain SGD) and Nesterov's variant of it.
    momentum: float = 0.0
    nesterov: bool = False
    # Outer optimizer over optim.co2.workers workers (docs/co2.md): "none"; "localsgd" (synchronous
    # averaging every tau steps, with outer momentum beta); "diloco" (synchronous, Nesterov outer
    # momentum); "co2" (the average runs during the next round and is applied one round late).
    outer: str = "none"
    co2: CO2Config = field(default_factory=CO2Config)
    # Who runs the optimizer step: "native" (foldtron's steps above) or "deepspeed" (DeepSpeed's engine
    # with ZeRO optim.deepspeed.stage; data parallelism only, fp32, checkpoints in DeepSpeed's format;
    # needs the `deepspeed` package, in the dev extras; docs/deepspeed.md).
    backend: str = "native"
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)


def resolved_decay_steps(cfg: LRScheduleConfig, max_steps: int) -> int:
    """Number of decay steps after warmup: cfg.decay_steps, or max_steps - warmup_steps when None
    (optim.check has made sure both fit in max_steps)."""
    return int(cfg.decay_steps) if cfg.decay_steps is not None else max_steps - cfg.warmup_steps
