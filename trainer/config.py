"""The typed config tree and its registration with Hydra.

Each component owns its sub-config (ModelConfig in models, OptimConfig in optim, ParallelConfig in
parallel_state, DataConfig in trainer.data); this module only assembles the tree, so Hydra's
structured-config checks reject unknown keys and wrong types with the key's full name.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError

from models.config import ModelConfig
from optim.config import OptimConfig
from parallel_state.config import ParallelConfig
from parallel_state.errors import require, require_choice, require_positive
from trainer.checkpoint import list_checkpoints
from trainer.data.config import DataConfig
from trainer.precision import PRECISIONS


@dataclass
class TrainerConfig:
    """The training loop: length, intervals, precision, checkpointing, failure policy."""

    max_steps: int = 100  # optimizer steps (global batches) to train
    log_interval: int = 10  # steps between console/metrics lines
    eval_interval: int = 0  # steps between validation passes; 0 = no periodic evaluation
    eval_at_end: bool = True  # evaluate after the last step (and print it against the unigram entropy)
    eval_iters: int = 4  # validation global batches per evaluation
    save_interval: int = 0  # steps between checkpoints; 0 = only at the end
    save_final: bool = True  # write a checkpoint after the last step
    keep_last: int = 3  # complete checkpoints kept; older ones are deleted (0 keeps all)
    run_dir: str | None = None  # null: runs/<name>/<timestamp>, agreed by all ranks
    resume: str = "none"  # none | auto (newest complete checkpoint in run_dir) | path to a step_* dir
    # Weights only (fine-tuning): a step_* dir of any layout or an export of launch/export.py; the
    # optimizer, LR schedule and data start fresh. A resume, when it finds a checkpoint, wins.
    load: str | None = None
    async_save: bool = False  # write checkpoints in a background thread while training goes on
    # fp32 | bf16 (bf16 weights, fp32 main grads and master weights) | fp16 (as bf16, plus dynamic loss
    # scaling) | bf16_autocast (fp32 weights, forward under autocast); see docs/precision.md
    precision: str = "fp32"
    device: str = "auto"  # auto | cpu | cuda
    nan_policy: str = "stop"  # stop | skip: what a non-finite loss or grad norm does
    max_skipped_steps: int = 10  # with nan_policy=skip: stop after this many consecutive skips
    # Minutes of wall-clock time (from the job's start, FOLDTRON_START_TIME when set, else this
    # process's): once reached, save a checkpoint after the current step and exit with status 75, as
    # SIGTERM does; null: no limit. Leave a margin below the scheduler's limit for one step and a save.
    time_limit: float | None = None
    peak_tflops: float | None = None  # per-device peak for MFU; null: GPU table or a CPU matmul probe
    progress_bar: bool = True  # draw a progress bar in the console line
    num_threads: int | None = None  # torch intra-op threads per rank on CPU; null: cores / local ranks
    # A rank whose step time over a log window exceeds the median rank's by this factor is named in the
    # console and the metrics (perf/stragglers).
    straggler_factor: float = 1.5
    # [first, last] (1-based, inclusive): record a torch.profiler trace of these steps (Chrome trace
    # under run_dir/profile/); empty: no profiling.
    profile_steps: list[int] = field(default_factory=list)
    # The global ranks that record the trace.
    profile_ranks: list[int] = field(default_factory=lambda: [0])


@dataclass
class LoggerConfig:
    """Where metrics go besides the console and run_dir/metrics.jsonl (always written)."""

    backend: str = "none"  # none | wandb | tensorboard
    project: str = "foldtron"  # W&B project
    entity: str | None = None  # W&B entity (team or user)
    run_name: str | None = None  # W&B / TensorBoard run name; null: the run directory's name
    wandb_mode: str | None = None  # online | offline | disabled; null: online with a key, else offline
    tags: list[str] = field(default_factory=list)  # W&B tags


DEVICES = ("auto", "cpu", "cuda")
NAN_POLICIES = ("stop", "skip")
LOGGER_BACKENDS = ("none", "wandb", "tensorboard")
WANDB_MODES = ("online", "offline", "disabled")


def check_trainer(t: TrainerConfig, world_size: int = 1) -> None:
    """Raise ConfigError on the first bad `trainer.*` value for a run on `world_size` ranks (a resume
    target must exist, and a fresh run must not overwrite a run directory that holds checkpoints)."""
    require_positive("trainer.max_steps", t.max_steps)
    require_positive("trainer.log_interval", t.log_interval)
    require_positive("trainer.eval_iters", t.eval_iters)
    for name in ("eval_interval", "save_interval", "keep_last", "max_skipped_steps"):
        value = getattr(t, name)
        require(value >= 0, f"trainer.{name}", value, "must be >= 0", f"set trainer.{name}=0 to disable")
    require_choice("trainer.precision", t.precision, PRECISIONS)
    require_choice("trainer.device", t.device, DEVICES)
    require_choice("trainer.nan_policy", t.nan_policy, NAN_POLICIES)
    if t.time_limit is not None:
        require(t.time_limit > 0, "trainer.time_limit", t.time_limit, "must be > 0 minutes",
                "set the minutes of wall-clock time the run may use (e.g. trainer.time_limit=235 in a 4-hour "
                "job), or null for no limit")
    require(t.straggler_factor > 1.0, "trainer.straggler_factor", t.straggler_factor,
            "must be > 1 (a rank is a straggler when slower than this times the median)", "use e.g. 1.5")
    if t.profile_steps:
        steps = list(t.profile_steps)
        require(len(steps) == 2 and 1 <= steps[0] <= steps[1] <= t.max_steps, "trainer.profile_steps", steps,
                f"must be [first, last] with 1 <= first <= last <= trainer.max_steps={t.max_steps}",
                "e.g. trainer.profile_steps=[5,7], or [] to profile nothing")
        bad = [r for r in t.profile_ranks if not 0 <= r < world_size]
        require(not bad, "trainer.profile_ranks", list(t.profile_ranks),
                f"ranks {bad} do not exist in a world of {world_size}", f"use ranks in [0, {world_size})")
    if t.peak_tflops is not None:
        require_positive("trainer.peak_tflops", t.peak_tflops)
    if t.resume not in ("none", "auto"):
        require(os.path.isdir(t.resume), "trainer.resume", t.resume, "checkpoint directory does not exist",
                "point it at an existing checkpoints/step_XXXXXX directory, or use auto / none")
    if t.load is not None:
        require(os.path.exists(t.load), "trainer.load", t.load, "no such checkpoint",
                "point it at a checkpoints/step_XXXXXX directory or an export of launch/export.py")
    if t.resume == "none" and t.run_dir is not None:
        existing = list_checkpoints(t.run_dir)
        require(not existing, "trainer.resume", t.resume,
                f"trainer.run_dir={t.run_dir} already holds checkpoints (newest: step "
                f"{existing[-1][0] if existing else 0}); a fresh run there would overwrite them and mix its "
                "metrics with the old ones",
                "use trainer.resume=auto to continue that run, or choose a new trainer.run_dir")
    if t.resume == "auto":
        require(t.run_dir is not None, "trainer.resume", t.resume,
                "auto resumes from trainer.run_dir, which is null (a fresh timestamped directory)",
                "set trainer.run_dir to the directory of the run to continue")


def check_logger(cfg: LoggerConfig) -> None:
    """Raise ConfigError on a bad `logger.*` value."""
    require_choice("logger.backend", cfg.backend, LOGGER_BACKENDS)
    if cfg.wandb_mode is not None:
        require_choice("logger.wandb_mode", cfg.wandb_mode, WANDB_MODES)


@dataclass
class Config:
    """The whole run. Components receive only their own sub-config."""

    seed: int = 1234  # seeds weights (by parameter name), data order and dropout
    name: str = "default"  # run name; the default run_dir is runs/<name>/<timestamp>
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


SCHEMA_NAME = "foldtron_schema"


def register_configs() -> None:
    """Register the schema so conf/config.yaml can list it first in its defaults."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA_NAME, node=Config)


