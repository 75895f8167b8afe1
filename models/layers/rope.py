"""Rotary position embedding (RoPE), rotate-half (Llama / Hugging Face) convention.

Channel i of a head is paired with channel i + head_dim/2 and the pair is rotated by the angle
position * rope_theta ** (-2i / head_dim). Positions are explicit so that context parallelism can
pass each token's original position.
"""

from __future__ import annotations

import torch
from torch import nn


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, heads, T, head_dim] by cos/sin [B or 1, T, head_dim]; fp32 math, x's dtype out."""
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    x32 = x.float()
    return (x32 * cos + rotate_half(x32) * sin).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Produces the fp32 cos/sin tables for given position ids.

    `inv_freq` is a non-persistent buffer: it is derived from (head_dim, theta), so it is not
    checkpointed, and `reset_buffers()` recomputes it after meta-device construction.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
        self.head_dim = head_dim
        self.theta = theta
        self.register_buffer("inv_freq", self._inverse_frequencies(None), persistent=False)

    def _inverse_frequencies(self, device) -> torch.Tensor:
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device) / self.head_dim
        return 1.0 / (self.theta**exponents)

    def reset_buffers(self) -> None:
        """Recompute `inv_freq` in fp32 on the buffer's current device."""
        self.inv_freq = self._inverse_frequencies(self.inv_freq.device)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [B, T] (or [1, T]) -> (cos, sin), each fp32 [B, T, head_dim]."""
        # Angles in fp32 even when the model runs in bf16: bf16 angles are off by whole radians
        # at positions in the thousands.
        angles = position_ids.float().unsqueeze(-1) * self.inv_freq.float()
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos(), angles.sin()
