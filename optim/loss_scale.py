"""Dynamic loss scaling for fp16 training (pure bookkeeping; the trainer multiplies and divides).

fp16 flushes gradients below about 6e-8 to zero, so the loss is multiplied by a large scale before
backward and the gradients divided by it before clipping and the update. When a step's gradients
overflow (inf/nan) the update is skipped and the scale halves; after `window` clean steps in a row it
doubles again, so the scale tracks the largest value that does not overflow.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DynamicLossScale:
    """The current scale and how many clean steps have passed since it last changed."""

    scale: float
    window: int  # clean steps before the scale doubles (optim.loss_scale_window)
    min_scale: float = 1.0
    clean_steps: int = 0

    def update(self, overflow: bool) -> None:
        """Record one step: an overflow halves the scale (not below min_scale) and restarts the count;
        `window` clean steps in a row double it."""
        if overflow:
            self.scale = max(self.scale / 2.0, self.min_scale)
            self.clean_steps = 0
            return
        self.clean_steps += 1
        if self.clean_steps >= self.window:
            self.scale *= 2.0
            self.clean_steps = 0

    def state_dict(self) -> dict[str, float]:
        return {"scale": self.scale, "clean_steps": self.clean_steps}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.scale = float(state["scale"])
        self.clean_steps = int(state["clean_steps"])
