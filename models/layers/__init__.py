"""Building blocks of the decoder: norms, RoPE, token mixers, channel mixers, embedding and head."""

from models.layers.attention import Attention
from models.layers.embedding import LMHead, TokenEmbedding
from models.layers.mlp import SwiGLUMLP
from models.layers.norm import RMSNorm
from models.layers.rope import RotaryEmbedding, apply_rotary, rotate_half

__all__ = [
    "Attention",
    "LMHead",
    "RMSNorm",
    "RotaryEmbedding",
    "SwiGLUMLP",
    "TokenEmbedding",
    "apply_rotary",
    "rotate_half",
]
