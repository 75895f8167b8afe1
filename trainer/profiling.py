"""torch.profiler traces of chosen steps on chosen ranks (trainer.profile_steps / profile_ranks).

The trace is a Chrome trace (`run_dir/profile/rank00003_steps5-7.json`) that Perfetto
(ui.perfetto.dev) or chrome://tracing open; each step is a `train_step N` range in it.
"""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import torch
from torch.profiler import ProfilerActivity, profile, record_function

log = logging.getLogger(__name__)


class StepProfiler:
    """Profiles steps first..last (1-based, inclusive) when this rank is among `ranks`."""

    def __init__(self, steps: list[int], ranks: list[int], rank: int, run_dir: str, device: torch.device):
        self.enabled = bool(steps) and rank in ranks
        self.first, self.last = (steps[0], steps[1]) if steps else (0, -1)
        self.path = os.path.join(run_dir, "profile", f"rank{rank:05d}_steps{self.first}-{self.last}.json")
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        self._profile = profile(activities=activities, record_shapes=True) if self.enabled else None

    @contextlib.contextmanager
    def step(self, number: int) -> Iterator[None]:
        """Wrap training step `number` (1-based): recorded when it lies in the profiled range."""
        if not self.enabled or not self.first <= number <= self.last:
            yield
            return
        if number == self.first:
            self._profile.start()
        with record_function(f"train_step {number}"):
            yield
        if number == self.last:
            self._finish()

    def close(self) -> None:
        """A run that ends inside the range still writes what it recorded."""
        if self.enabled and self._profile is not None and self._profile.profiler is not None:
            self._finish()

    def _finish(self) -> None:
        self._profile.stop()
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self._profile.export_chrome_trace(self.path)
        log.info("profiler: wrote %s (open it in ui.perfetto.dev)", self.path)
        self._profile = None
