"""Per-layer description of the decoder stack.

A layer is a token mixer (mixes across positions), a channel mixer (mixes across features) and a
residual pattern ("standard", or "ladder" for the last model.ladder_layers layers, docs/ladder.md).
`layer_specs` is pure, so a stack can be reasoned about (in the model, the tests) without building it.
"""

from __future__ import annotations

from dataclasses import dataclass

from models.config import ModelConfig

# The implemented residual patterns (the mixer names are the registry's, models/mixers.py);
# the config validation rejects anything else before building.
RESIDUALS = ("standard", "ladder")


@dataclass(frozen=True)
class LayerSpec:
    """What one decoder layer is made of."""

    token_mixer: str
    channel_mixer: str
    residual: str


def layer_specs(cfg: ModelConfig) -> list[LayerSpec]:
    """Spec of every global layer: layer i cycles through token_mixers and channel_mixers; a "moe"
    slot that model.moe's placement (first_k_dense_layers, moe_layer_freq) skips is a dense "mlp".

    Names are not checked against what is implemented (models.check does that), so the
    pattern of any list of names can be computed.
    """
    for field_name in ("token_mixers", "channel_mixers"):
        if len(getattr(cfg, field_name)) == 0:
            raise ValueError(f"model.{field_name} is empty: name at least one mixer to cycle over layers")
    return [
        LayerSpec(
            token_mixer=cfg.token_mixers[i % len(cfg.token_mixers)],
            channel_mixer=_placed(cfg, i, cfg.channel_mixers[i % len(cfg.channel_mixers)]),
            residual=_residual(cfg, i),
        )
        for i in range(cfg.num_layers)
    ]


def _residual(cfg: ModelConfig, layer: int) -> str:
    # Any other name passes through unchanged, so the block can reject it by name.
    if cfg.residual != "ladder":
        return cfg.residual
    return "ladder" if layer >= first_ladder_layer(cfg) else "standard"


def first_ladder_layer(cfg: ModelConfig) -> int:
    """Global index of the first ladder layer (num_layers when there is none): with
    residual=ladder the last `ladder_layers` layers (all when None) use it."""
    if cfg.residual != "ladder":
        return cfg.num_layers
    count = cfg.num_layers if cfg.ladder_layers is None else cfg.ladder_layers
    return cfg.num_layers - count


def ladder_run_starts(cfg: ModelConfig) -> list[int]:
    """Layers where a ladder run starts afresh (s_{-1} := s_0): the first ladder layer and every
    `ladder_restarts` entry after it (docs/ladder.md)."""
    first = first_ladder_layer(cfg)
    if first >= cfg.num_layers:
        return []
    return sorted({first, *(i for i in cfg.ladder_restarts if first < i < cfg.num_layers)})


def _placed(cfg: ModelConfig, layer: int, channel_mixer: str) -> str:
    return "mlp" if channel_mixer == "moe" and not cfg.moe.is_moe_layer(layer) else channel_mixer
