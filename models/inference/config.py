"""How launch/generate.py decodes: sampling and the decode attention of MLA layers (docs/tpla.md)."""
from __future__ import annotations

from dataclasses import dataclass, field

LATENT_TRANSFORMS = ("none", "hadamard", "pca")
LATENT_NORMS = ("slice", "full")


@dataclass
class SamplingConfig:
    """How the next token is chosen from the full-vocabulary logits."""

    # 0: greedy (argmax). Otherwise logits are divided by it before the softmax.
    temperature: float = 0.0
    # Nucleus sampling: keep the smallest set of most likely tokens whose probability reaches top_p
    # (1.0 keeps every token). Only used when temperature > 0.
    top_p: float = 1.0
    # Seed of the sampling generator; every TP rank draws the same numbers, so they pick the same token.
    seed: int = 0


@dataclass
class TPLAConfig:
    """Tensor-parallel latent attention for the decode steps of MLA layers (docs/tpla.md)."""

    # Decode with TPLA: g = the number of latent slices (the TP size under TP, or a one-process
    # simulation of g ranks with `degree`). False: exact MLA decode (every TP rank holds the whole latent).
    enabled: bool = False
    # Number of latent slices; None: the TP size. A one-process run may set it to simulate g ranks.
    degree: int | None = None
    # Orthogonal transform of the latent folded into the weights before slicing: none, hadamard, pca.
    transform: str = "none"
    # PCA only: number of calibration tokens whose latents give the principal axes.
    calibration_tokens: int = 2048
    # How a decode token's latent is normalised: "slice", each rank's slice by its own root mean
    # square (the paper's TPLA); "full", by the whole latent's (each rank computes the whole c_kv
    # with the replicated W_DKV: hidden x r more FLOPs per token, no communication).
    latent_norm: str = "slice"


@dataclass
class DecodeConfig:
    """Everything launch/generate.py needs beyond the checkpoint and the prompt."""

    max_new_tokens: int = 64
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    tpla: TPLAConfig = field(default_factory=TPLAConfig)
