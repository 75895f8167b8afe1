"""SwiGLU feed-forward channel mixer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.config import ModelConfig
from models.init import normal_init
from models.parallel_context import ParallelContext, resolve_context


class SwiGLUMLP(nn.Module):
    """w2(silu(w1 x) * w3 x) (Shazeer 2020), bias-free, Llama naming: w1 gate, w3 up, w2 down.

    Tensor parallel: w1 and w3 column-parallel, w2 row-parallel (the inner width is split over TP).
    """

    def __init__(self, cfg: ModelConfig, par: ParallelContext | None = None):
        super().__init__()
        tp = resolve_context(par).tp
        self.hidden_size = cfg.hidden_size
        self.ffn_hidden_size = cfg.resolved_ffn_hidden_size()
        std, out_std = normal_init(cfg.init_std), normal_init(cfg.output_init_std())
        self.w1 = tp.column(self.hidden_size, self.ffn_hidden_size, std)
        self.w3 = tp.column(self.hidden_size, self.ffn_hidden_size, std)
        self.w2 = tp.row(self.ffn_hidden_size, self.hidden_size, out_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.w1.prepare_input(x)  # one input collective for gate and up
        return self.w2(F.silu(self.w1(x, input_prepared=True)) * self.w3(x, input_prepared=True))

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 3 x forward, forward = 2 x the three matrices' parameters."""
        del seq_len  # position-wise: independent of sequence length
        return 3.0 * 2.0 * 3 * self.hidden_size * self.ffn_hidden_size
