"""Staleness gap penalties Lambda_t of CO2's one-round-late outer update (docs/co2.md).

A penalty is a pure function of two norms measured at the end of round t: |Delta|, the norm of the
averaged pseudo-gradient Delta_{t-1} = x_{t-1} - xbar_{t-1} that arrives one round late, and the
gap |x_t - x_{t-1}|, how far the anchor moved since that average was launched (alpha * |m_{t-1}|,
the previous outer update). It returns the scalar Lambda_t that multiplies Delta in the momentum.
"""
from __future__ import annotations

from collections.abc import Callable

StalenessPenalty = Callable[[float, float], float]


def constant_penalty(delta_norm: float, gap_norm: float) -> float:
    """Lambda = 1: the stale average enters unchanged (the public CO2 code's default)."""
    return 1.0


def gap_penalty(delta_norm: float, gap_norm: float) -> float:
    """Lambda = 1 / (1 + |x_t - x_{t-1}| / |Delta|): a stale Delta counts less the further the anchor
    has moved since it was launched relative to its own size (1 when the anchor did not move)."""
    if delta_norm <= 0.0:
        return 1.0
    return 1.0 / (1.0 + gap_norm / delta_norm)


PENALTIES: dict[str, StalenessPenalty] = {"constant": constant_penalty, "gap": gap_penalty}


def staleness_penalty(name: str) -> StalenessPenalty:
    """The penalty `optim.co2.penalty` names (optim.check has checked the name)."""
    return PENALTIES[name]
