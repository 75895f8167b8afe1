"""What a model layer needs to know about the parallel layout, handed to every mixer at construction.

`ParallelContext` bundles one context per axis a layer may shard or communicate over: tensor
parallelism (`TPContext`: heads, channels, vocabulary), context parallelism (`CPContext`: the
sequence split across ranks, attention's ring or all-to-all) and, for MoE layers, the expert layout
(`moe`, a moe.MoEContext). The default (no argument) is one process: no sharding, no communication.
Layers are built as ``cls(cfg, par)`` by models.block; the trainer builds one context from its
ParallelState.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from models.layers.tensor_parallel import TPContext
from parallel_state.config import CP_COMMS  # noqa: F401 - re-exported for the layers
from parallel_state.groups import AxisGroup


@dataclass(frozen=True)
class CPContext:
    """Context parallelism: this rank holds 2 of the 2*cp zigzag chunks of every sequence."""

    # ParallelState.cp; a group of one rank: no context parallelism.
    group: AxisGroup = field(default_factory=lambda: AxisGroup.single("cp"))
    comm: str = "ring"  # "ring" (K/V blocks around the ring) or "a2a" (Ulysses all-to-all over heads)

    @property
    def size(self) -> int:
        return self.group.size

    @property
    def rank(self) -> int:
        return self.group.rank


@dataclass(frozen=True)
class ParallelContext:
    """The per-axis contexts of one model (see the module docstring)."""

    tp: TPContext = field(default_factory=TPContext)
    cp: CPContext = field(default_factory=CPContext)
    moe: Any = None  # moe.MoEContext for MoE channel mixers; None: one process


def resolve_context(par: ParallelContext | None) -> ParallelContext:
    """`par`, or the one-process context for None."""
    return par if par is not None else ParallelContext()
