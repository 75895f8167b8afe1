"""Token embedding and LM head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.init import ParamInit, normal_init

# Global name of the embedding matrix; a tied head on a stage without the embedding seeds from it.
EMBEDDING_WEIGHT_NAME = "embedding.weight"


class TokenEmbedding(nn.Module):
    """Lookup table from token id to a hidden vector: weight [vocab, hidden]."""

    def __init__(self, vocab_size: int, hidden_size: int, init_std: float):
        super().__init__()
        self.init_std = init_std
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size))

    def init_specs(self) -> dict[str, ParamInit]:
        return {"weight": normal_init(self.init_std)}

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)


class LMHead(nn.Module):
    """Projection from hidden vectors to vocabulary logits: weight [vocab, hidden].

    `seed_name` makes the head's initial values equal another parameter's (the embedding's when
    embeddings are tied but this stage does not hold the embedding).
    """

    def __init__(self, vocab_size: int, hidden_size: int, init_std: float, seed_name: str | None = None):
        super().__init__()
        self.init_std = init_std
        self.seed_name = seed_name
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size))

    def init_specs(self) -> dict[str, ParamInit]:
        return {"weight": normal_init(self.init_std, seed_name=self.seed_name)}

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.weight)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 3 x (2 x vocab x hidden)."""
        del seq_len
        vocab_size, hidden_size = self.weight.shape
        return 3.0 * 2.0 * vocab_size * hidden_size
