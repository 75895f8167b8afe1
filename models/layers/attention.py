"""Causal self-attention with grouped-query (GQA) or multi-head (MHA) key/value heads."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.config import ModelConfig
from models.init import ParamInit, normal_init
from models.layers.rope import RotaryEmbedding, apply_rotary


def repeat_kv_heads(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, kv_heads, T, D] -> [B, kv_heads * groups, T, D]; query head h reads kv head h // groups."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def causal_mask_from_positions(query_pos: torch.Tensor, key_pos: torch.Tensor) -> torch.Tensor:
    """Boolean [B, 1, Tq, Tk] mask, True where key position <= query position.

    Equals the ordinary causal mask for positions 0..T-1 and stays correct when tokens are
    reordered (e.g. zigzag context-parallel chunks carrying their original positions).
    """
    return (key_pos.unsqueeze(-2) <= query_pos.unsqueeze(-1)).unsqueeze(1)


class Attention(nn.Module):
    """Llama attention: bias-free wq, wk, wv, wo; RoPE on q and k; causal softmax attention."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.hidden_size = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.kv_heads
        self.head_dim = cfg.head_dim
        self.attention_dropout = cfg.attention_dropout
        self.init_std = cfg.init_std
        self.output_init_std = cfg.output_init_std()
        self.wq = nn.Linear(self.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(self.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(self.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.num_heads * self.head_dim, self.hidden_size, bias=False)
        self.rope = RotaryEmbedding(self.head_dim, cfg.rope_theta)

    def init_specs(self) -> dict[str, ParamInit]:
        return {
            "wq.weight": normal_init(self.init_std),
            "wk.weight": normal_init(self.init_std),
            "wv.weight": normal_init(self.init_std),
            "wo.weight": normal_init(self.output_init_std),
        }

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, hidden]; position_ids [B, T] or None for 0..T-1 -> [B, T, hidden]."""
        batch, seq_len, _ = x.shape
        q = self.wq(x).view(batch, seq_len, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(batch, seq_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(batch, seq_len, self.num_kv_heads, self.head_dim).transpose(1, 2)

        rope_positions = position_ids
        if rope_positions is None:
            rope_positions = torch.arange(seq_len, device=x.device).unsqueeze(0)
        cos, sin = self.rope(rope_positions)
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)

        groups = self.num_heads // self.num_kv_heads
        k = repeat_kv_heads(k, groups)
        v = repeat_kv_heads(v, groups)
        dropout_p = self.attention_dropout if self.training else 0.0
        if position_ids is None:
            # Default positions: the fused causal kernels apply.
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:
            mask = causal_mask_from_positions(position_ids, position_ids)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        out = out.transpose(1, 2).reshape(batch, seq_len, self.num_heads * self.head_dim)
        return self.wo(out)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (3 x forward).

        Forward = 2 x projection parameters + 2 x 2 x seq_len x head_dim x num_heads for the
        scores (QK^T) and values (PV). The causal half is counted in full, as Megatron and PaLM
        do for MFU, so numbers compare with theirs.
        """
        q_and_o = 2 * self.hidden_size * self.num_heads * self.head_dim
        k_and_v = 2 * self.hidden_size * self.num_kv_heads * self.head_dim
        forward = 2.0 * (q_and_o + k_and_v) + 2.0 * 2.0 * seq_len * self.head_dim * self.num_heads
        return 3.0 * forward
