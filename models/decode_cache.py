"""What a token mixer carries from one decoding step to the next (launch/generate.py).

Attention keeps the keys and values of every position seen (a KV cache) and their positions; GLA
and ParaRNN keep their recurrent state. A mixer called with `cache=` reads it, extends it with the
tokens of this call and continues from it, so feeding a sequence in pieces gives the same outputs
as feeding it whole.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DecodeCache:
    """One layer's token-mixer state between decoding calls; empty (all None) before the first."""

    # Attention: keys and values [B, kv heads per rank, T_seen, head_dim], after RoPE.
    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None
    # Attention: the positions of the cached keys [B, T_seen] (the causal mask compares them).
    positions: torch.Tensor | None = None
    # GLA: [B, heads per rank, K, V] fp32; ParaRNN: the last state of the recurrence.
    state: torch.Tensor | None = None

    def append_keys_values(self, keys: torch.Tensor, values: torch.Tensor,
                           positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Add this call's keys, values and positions; return all of them so far."""
        if self.keys is None:
            self.keys, self.values, self.positions = keys, values, positions
        else:
            self.keys = torch.cat([self.keys, keys], dim=2)
            self.values = torch.cat([self.values, values], dim=2)
            self.positions = torch.cat([self.positions, positions], dim=1)
        return self.keys, self.values, self.positions
