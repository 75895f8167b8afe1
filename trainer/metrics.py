"""Metric sinks (metrics.jsonl always; W&B or TensorBoard on request) and the console line.

Only the writer rank (global rank 0) creates sinks; the others never touch shared files.
metrics.jsonl keeps the trainer's own keys (`loss`, `val_loss`, `tokens_per_s`, ...); W&B and
TensorBoard get the same values under dashboard groups (`dashboard_key`: train/, val/, perf/, mem/,
moe/, comm/, ranks/). A value may be a list (one per rank or per expert): metrics.jsonl stores it,
the dashboards show it as a histogram over the rank or expert index.
"""
from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from typing import Any, Protocol

from trainer.config import LoggerConfig

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


# The trainer's plain keys and their dashboard group; keys that already hold a "/" keep their name.
DASHBOARD_KEYS = {
    "loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm", "loss_scale": "train/loss_scale",
    "overflow_steps": "train/overflow_steps", "tokens": "train/tokens", "val_loss": "val/loss",
    "tokens_per_s": "perf/tokens_per_s", "mfu": "perf/mfu", "step_time_s": "perf/step_time_s",
    "elapsed_s": "perf/elapsed_s",
}
STEP_KEY = "train/step"  # the x axis every dashboard panel shares


def dashboard_key(key: str) -> str:
    """The name a metric has in W&B and TensorBoard."""
    return DASHBOARD_KEYS.get(key, key)


def histogram(values: list[float]) -> tuple[list[float], list[float]]:
    """(counts, bin edges) of a per-index vector: bin i spans [i, i + 1) and holds values[i]."""
    return list(values), [float(i) for i in range(len(values) + 1)]


def run_provenance(argv: list[str] | None = None) -> dict[str, Any]:
    """What the dashboards attach besides the resolved config: the command line, its overrides
    and the git commit of the code (with "-dirty" when it has uncommitted changes)."""
    argv = list(sys.argv if argv is None else argv)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        commit += "-dirty" if dirty else ""
    except (OSError, subprocess.SubprocessError):
        commit = "unknown (not a git checkout)"
    return {"command": " ".join(argv), "overrides": [a for a in argv[1:] if "=" in a and not a.startswith("-")],
            "git_commit": commit}


