"""What the trainer logs of an outer optimizer (docs/co2.md, "Metrics"), and the per-worker loss
contract's mean over workers."""
from __future__ import annotations

import torch

from parallel_state.collectives import all_reduce_sum
from parallel_state.groups import AxisGroup


def mean_over_workers(value: float, outer: AxisGroup) -> float:
    """The mean of a per-worker figure (a loss normalised over the worker's tokens) over workers."""
    if outer.size == 1:
        return value
    return all_reduce_sum(torch.tensor(value, dtype=torch.float64), outer).item() / outer.size


def outer_step_metrics(optim_step) -> dict[str, float]:
    """This step's outer metrics (outer/*) if `optim_step` is an outer optimizer, else none."""
    metrics = getattr(optim_step, "step_metrics", None)
    return metrics() if metrics is not None else {}


def outer_window_metrics(window: list[dict[str, float]]) -> dict[str, float]:
    """A log window's outer metrics: the last round, staleness, |Delta| and penalty, and the mean
    seconds per step spent waiting for an outer average."""
    last = window[-1]
    out = {key: last[key] for key in last if key.startswith("outer/") and key != "outer/wait_s"}
    if "outer/wait_s" in last:
        out["outer/wait_s"] = sum(m.get("outer/wait_s", 0.0) for m in window) / len(window)
    return out
