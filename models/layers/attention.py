"""Causal self-attention with grouped-query (GQA) or multi-head (MHA) key/value heads."""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from models.config import ModelConfig
from models.decode_cache import DecodeCache
from models.init import normal_init
from models.layers.context_parallel import ring_attention, ulysses_attention
from models.layers.masks import causal_mask_from_positions
from models.layers.rope import RotaryEmbedding, apply_rotary
from models.layers.tensor_parallel import ColumnParallelLinear, divide_exactly
from models.parallel_context import ParallelContext, resolve_context
from models.recompute import recomputed
from parallel_state.groups import AxisGroup
from parallel_state.params import set_param_meta


def repeat_kv_heads(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, kv_heads, T, D] -> [B, kv_heads * groups, T, D]; query head h reads kv head h // groups."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def kv_heads_per_rank(num_kv_heads: int, tp: int) -> tuple[int, bool]:
    """(K/V heads held per TP rank, whether they are replicated rather than split) (pure).

    tp dividing kv_heads splits them like the query heads. kv_heads dividing tp (GQA with fewer
    K/V heads than ranks, e.g. 8 KV heads at tp=16) gives every rank all of them; each rank then
    reads the one its query heads share, as Megatron does. Anything else cannot be laid out.
    """
    if num_kv_heads % tp == 0:
        return num_kv_heads // tp, False
    if tp % num_kv_heads == 0:
        return num_kv_heads, True
    raise ValueError(f"model.num_kv_heads={num_kv_heads} and parallel.tp={tp}: one must divide the other "
                     f"(K/V heads are split over TP ranks, or replicated when fewer than tp); "
                     f"choose a tp that divides or is a multiple of {num_kv_heads}")


