"""Rotary position embedding (RoPE), rotate-half (Llama / Hugging Face) convention.

Channel i of a head is paired with channel i + head_dim/2 and the pair is rotated by the angle
position * rope_theta ** (-2i / head_dim). Positions are explicit so that context parallelism can
pass each token's original position.

YaRN (`model.rope_scaling.type=yarn`, docs/mla.md): frequencies that turn many times over the
original context keep their value, slow ones are divided by the extension factor, with a linear
ramp in between; cos and sin carry DeepSeek's magnitude correction m(s, mscale) / m(s, mscale_all_dim).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from models.config import RopeScalingConfig


def yarn_mscale(factor: float, mscale: float) -> float:
    """YaRN's attention magnitude m(s, a) = 0.1 a ln(s) + 1 for an extension s > 1, else 1."""
    return 1.0 if factor <= 1.0 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_softmax_scale_factor(scaling: RopeScalingConfig | None) -> float:
    """What the softmax scale is multiplied by: m(s, mscale_all_dim)^2 under YaRN, else 1."""
    if scaling is None or scaling.type != "yarn":
        return 1.0
    return yarn_mscale(scaling.factor, scaling.mscale_all_dim) ** 2


def _yarn_correction_dim(rotations: float, head_dim: int, theta: float, original_length: int) -> float:
    """The (fractional) channel pair whose wavelength fits `rotations` times into the original length."""
    return head_dim * math.log(original_length / (rotations * 2 * math.pi)) / (2 * math.log(theta))


def yarn_inverse_frequencies(head_dim: int, theta: float, scaling: RopeScalingConfig, device=None) -> torch.Tensor:
    """fp32 [head_dim/2] YaRN frequencies: the plain ones where they turn more than beta_fast times
    over the original length, divided by `factor` below beta_slow turns, linearly mixed between."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim
    plain = 1.0 / (theta**exponents)
    interpolated = 1.0 / (scaling.factor * theta**exponents)
    original = scaling.original_max_position_embeddings
    low = max(math.floor(_yarn_correction_dim(scaling.beta_fast, head_dim, theta, original)), 0)
    high = min(math.ceil(_yarn_correction_dim(scaling.beta_slow, head_dim, theta, original)), head_dim - 1)
    if low == high:
        high += 0.001  # a one-pair ramp would divide by zero
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
    keep = 1.0 - ramp  # 1: the plain frequency (fast pairs), 0: interpolated (slow pairs)
    return interpolated * (1.0 - keep) + plain * keep


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, heads, T, head_dim] by cos/sin [B or 1, T, head_dim]; fp32 math (fp64 for fp64
    input, which tests compare at 1e-10), x's dtype out."""
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    x32 = x.to(torch.promote_types(x.dtype, torch.float32))
    return (x32 * cos + rotate_half(x32) * sin).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Produces the fp32 cos/sin tables for given position ids.

    `inv_freq` is a non-persistent buffer: it is derived from (head_dim, theta, scaling), so it is
    not checkpointed, and `reset_buffers()` recomputes it after meta-device construction.
    `scaling` (type "yarn") switches to YaRN frequencies and scales cos/sin (module docstring).
    """

    def __init__(self, head_dim: int, theta: float = 10000.0, scaling: RopeScalingConfig | None = None):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
        self.head_dim = head_dim
        self.theta = theta
        self.scaling = scaling if scaling is not None and scaling.type == "yarn" else None
        self.cos_sin_scale = 1.0
        if self.scaling is not None:
            if self.scaling.original_max_position_embeddings is None:
                raise ValueError("YaRN needs model.rope_scaling.original_max_position_embeddings")
            self.cos_sin_scale = (yarn_mscale(self.scaling.factor, self.scaling.mscale)
                                  / yarn_mscale(self.scaling.factor, self.scaling.mscale_all_dim))
        self.register_buffer("inv_freq", self._inverse_frequencies(None), persistent=False)

    def _inverse_frequencies(self, device) -> torch.Tensor:
        if self.scaling is not None:
            return yarn_inverse_frequencies(self.head_dim, self.theta, self.scaling, device)
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
        if self.cos_sin_scale != 1.0:
            return angles.cos() * self.cos_sin_scale, angles.sin() * self.cos_sin_scale
        return angles.cos(), angles.sin()
