"""Parallel layout configuration (the `parallel.*` keys)."""
from __future__ import annotations

from dataclasses import dataclass

# Context-parallel attention: the K/V ring, or Ulysses all-to-all (sequence <-> heads).
CP_COMMS = ("ring", "a2a")


@dataclass
class ParallelConfig:
    """Sizes of the five parallel axes and how ranks are laid out over them.

    The world size must equal tp * cp * dp * pp; dp is inferred from the world size when left
    null. The expert grid (etp, ep, edp, pp) folds over the same ranks (MoE parallel folding).
    """

    tp: int = 1  # tensor-parallel size (attention heads / MLP columns split over tp ranks)
    cp: int = 1  # context-parallel size (sequence split over cp ranks, zigzag)
    pp: int = 1  # pipeline-parallel size (layers split over pp stages)
    vpp: int = 1  # virtual pipeline chunks per stage (interleaved 1F1B when > 1)
    # Layers of each virtual stage (pp * vpp counts in virtual-stage order); null splits evenly.
    pipeline_layers: list[int] | None = None
    ep: int = 1  # expert-parallel size (experts split over ep ranks)
    etp: int | None = None  # expert tensor-parallel size; null means etp = tp
    dp: int | None = None  # data-parallel size; null infers world / (tp * cp * pp)
    sequence_parallel: bool = False  # shard norms/dropout activations along the sequence over tp
    order: str = "tp-cp-ep-dp-pp"  # rank layout, fastest-varying axis first (Megatron's default)
    cp_comm: str = "ring"  # context-parallel attention: ring | a2a
    dp_bucket_mb: float = 25.0  # gradient bucket size of the DP x CP all-reduce (overlapped with backward)
    timeout_s: float = 600.0  # collective timeout of every process group (a hung rank fails after this)
