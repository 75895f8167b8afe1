"""SwiGLU feed-forward channel mixer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.config import ModelConfig
from models.init import ParamInit, normal_init


class SwiGLUMLP(nn.Module):
    """w2(silu(w1 x) * w3 x) (Shazeer 2020), bias-free, Llama naming: w1 gate, w3 up, w2 down."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.hidden_size = cfg.hidden_size
        self.ffn_hidden_size = cfg.resolved_ffn_hidden_size()
        self.init_std = cfg.init_std
        self.output_init_std = cfg.output_init_std()
        self.w1 = nn.Linear(self.hidden_size, self.ffn_hidden_size, bias=False)
        self.w3 = nn.Linear(self.hidden_size, self.ffn_hidden_size, bias=False)
        self.w2 = nn.Linear(self.ffn_hidden_size, self.hidden_size, bias=False)

    def init_specs(self) -> dict[str, ParamInit]:
        return {
            "w1.weight": normal_init(self.init_std),
            "w3.weight": normal_init(self.init_std),
            "w2.weight": normal_init(self.output_init_std),
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 3 x forward, forward = 2 x the three matrices' parameters."""
        del seq_len  # position-wise: independent of sequence length
        return 3.0 * 2.0 * 3 * self.hidden_size * self.ffn_hidden_size
