"""What an MoE layer needs from the run: its process groups, the token layout, byte and loss bookkeeping.

`moe` never imports `models`, so the parameter-initialisation record is declared here with the
same fields as `models.init.ParamInit` (kind, std, seed_name): `models.init.materialize` reads
only those attributes, so MoE modules take part in the seed-based initialisation unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from parallel_state.groups import AxisGroup


@dataclass(frozen=True)
class InitSpec:
    """How the full tensor of one parameter is generated (duck-typed `models.init.ParamInit`)."""

    kind: str  # "normal", "ones" or "zeros"
    std: float = 0.0
    seed_name: str | None = None


@dataclass
class AuxLossScale:
    """The factor the trainer applies to each microbatch's loss sum before backward (1 / global
    loss tokens); aux losses receive exactly this gradient. One object shared by every MoE layer."""

    value: float = 1.0


@dataclass(frozen=True)
class MoEContext:
    """One rank's MoE environment; `MoEContext()` is the single-process one.

    Token layout on entry (the attention layout): each rank holds [B, T_local, hidden] with
    T_local = T / cp, further / tp under sequence parallelism. Without SP the TP ranks hold the
    same tokens; the layer then routes a 1/tp slice on each (so no expert work is duplicated) and
    gathers the outputs again.
    """

    # Groups of one rank (AxisGroup.single) where an axis has no parallelism.
    tp: AxisGroup = field(default_factory=lambda: AxisGroup.single("tp"))  # attention-side TP (ParallelState.tp)
    sequence_parallel: bool = False  # tokens arrive split over tp
    # Ranks that hold parts of the same sequences (ParallelState.tp_cp).
    seq_group: AxisGroup = field(default_factory=lambda: AxisGroup.single("tp_cp"))
    ep: AxisGroup = field(default_factory=lambda: AxisGroup.single("ep"))
    etp: AxisGroup = field(default_factory=lambda: AxisGroup.single("etp"))
    etp_ep: AxisGroup = field(default_factory=lambda: AxisGroup.single("etp_ep"))
    aux_loss_scale: AuxLossScale | None = None  # None: aux losses get gradient 1 (a one-process loss sum)

    @staticmethod
    def from_parallel_state(ps: Any, sequence_parallel: bool,
                            aux_loss_scale: AuxLossScale | None = None) -> MoEContext:
        """The context of one rank of a ParallelState (parallel_state.groups.ParallelState)."""
        return MoEContext(tp=ps.tp, sequence_parallel=sequence_parallel, seq_group=ps.tp_cp, ep=ps.ep,
                          etp=ps.etp, etp_ep=ps.etp_ep, aux_loss_scale=aux_loss_scale)

    @property
    def tp_size(self) -> int:
        return self.tp.size

    @property
    def tp_rank(self) -> int:
        return self.tp.rank

    @property
    def ep_size(self) -> int:
        return self.ep.size

    @property
    def ep_rank(self) -> int:
        return self.ep.rank

    @property
    def etp_size(self) -> int:
        return self.etp.size

    @property
    def etp_rank(self) -> int:
        return self.etp.rank

    @property
    def sp(self) -> bool:
        """Whether tokens arrive split over TP (requested and tp > 1)."""
        return self.sequence_parallel and self.tp_size > 1
