"""One decoder layer: pre-norm token mixer and channel mixer around a residual stream."""

from __future__ import annotations

import torch
from torch import nn

from models.config import ModelConfig
from models.layers.norm import RMSNorm
from models.mixers import CHANNEL, TOKEN, mixer_class
from models.parallel_context import ParallelContext, resolve_context
from models.spec import LayerSpec


class DecoderBlock(nn.Module):
    """Standard pre-norm block: h = x + drop(mix_tokens(norm(x))); out = h + drop(mix_channels(norm(h))).

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
        if spec.residual != "standard":
            raise ValueError(f"model.residual {spec.residual!r} is not implemented; available: standard")
        token_mixer_class = mixer_class(spec.token_mixer, TOKEN)
        channel_mixer_class = mixer_class(spec.channel_mixer, CHANNEL)
        self.spec = spec
        self.token_mixer_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.add_module(spec.token_mixer, token_mixer_class(cfg, par))
        self.channel_mixer_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.add_module(spec.channel_mixer, channel_mixer_class(cfg, par))
        par.tp.mark_sequence_parallel(self.token_mixer_norm.weight, self.channel_mixer_norm.weight)
        self.dropout = nn.Dropout(cfg.dropout)

    @property
    def token_mixer(self) -> nn.Module:
        """The module mixing information across positions (attention, GLA or ParaRNN)."""
        return getattr(self, self.spec.token_mixer)

    @property
    def channel_mixer(self) -> nn.Module:
        """The module mixing features at each position (MLP or MoE)."""
        return getattr(self, self.spec.channel_mixer)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        h = x + self.dropout(self.token_mixer(self.token_mixer_norm(x), position_ids))
        return h + self.dropout(self.channel_mixer(self.channel_mixer_norm(h)))

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token of both mixers (norms and residual adds are negligible)."""
        return self.token_mixer.flops_per_token(seq_len) + self.channel_mixer.flops_per_token(seq_len)
