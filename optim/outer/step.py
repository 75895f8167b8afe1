"""An outer optimizer around the inner optimizer step of one worker (optim.outer; docs/co2.md).

`OuterOptimizerStep` is an OptimizerStep: the trainer drives it like any other. Everything but
`apply` goes to the inner step, which was built over the worker's ranks alone (its data-parallel
reductions, distributed optimizer and global grad norm stay inside the worker). After the inner
update of the last step of a round it runs the outer round of optim/outer/co2.py on the tensors
the inner optimizer updates: the fp32 masters, or with fp32 weights the weights themselves, and with
the distributed optimizer only this rank's slices of them, so the outer state (anchor, momentum,
the average in flight) is sharded over the worker's data-parallel ranks like the inner state.
The parameters then restart from the new anchor on every worker.
"""
from __future__ import annotations

from contextlib import AbstractContextManager

import torch

from optim.outer.average import InFlightAverage, OuterAverager, SlowLink, own_outer_group
from optim.outer.co2 import OuterRule, outer_step
from optim.outer.penalty import staleness_penalty
from optim.step import OptimizerStep, ParamState, StepInputs, counted_in_norm, counted_within_replica
from parallel_state.collectives import all_reduce_sum


def weights_of(state: ParamState) -> torch.Tensor:
    """The flat fp32 tensor the inner optimizer updates for `state`'s elements (a view)."""
    master = state.tensors.get("master")
    return master if master is not None else state.param.detach().view(-1)[state.start:state.end]


