"""Attention masks from explicit token positions (shared by attention.py and context_parallel.py)."""

from __future__ import annotations

import torch


def causal_mask_from_positions(query_pos: torch.Tensor, key_pos: torch.Tensor) -> torch.Tensor:
    """Boolean [B, 1, Tq, Tk] mask, True where key position <= query position.

    Equals the ordinary causal mask for positions 0..T-1 and stays correct when tokens are
    reordered (e.g. zigzag context-parallel chunks carrying their original positions).
    """
    return (key_pos.unsqueeze(-2) <= query_pos.unsqueeze(-1)).unsqueeze(1)