class MetricsSink(Protocol):
    def log(self, step: int, metrics: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class JsonlSink:
    """One JSON object per logged step, appended and flushed so a crash loses at most one line."""

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, METRICS_FILE)
        self._file = open(self.path, "a")  # noqa: SIM115 - held open for the run, closed by close()

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        self._file.write(json.dumps({"step": step, **metrics}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def drop_metrics_after(run_dir: str, step: int) -> int:
    """Remove metrics.jsonl rows of steps after `step` (training a resume rolled back); returns how many.

    Without this, a job that logged past its last checkpoint and was resumed would list those steps twice.
    """
    path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    kept = [line for line in lines if json.loads(line)["step"] <= step]
    if len(kept) != len(lines):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, path)
    return len(lines) - len(kept)


class TensorBoardSink:
    """TensorBoard scalars under run_dir/tensorboard.

    `resume_step`: the step a resumed run restarts from. Events of later steps, written before the
    restart, are purged (TensorBoard's purge_step) so the replayed steps are not shown twice.
    """

    def __init__(self, run_dir: str, resume_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        purge_step = None if resume_step is None else resume_step + 1
        self._writer = SummaryWriter(log_dir=os.path.join(run_dir, "tensorboard"), purge_step=purge_step)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        import numpy as np

        for key, value in metrics.items():
            if isinstance(value, list):
                counts, edges = histogram(value)
                index = np.arange(len(counts), dtype=np.float64)
                weights = np.asarray(counts, dtype=np.float64)
                self._writer.add_histogram_raw(dashboard_key(key), min=0.0, max=float(len(counts)),
                                               num=float(weights.sum()), sum=float((index * weights).sum()),
                                               sum_squares=float((index**2 * weights).sum()),
                                               bucket_limits=edges[1:], bucket_counts=counts, global_step=step)
            else:
                self._writer.add_scalar(dashboard_key(key), value, step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def wandb_mode(cfg: LoggerConfig, environ: dict | None = None) -> str:
    """online with an API key, offline without one, unless logger.wandb_mode or WANDB_MODE says otherwise."""
    environ = os.environ if environ is None else environ
    if cfg.wandb_mode is not None:
        return cfg.wandb_mode
    if environ.get("WANDB_MODE"):
        return environ["WANDB_MODE"]
    if environ.get("WANDB_API_KEY"):
        return "online"
    try:
        import wandb

        if wandb.api.api_key:  # from `wandb login` (netrc)
            return "online"
    except Exception:  # noqa: BLE001, S110 - an unreadable netrc means no key: offline is the answer
        pass
    return "offline"


class WandbSink:
    """A W&B run; offline (synced later with `wandb sync`) when there is no API key.

    One W&B run per run directory. `resume_step`: the step a resumed run restarts from. Online, the
    W&B run is rewound to it (`resume_from`), so the replayed steps replace the ones logged before
    the restart. Offline W&B cannot rewind: the log says so, and metrics.jsonl holds the exact curve.
    """

    def __init__(self, cfg: LoggerConfig, run_dir: str, run_name: str, config: dict[str, Any],
                 resume_step: int | None = None):
        import wandb

        mode = wandb_mode(cfg)
        from_env = cfg.wandb_mode is None and bool(os.environ.get("WANDB_MODE"))
        if mode == "offline" and cfg.wandb_mode is None and not from_env:
            log.warning("W&B: no API key found, logging offline to %s/wandb (sync later with `wandb sync`)",
                        run_dir)
        if mode == "disabled":
            source = "WANDB_MODE=disabled in the environment" if from_env else "logger.wandb_mode=disabled"
            log.warning("W&B: %s, so logger=wandb logs nothing to W&B (metrics.jsonl is still written)", source)
        run_id = _stable_run_id(run_dir)
        where: dict[str, Any] = {"resume": "allow", "id": run_id}
        if resume_step is not None and mode == "online":
            where = {"resume_from": f"{run_id}?_step={resume_step}"}
        elif resume_step is not None and mode == "offline":
            log.warning("W&B: offline runs cannot rewind to step %d: the steps logged after it before the "
                        "restart stay in the W&B run and the replayed ones are dropped by W&B until it passes "
                        "them; metrics.jsonl and TensorBoard show the resumed curve", resume_step)
        self._wandb = wandb
        self._run = wandb.init(project=cfg.project, entity=cfg.entity, name=run_name, config=config,
                               dir=run_dir, mode=mode, tags=list(cfg.tags) or None, **where)
        # Every panel shares the step axis, whichever group (train/, val/, perf/, ...) it shows.
        self._run.define_metric(STEP_KEY)
        self._run.define_metric("*", step_metric=STEP_KEY)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        row: dict[str, Any] = {STEP_KEY: step}
        for key, value in metrics.items():
            row[dashboard_key(key)] = (self._wandb.Histogram(np_histogram=histogram(value))
                                       if isinstance(value, list) else value)
        self._run.log(row, step=step)

    def close(self) -> None:
        self._run.finish()


def _stable_run_id(run_dir: str) -> str:
    # One W&B run per run directory, so a resumed job continues the same curves.
    import hashlib

    return hashlib.sha1(os.path.abspath(run_dir).encode()).hexdigest()[:16]


def build_sinks(cfg: LoggerConfig, run_dir: str, config: dict[str, Any],
                resume_step: int | None = None) -> list[MetricsSink]:
    """metrics.jsonl plus the configured backend; `resume_step` is the step a resumed run restarts
    from (None for a fresh run), which W&B and TensorBoard use to drop the rolled-back steps."""
    sinks: list[MetricsSink] = [JsonlSink(run_dir)]
    run_name = cfg.run_name or os.path.basename(os.path.normpath(run_dir))
    if cfg.backend == "wandb":
        sinks.append(WandbSink(cfg, run_dir, run_name, config, resume_step))
    elif cfg.backend == "tensorboard":
        sinks.append(TensorBoardSink(run_dir, resume_step))
    return sinks


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = round(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def progress_bar(done: int, total: int, width: int = 20) -> str:
    filled = int(width * done / max(total, 1))
    return "[" + "#" * filled + "." * (width - filled) + "]"


def console_line(step: int, max_steps: int, metrics: dict[str, float], elapsed: float, eta: float,
                 bar: bool = True) -> str:
    """`step 120/200 [####....] loss 4.1234 | lr 1.2e-03 | gnorm 0.53 | 12.3k tok/s | MFU 31.0% | ...`"""
    parts = [f"step {step:>{len(str(max_steps))}}/{max_steps}"]
    if bar:
        parts[0] += " " + progress_bar(step, max_steps)
    parts.append(f"loss {metrics['loss']:.4f}")
    if "val_loss" in metrics:
        parts.append(f"val {metrics['val_loss']:.4f}")
    parts.append(f"lr {metrics['lr']:.2e}")
    parts.append(f"gnorm {metrics['grad_norm']:.3f}")
    tps = metrics["tokens_per_s"]
    parts.append(f"{tps / 1000:.1f}k tok/s" if tps >= 1000 else f"{tps:.0f} tok/s")
    parts.append(f"MFU {100 * metrics['mfu']:.1f}%")
    parts.append(f"elapsed {format_duration(elapsed)}")
    parts.append(f"ETA {format_duration(eta)}")
    return " | ".join(parts)