class Attention(nn.Module):
    """Llama attention: bias-free wq, wk, wv, wo; RoPE on q and k; causal softmax attention.

    Tensor parallel (Megatron): query heads are split over TP (wq column-parallel, wo row-parallel);
    K/V heads are split too, or replicated when there are fewer than tp (see `kv_heads_per_rank`;
    their weights are then marked `tp_partial_grad` because each rank back-propagates through one
    head only). Nothing is communicated between the input collective and wo's reduction.

    Context parallel (`par.cp`, size > 1): this rank holds the zigzag chunks of every sequence and
    `position_ids` carries their original positions (RoPE and masks use them). The TP-local heads
    then attend over the whole sequence by ring attention (K/V blocks travel the CP ring) or by
    Ulysses all-to-alls (see models.layers.context_parallel); K/V travel unrepeated.
    """

    def __init__(self, cfg: ModelConfig, par: ParallelContext | None = None):
        super().__init__()
        par = resolve_context(par)
        tp = par.tp
        self.cp = par.cp
        self.hidden_size = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.kv_heads
        self.head_dim = cfg.head_dim
        self.attention_dropout = cfg.attention_dropout
        self.tp = tp
        self.heads_per_rank = divide_exactly(cfg.num_heads, tp.size, "model.num_heads")
        self.kv_heads_per_rank, kv_replicated = kv_heads_per_rank(cfg.kv_heads, tp.size)
        # With replicated K/V, the one head this rank's query heads read.
        self.kv_select = tp.rank * cfg.kv_heads // tp.size if kv_replicated else None
        std, out_std = normal_init(cfg.init_std), normal_init(cfg.output_init_std())
        kv_width = self.num_kv_heads * self.head_dim
        self.wq = tp.column(self.hidden_size, self.num_heads * self.head_dim, std)
        if kv_replicated:
            self.wk = ColumnParallelLinear(self.hidden_size, kv_width, AxisGroup.single("tp"), init=std)
            self.wv = ColumnParallelLinear(self.hidden_size, kv_width, AxisGroup.single("tp"), init=std)
            for weight in (self.wk.weight, self.wv.weight):
                set_param_meta(weight, tp_partial_grad=True)
        else:
            self.wk = tp.column(self.hidden_size, kv_width, std)
            self.wv = tp.column(self.hidden_size, kv_width, std)
        self.wo = tp.row(self.num_heads * self.head_dim, self.hidden_size, out_std)
        self.rope = RotaryEmbedding(self.head_dim, cfg.rope_theta)
        # model.recompute=selective: the core (below) is recomputed in backward (models/recompute.py).
        self.recompute_core = cfg.recompute == "selective"

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor | None = None,
                cache: DecodeCache | None = None) -> torch.Tensor:
        """x [B, T, hidden] (under SP this rank's [B, T/tp, hidden]); position_ids [B, T] or None
        for 0..T-1 -> same shape as x.

        With `cache` (decoding, launch/generate.py) the new keys and values are appended to it and
        the queries attend over everything cached; position_ids are then the new tokens' positions.
        """
        x = self.wq.prepare_input(x)  # one input collective for q, k and v
        batch, seq_len, _ = x.shape
        q = self.wq(x, input_prepared=True).view(batch, seq_len, -1, self.head_dim).transpose(1, 2)
        k = self.wk(x, input_prepared=True).view(batch, seq_len, -1, self.head_dim).transpose(1, 2)
        v = self.wv(x, input_prepared=True).view(batch, seq_len, -1, self.head_dim).transpose(1, 2)
        if self.kv_select is not None:
            k = k[:, self.kv_select:self.kv_select + 1]
            v = v[:, self.kv_select:self.kv_select + 1]

        rope_positions = position_ids
        if rope_positions is None:
            rope_positions = torch.arange(seq_len, device=x.device).unsqueeze(0)
        cos, sin = self.rope(rope_positions)
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)

        if cache is not None:
            return self.wo(self._cached_attention(q, k, v, rope_positions.expand(batch, seq_len), cache)
                           .transpose(1, 2).reshape(batch, seq_len, self.heads_per_rank * self.head_dim))
        if self.cp.size > 1:
            out = self._context_parallel_attention(q, k, v, position_ids)
            return self.wo(out.transpose(1, 2).reshape(batch, seq_len, self.heads_per_rank * self.head_dim))
        if self.recompute_core:
            out = recomputed(self._core_attention, q, k, v, position_ids, rng=self.tp.rng)
        else:
            out = self._core_attention(q, k, v, position_ids)
        out = out.transpose(1, 2).reshape(batch, seq_len, self.heads_per_rank * self.head_dim)
        return self.wo(out)

    def _core_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        position_ids: torch.Tensor | None) -> torch.Tensor:
        """softmax(QK^T / sqrt(d) + causal mask) V over this rank's heads (K/V expanded to the query
        heads), with attention dropout: what selective recompute redoes in backward."""
        groups = q.shape[1] // k.shape[1]
        k = repeat_kv_heads(k, groups)
        v = repeat_kv_heads(v, groups)
        dropout_p = self.attention_dropout if self.training else 0.0
        # Heads differ per TP rank, so their dropout masks must too: the tp-sharded stream.
        with self.tp.sharded_rng() if dropout_p > 0 else nullcontext():
            if position_ids is None:
                # Default positions: the fused causal kernels apply.
                return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
            mask = causal_mask_from_positions(position_ids, position_ids)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)

    def _cached_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                          cache: DecodeCache) -> torch.Tensor:
        """Attention of the new queries over the cached and new keys (no CP, no dropout: inference)."""
        if self.cp.size > 1:
            raise ValueError("decoding with a KV cache runs without context parallelism (parallel.cp=1)")
        k, v, key_positions = cache.append_keys_values(k, v, positions)
        groups = q.shape[1] // k.shape[1]
        mask = causal_mask_from_positions(positions, key_positions)
        return F.scaled_dot_product_attention(q, repeat_kv_heads(k, groups), repeat_kv_heads(v, groups), attn_mask=mask)

    def _context_parallel_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                    position_ids: torch.Tensor | None) -> torch.Tensor:
        if position_ids is None:
            raise ValueError("context-parallel attention needs position_ids (the original positions of this "
                             "rank's zigzag tokens); the trainer passes them")
        if self.cp.comm == "a2a":
            return ulysses_attention(q, k, v, self.cp.group, position_ids)
        return ring_attention(q, k, v, self.cp.group)

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
