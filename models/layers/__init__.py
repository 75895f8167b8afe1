"""Building blocks of the decoder: norms, RoPE, token mixers, channel mixers, embedding and head."""

from models.layers.attention import Attention
from models.layers.mlp import SwiGLUMLP
from models.layers.norm import RMSNorm
from models.layers.rope import RotaryEmbedding, apply_rotary, rotate_half
from models.layers.tensor_parallel import ColumnParallelLinear, RowParallelLinear, TPContext
from models.layers.vocab_parallel import (
    VocabParallelEmbedding,
    VocabParallelLMHead,
    vocab_parallel_cross_entropy,
)

__all__ = [
    "Attention",
    "ColumnParallelLinear",
    "RMSNorm",
    "RotaryEmbedding",
    "RowParallelLinear",
    "SwiGLUMLP",
    "TPContext",
    "VocabParallelEmbedding",
    "VocabParallelLMHead",
    "apply_rotary",
    "rotate_half",
    "vocab_parallel_cross_entropy",
]
