"""The outer update of CO2 and of the synchronous baselines it generalises (docs/co2.md).

Every outer optimizer here averages the workers' pseudo-gradients d_i = x_t - x_i (anchor minus the
worker's parameters after its tau inner steps), so Delta = mean_i d_i = x_t - xbar_t, and moves the
anchor with an outer momentum:

    m_t     = beta * m_{t-1} + Lambda_t * Delta        (Lambda_t: the staleness penalty, co2 only)
    m_t     = clip(m_t, -phi, phi)                      (element-wise, phi = optim.co2.clip > 0)
    x_{t+1} = x_t - alpha * m_t                         (localsgd, co2)
    x_{t+1} = x_t - alpha * (Delta + beta * m_t)        (diloco: Nesterov momentum, as torch's SGD)

localsgd and diloco use the average of round t at the end of round t (synchronous). co2 launches the
average of round t without waiting and applies, at the end of round t, the one launched at the end
of round t - 1 (Delta_{t-1}); after round 0 there is none yet and the anchor stays. These functions
work on flat fp32 tensors and hold no process state: optim.outer.step runs them on each rank's part
of the parameters, and the simulator's plain loop is the reference they are tested against.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from optim.config import CO2Config


@dataclass(frozen=True)
class OuterRule:
    """Which outer optimizer and its coefficients (from `optim.outer` and `optim.co2.*`)."""

    name: str  # localsgd | diloco | co2
    tau: int
    alpha: float
    beta: float
    clip: float  # 0: no clipping
    penalty: str

    @staticmethod
    def from_config(outer: str, cfg: CO2Config) -> OuterRule:
        return OuterRule(outer, cfg.tau, cfg.alpha, cfg.beta, cfg.clip, cfg.penalty)

    @property
    def stale(self) -> bool:
        """Whether the average of a round is applied one round later (co2) instead of at once."""
        return self.name == "co2"

    @property
    def staleness(self) -> int:
        """How many rounds old the applied average is."""
        return 1 if self.stale else 0

    def ends_round(self, step: int) -> bool:
        """Whether inner step `step` (0-based) is the last of an outer round."""
        return (step + 1) % self.tau == 0


@torch.no_grad()
def outer_step(rule: OuterRule, anchor: torch.Tensor, momentum: torch.Tensor, delta: torch.Tensor,
               penalty: float = 1.0) -> None:
    """Apply one outer update in place: momentum and anchor from the averaged pseudo-gradient `delta`."""
    momentum.mul_(rule.beta).add_(delta, alpha=penalty)
    if rule.clip > 0:
        momentum.clamp_(-rule.clip, rule.clip)
    if rule.name == "diloco":
        anchor.sub_(delta + rule.beta * momentum, alpha=rule.alpha)
    else:
        anchor.sub_(momentum, alpha=rule.alpha)