class OuterOptimizerStep:
    """The inner step of this rank's worker plus the outer rounds over workers (module docstring)."""

    def __init__(self, inner: OptimizerStep, inputs: StepInputs, link: SlowLink | None = None):
        self.inner, self.inputs = inner, inputs
        self.optimizer = inner.optimizer
        ps = inputs.ps
        self.rule = OuterRule.from_config(inputs.cfg.outer, inputs.cfg.co2)
        self.penalty = staleness_penalty(self.rule.penalty)
        self.states = inner.param_states()
        self.views = [weights_of(s) for s in self.states]
        # Elements counted in the norms (each once per worker): the distributed optimizer's slices
        # partition a replica; whole parameters count on the first data-parallel replica.
        inner_ps = ps.within_worker()
        counted = counted_within_replica if inputs.cfg.distributed else counted_in_norm
        self.counted = [counted(s.param, inner_ps) for s in self.states]
        self.worker_group = ps.worker
        self.averager = OuterAverager(own_outer_group(ps), link)
        self.anchor = self._current()  # x_0: every worker starts from the same weights
        self.momentum = torch.zeros_like(self.anchor)
        self.pending: InFlightAverage | None = None  # co2: the average launched at the end of the last round
        # co2: where a checkpoint's waited average is read into before its round restarts.
        self.loaded_pending = torch.zeros_like(self.anchor) if self.rule.stale else None
        self.round = 0  # outer rounds completed
        self.metrics = {"outer/round": 0.0, "outer/staleness": float(self.rule.staleness), "outer/wait_s": 0.0}

    # ---- the inner step's interface --------------------------------------------------------------

    def no_sync(self) -> AbstractContextManager[None]:
        return self.inner.no_sync()

    def reduce_and_clip(self, unscale: float = 1.0) -> float:
        return self.inner.reduce_and_clip(unscale)

    def zero_grad(self) -> None:
        self.inner.zero_grad()

    def finish_param_sync(self) -> None:
        """The inner step's updates in flight, and the outer average (it stays pending until the end of
        its round: before a checkpoint, and before the process groups go at the end of training)."""
        self.inner.finish_param_sync()
        self.settle()

    def param_states(self) -> list[ParamState]:
        return self.inner.param_states()

    def finish_state_import(self, masters_loaded: bool) -> None:
        self.inner.finish_state_import(masters_loaded)

    def apply(self, step: int, update: bool) -> float:
        """The inner update of step `step`; after the last step of a round, the outer round."""
        lr = self.inner.apply(step, update)
        self.metrics["outer/wait_s"] = 0.0
        if self.rule.ends_round(step):
            self._end_round()
        return lr

    # ---- the outer round ---------------------------------------------------------------------------

    def _current(self) -> torch.Tensor:
        return torch.cat([v.float() for v in self.views]) if self.views else torch.zeros(0)

    @torch.no_grad()
    def _end_round(self) -> None:
        self.inner.finish_param_sync()  # the distributed optimizer's gathers: nothing writes the weights
        pseudo_gradient = self.anchor - self._current()  # this worker's d_i = x_t - x_i
        if self.rule.stale:
            delta, waited = self.pending.wait() if self.pending is not None else (None, 0.0)
            self.pending = self.averager.launch(pseudo_gradient)  # in flight during the next round
        else:
            delta, waited = self.averager.average(pseudo_gradient)
        if delta is not None:
            delta_norm, momentum_norm = self._norms(delta, self.momentum)
            # co2: the anchor moved by alpha * m_{t-1} since the applied average was launched.
            penalty = self.penalty(delta_norm, self.rule.alpha * momentum_norm) if self.rule.stale else 1.0
            outer_step(self.rule, self.anchor, self.momentum, delta, penalty)
            self.metrics.update({"outer/delta_norm": delta_norm, "outer/penalty": penalty})
        self._restart_from_anchor()
        self.round += 1
        self.metrics.update({"outer/round": float(self.round), "outer/wait_s": waited})

    def _restart_from_anchor(self) -> None:
        offset = 0
        for view in self.views:
            view.copy_(self.anchor[offset:offset + view.numel()])
            offset += view.numel()
        self.inner.finish_state_import(masters_loaded=True)  # weights (and their gathers) from the masters

    def _norms(self, *flats: torch.Tensor) -> list[float]:
        """The L2 norms of flat outer tensors over the worker, every element counted once."""
        squares = torch.zeros(len(flats), dtype=torch.float64)
        offset = 0
        for view, counted in zip(self.views, self.counted):
            if counted:
                for i, flat in enumerate(flats):
                    squares[i] += flat[offset:offset + view.numel()].double().square().sum()
            offset += view.numel()
        return all_reduce_sum(squares, self.worker_group).sqrt().tolist()

    # ---- checkpoints and metrics ------------------------------------------------------------------

    def settle(self) -> None:
        """Wait for the average in flight (a checkpoint stores it; it is applied at its round's end)."""
        if self.pending is not None:
            self.pending.wait()

    def outer_tensors(self) -> dict[str, torch.Tensor]:
        """The outer state as flat fp32 tensors aligned with `param_states()` (a checkpoint reads and
        writes them in place): the anchor, the momentum and, for co2 after round 0, the waited average."""
        tensors = {"anchor": self.anchor, "momentum": self.momentum}
        if self.rule.stale:
            self.settle()
            tensors["pending"] = self.pending.buffer if self.pending is not None else self.loaded_pending
        return tensors

    def restore(self, step: int) -> None:
        """After a checkpoint of optimizer step `step` was read into `outer_tensors()`: the round count
        and, for co2 after round 0, the stored average as the one in flight."""
        self.round = step // self.rule.tau
        self.metrics["outer/round"] = float(self.round)
        if self.rule.stale and self.pending is None and self.round >= 1:
            self.pending = _CompletedAverage(self.loaded_pending)

    def step_metrics(self) -> dict[str, float]:
        """outer/round (rounds completed), outer/staleness (rounds the applied average lags),
        outer/delta_norm (|Delta| of the last applied average), outer/penalty (its Lambda) and
        outer/wait_s (seconds this step waited for an outer average)."""
        return dict(self.metrics)


class _CompletedAverage(InFlightAverage):
    """An average already complete (read from a checkpoint)."""

    def __init__(self, buffer: torch.Tensor):  # nothing is launched: InFlightAverage.__init__ is skipped
        self.buffer, self.size, self.done = buffer, 1, True
