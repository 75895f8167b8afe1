"""Inner SGD (`optim.name=sgd`): torch's SGD with heavy-ball or Nesterov momentum over the same
decay / no-decay groups and fp32 masters as AdamW (weight decay is then L2, added to the gradient).

It is the inner optimizer of the outer-optimizer invariants (docs/co2.md: with SGD, tau = 1 and
plain averaging, local SGD equals data-parallel SGD) and a user option. The momentum buffers are
created as zeros up front (the same first step as torch's lazy clone), so checkpoints hold them as
`optim/<name>/momentum_buffer` before the first step too.
"""
from __future__ import annotations

import torch

from optim.config import OptimConfig
from optim.param_groups import build_param_groups
from optim.step import BucketedOptimizerStep, ParamState


def sgd_over(groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    """torch's SGD over ready-made parameter groups (each with its own weight_decay)."""
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                           weight_decay=cfg.weight_decay, foreach=cfg.foreach)


class SGDStep(BucketedOptimizerStep):
    """The bucketed all-reduce step with SGD in place of AdamW."""

    def _build_optimizer(self) -> torch.optim.Optimizer:
        named = [(name, self.master_of[id(p)]) for name, p in self.inputs.named_params if id(p) in self.master_of]
        return sgd_over(build_param_groups(named, self.inputs.cfg), self.inputs.cfg)

    def param_states(self) -> list[ParamState]:
        """SGD's momentum buffer (and the fp32 master where it is kept apart) of every parameter."""
        states = []
        for p in self._trainable():
            master = self.master_of[id(p)]
            state = self.optimizer.state[master]
            tensors = {}
            if self.inputs.cfg.momentum > 0:
                if state.get("momentum_buffer") is None:
                    state["momentum_buffer"] = torch.zeros_like(master, memory_format=torch.preserve_format)
                tensors["momentum_buffer"] = state["momentum_buffer"].view(-1)
            if master is not p:
                tensors["master"] = master.detach().view(-1)
            # SGD counts no steps; the checkpoint's per-parameter step entry holds a zero.
            states.append(ParamState(p, 0, p.numel(), tensors, state.setdefault("step", torch.zeros(()))))
        return states
