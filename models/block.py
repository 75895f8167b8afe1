"""One decoder layer: pre-norm token mixer and channel mixer around a residual stream."""

from __future__ import annotations

import torch
from torch import nn

from models.config import ModelConfig
from models.decode_cache import DecodeCache
from models.ladder import LadderModule, run_ladder
from models.layers.norm import RMSNorm
from models.layers.tensor_parallel import RowParallelLinear
from models.mixers import CHANNEL, TOKEN, mixer_class
from models.parallel_context import ParallelContext, resolve_context
from models.spec import RESIDUALS, LayerSpec


class DecoderBlock(nn.Module):
    """Standard pre-norm block: h = x + drop(mix_tokens(norm(x))); out = h + drop(mix_channels(norm(h))).

    A ladder block (spec.residual == "ladder") holds the same modules but is run by the model as
    part of a ladder run (models/ladder.py, docs/ladder.md) through `ladder_modules()`; its mixers'
    output projections return their reduction in flight (PendingTensor).

    The mixers are registered under their kind's name, so parameter names read
    ``layers.3.attention.wq.weight`` / ``layers.3.mlp.w1.weight`` like Llama's.

    Parallel layouts: every mixer is built as ``cls(cfg, par)`` (the class registered under its
    name in models/mixers.py) and shards itself. Under sequence
    parallelism the block's input, norms, dropout and residual adds work on this rank's chunk of
    the sequence; the norm gains then see only those tokens and are marked for a TP gradient sum.
    """

    def __init__(self, cfg: ModelConfig, spec: LayerSpec, par: ParallelContext | None = None):
        super().__init__()
        par = resolve_context(par)
        if spec.residual not in RESIDUALS:
            raise ValueError(f"model.residual {spec.residual!r} is not implemented; available: {', '.join(RESIDUALS)}")
        if spec.residual == "ladder" and cfg.dropout > 0:
            raise ValueError(f"model.dropout={cfg.dropout} with model.residual=ladder is not implemented; set 0")
        token_mixer_class = mixer_class(spec.token_mixer, TOKEN)
        channel_mixer_class = mixer_class(spec.channel_mixer, CHANNEL)
        self.spec = spec
        self.token_mixer_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.add_module(spec.token_mixer, token_mixer_class(cfg, par))
        self.channel_mixer_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.add_module(spec.channel_mixer, channel_mixer_class(cfg, par))
        par.tp.mark_sequence_parallel(self.token_mixer_norm.weight, self.channel_mixer_norm.weight)
        self.dropout = nn.Dropout(cfg.dropout)
        self.tp = par.tp
        self.is_ladder = spec.residual == "ladder"
        # Per mixer: whether the ladder run enters its TP region (see ladder_modules).
        self._ladder_tp_region = ((_defer_output_reduction(self.token_mixer),
                                   _defer_output_reduction(self.channel_mixer)) if self.is_ladder else (False, False))

    @property
    def token_mixer(self) -> nn.Module:
        """The module mixing information across positions (attention, GLA or ParaRNN)."""
        return getattr(self, self.spec.token_mixer)

    @property
    def channel_mixer(self) -> nn.Module:
        """The module mixing features at each position (MLP or MoE)."""
        return getattr(self, self.spec.channel_mixer)

    def ladder_modules(self) -> list[LadderModule]:
        """This ladder block's two sub-modules (token mixer, channel mixer) for models.ladder.run_ladder."""
        if not self.is_ladder:
            raise ValueError("ladder_modules() of a standard block; its spec.residual is 'standard'")
        token_region, channel_region = self._ladder_tp_region
        return [LadderModule(self.token_mixer_norm, self.token_mixer, True, token_region, self.tp),
                LadderModule(self.channel_mixer_norm, self.channel_mixer, False, channel_region, self.tp)]

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        if self.is_ladder:  # a one-layer ladder run: the model runs consecutive ladder blocks as one
            return run_ladder(self.ladder_modules(), x, position_ids)
        h = x + self.dropout(self.token_mixer(self.token_mixer_norm(x), position_ids))
        return h + self.dropout(self.channel_mixer(self.channel_mixer_norm(h)))

    def forward_cached(self, x: torch.Tensor, position_ids: torch.Tensor | None, cache: DecodeCache) -> torch.Tensor:
        """forward for decoding: the token mixer reads and extends its `cache` (launch/generate.py)."""
        if self.is_ladder:
            return run_ladder(self.ladder_modules(), x, position_ids, [cache, None])
        h = x + self.token_mixer(self.token_mixer_norm(x), position_ids, cache=cache)
        return h + self.channel_mixer(self.channel_mixer_norm(h))

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token of both mixers (norms and residual adds are negligible)."""
        return self.token_mixer.flops_per_token(seq_len) + self.channel_mixer.flops_per_token(seq_len)


def _defer_output_reduction(mixer: nn.Module) -> bool:
    """Make a Column -> Row TP mixer return its output reduction in flight; whether it is one.

    The output projection is the mixer's one direct RowParallelLinear child (attention wo, MLP w2,
    GLA o_proj, ParaRNN w_out), whose output is the mixer's output. A mixer without one (MoE: its
    row-parallel layers sit inside the experts, behind the token exchange) completes its own output.
    """
    rows = [child for child in mixer.children() if isinstance(child, RowParallelLinear)]
    if len(rows) > 1:
        raise ValueError(f"{type(mixer).__name__} has {len(rows)} RowParallelLinear children; the ladder "
                         "residual defers the reduction of the one output projection (docs/ladder.md)")
    for row in rows:
        row.defer_output_reduction()
    return bool(rows)