def to_config(cfg: DictConfig | Config) -> Config:
    """Turn a composed (schema-checked) DictConfig into the typed dataclass tree."""
    if isinstance(cfg, Config):
        return cfg
    _reject_unknown_keys(cfg, Config, "")
    merged = OmegaConf.merge(OmegaConf.structured(Config), cfg)
    return OmegaConf.to_object(merged)


def _reject_unknown_keys(node: DictConfig, schema: type, prefix: str) -> None:
    # Hydra's `+key=value` opens the struct flag, so a typo appended with + would otherwise be
    # dropped silently by to_object. Every key must be a field of its dataclass.
    import dataclasses
    import typing

    hints = typing.get_type_hints(schema)
    for key in node:
        if key not in hints:
            raise ConfigKeyError(f"Key '{key}' not in '{schema.__name__}'\n    full_key: {prefix}{key}\n"
                                 f"    known keys: {', '.join(f.name for f in dataclasses.fields(schema))}")
        child = node._get_node(key)
        if dataclasses.is_dataclass(hints[key]) and isinstance(child, DictConfig):
            _reject_unknown_keys(child, hints[key], f"{prefix}{key}.")


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML (what run_dir/config.yaml holds)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def default_conf_dir() -> str:
    """conf/ of the checkout this package runs from."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")


def compose(overrides: list[str] | tuple[str, ...] = (), config_dir: str | None = None) -> Config:
    """Compose conf/config.yaml with command-line style overrides, as launch/train.py would.

    For notebooks, benchmarks and tests; raises Hydra's errors for unknown keys, wrong types and
    unknown group options exactly as the command line does.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=config_dir or default_conf_dir(), version_base=None):
        return to_config(hydra_compose("config", overrides=list(overrides)))
