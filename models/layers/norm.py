"""Root-mean-square layer norm."""

from __future__ import annotations

import torch
from torch import nn

from models.init import ParamInit, ones_init


class RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich 2019) with a learned gain, computed in fp32.

    Statistics in bf16 lose too much precision over wide hidden sizes, so the input is upcast and
    the result cast back to the input's dtype.
    """

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def init_specs(self) -> dict[str, ParamInit]:
        return {"weight": ones_init()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(x.dtype)
