"""What a checkpoint of an outer optimizer adds (docs/co2.md, "Checkpoints"), as plain data the
trainer's checkpointer turns into entries.

Workers hold different weights and inner optimizer states between averages: worker 0's go under the
usual `model/...` and `optim/...` keys (so exports and weight-only loads read a real model), worker
w's under `worker<w>/model/...` and `worker<w>/optim/...`. The outer state is the same on every
worker and is stored once per parameter as `optim/<name>/outer_anchor`, `outer_momentum` and, for
co2, `outer_pending`: the average launched at the end of the last round, waited for at save time.
A resume in the same layout continues bit for bit, mid-round included.
"""
from __future__ import annotations

from dataclasses import dataclass

from optim.outer.step import OuterOptimizerStep
from optim.step import ParamState
from parallel_state.errors import ConfigError


@dataclass
class OuterCheckpoint:
    """This rank's part of an outer optimizer's checkpoint."""

    worker: int  # the worker this rank belongs to
    states: list[ParamState]  # the outer tensors per piece, as `outer_<what>` (their `step` unused)

    def key(self, key: str) -> str:
        """The key of this worker's copy of a per-worker tensor (`key` for worker 0)."""
        return key if self.worker == 0 else f"worker{self.worker}/{key}"


def outer_checkpoint(optim_step) -> OuterCheckpoint | None:
    """The outer state of `optim_step` as views a checkpoint reads and writes in place (an average in
    flight is waited for first), or None if it is not an outer optimizer."""
    if not isinstance(optim_step, OuterOptimizerStep):
        return None
    flats = optim_step.outer_tensors()
    states, offset = [], 0
    for state, view in zip(optim_step.states, optim_step.views):
        n = view.numel()
        states.append(ParamState(state.param, state.start, state.end,
                                 {f"outer_{what}": flat[offset:offset + n] for what, flat in flats.items()},
                                 state.step))
        offset += n
    return OuterCheckpoint(optim_step.inputs.ps.coords.worker, states)


def restore_outer(optim_step, step: int) -> None:
    """After a checkpoint of optimizer step `step` was loaded: the outer round and pending average."""
    if isinstance(optim_step, OuterOptimizerStep):
        optim_step.restore(step)


def check_outer_keys(field: str, path: str, keys: list[str], stored: set[str] | dict) -> None:
    """One clear error if a resume needs per-worker or outer keys the checkpoint lacks."""
    missing = [k for k in keys if k not in stored]
    if missing:
        raise ConfigError(field, path, f"has no {missing[0]!r}: it was saved without this outer optimizer "
                          "(optim.outer) or with fewer workers (optim.co2.workers)",
                          "resume with the optim.outer and optim.co2.workers it was saved with, or start "
                          "from its weights with trainer.load")
