"""Multi-head latent attention (MLA, DeepSeek-V2/V3): attention whose keys and values are read from
one shared low-rank latent per token (docs/mla.md).

    c_q   = RMSNorm(x W_DQ)                 (q_lora_rank > 0; else queries come from x directly)
    q     = c_q W_UQ  -> per head [q_nope | q_pe],  q_pe rotated by RoPE
    [c_kv | k_pe] = x W_DKV                 (k_pe: one RoPE key shared by every head)
    c     = RMSNorm(c_kv)                   (c and the rotated k_pe are what a decoder caches)
    c W_UKV -> per head [k_nope | v]
    score = scale * (q_nope . k_nope + q_pe . k_pe),  scale = (d_nope + d_rope)^-1/2 (x m^2 under YaRN)
    y     = softmax(score) v W_O

Parameter layouts follow DeepSeek's checkpoints: W_UQ's rows are grouped per head as [nope | rope]
and W_UKV's as [k_nope | v], so splitting rows by head is a contiguous TP slice.

Tensor parallel: the per-head up-projections (wq or wq_up, wkv_up) are column-parallel and wo is
row-parallel, as in attention. The down-projections (wq_down, wkv_down) and the latent norms are
replicated and read the input after the layer's one TP-region mapping: each rank back-propagates
through its own heads only, so their weight gradients are partial sums (marked `tp_partial_grad`,
summed over TP after backward) and their input gradients join the other projections' partial input
gradients in that mapping's reduction. Nothing is communicated between the mapping and wo.

Context parallel: the expanded per-head K [.., d_nope + d_rope] and V [.., d_v] go through ring
attention or Ulysses (models/layers/context_parallel.py), which take a V narrower than K.

`absorbed` is the same function computed the way a decoder does: W_UK folded into the query and
W_UV applied after attending over the latent [c | k_pe] itself. Training uses the expanded form;
decoding (`forward(..., cache=)`, launch/generate.py) uses the absorbed form over a cache of the
latent: the DecodeCache's `keys` hold c [B, 1, T_seen, kv_lora_rank] and its `values` the rotated
k_pe [B, 1, T_seen, d_rope], one "head" shared by all query heads. A cache object with an
`attend(layer, x, position_ids)` method (models/inference/tpla.py: preallocated latent cache, exact
MLA or TPLA decode) is handed the call instead.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from models.config import ModelConfig
from models.decode_cache import DecodeCache
from models.init import normal_init
from models.layers.context_parallel import (
    accumulation_dtype,
    equal_width_sdpa,
    ring_attention,
    ulysses_attention,
)
from models.layers.masks import causal_mask_from_positions
from models.layers.norm import RMSNorm
from models.layers.rope import RotaryEmbedding, apply_rotary, yarn_softmax_scale_factor
from models.layers.tensor_parallel import ColumnParallelLinear, divide_exactly
from models.parallel_context import ParallelContext, resolve_context
from models.recompute import recomputed
from parallel_state.groups import AxisGroup
from parallel_state.params import set_param_meta


class MultiHeadLatentAttention(nn.Module):
    """The "mla" token mixer (module docstring). Sizes describe the full layer; `heads_per_rank`
    is this TP rank's share of the heads."""

    def __init__(self, cfg: ModelConfig, par: ParallelContext | None = None):
        super().__init__()
        par = resolve_context(par)
        tp, mla = par.tp, cfg.mla
        self.tp, self.cp = tp, par.cp
        self.hidden_size = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.heads_per_rank = divide_exactly(cfg.num_heads, tp.size, "model.num_heads")
        self.q_lora_rank = mla.q_lora_rank
        self.kv_lora_rank = mla.kv_lora_rank
        self.nope_dim = mla.qk_nope_head_dim
        self.rope_dim = mla.qk_rope_head_dim
        self.v_dim = mla.v_head_dim
        self.qk_dim = self.nope_dim + self.rope_dim
        self.attention_dropout = cfg.attention_dropout
        self.softmax_scale = self.qk_dim**-0.5 * yarn_softmax_scale_factor(cfg.rope_scaling)
        # model.recompute=selective: _local_attention is recomputed in backward (models/recompute.py).
        self.recompute_core = cfg.recompute == "selective"
        std, out_std = normal_init(cfg.init_std), normal_init(cfg.output_init_std())
        replicated = AxisGroup.single("tp")
        if self.q_lora_rank > 0:
            self.wq_down = ColumnParallelLinear(self.hidden_size, self.q_lora_rank, replicated, init=std)
            self.q_norm = RMSNorm(self.q_lora_rank, cfg.norm_eps)
            self.wq_up = tp.column(self.q_lora_rank, self.num_heads * self.qk_dim, std)
        else:
            self.wq = tp.column(self.hidden_size, self.num_heads * self.qk_dim, std)
        self.wkv_down = ColumnParallelLinear(self.hidden_size, self.kv_lora_rank + self.rope_dim, replicated,
                                             init=std)
        self.kv_norm = RMSNorm(self.kv_lora_rank, cfg.norm_eps)
        self.wkv_up = tp.column(self.kv_lora_rank, self.num_heads * (self.nope_dim + self.v_dim), std)
        self.wo = tp.row(self.num_heads * self.v_dim, self.hidden_size, out_std)
        self.rope = RotaryEmbedding(self.rope_dim, cfg.rope_theta, cfg.rope_scaling)
        if tp.size > 1:
            for param in self._replicated_params():
                set_param_meta(param, tp_partial_grad=True)

    def _replicated_params(self) -> list[nn.Parameter]:
        """The TP-replicated parameters: down-projections and latent norm gains."""
        modules = [self.wkv_down, self.kv_norm]
        if self.q_lora_rank > 0:
            modules += [self.wq_down, self.q_norm]
        return [module.weight for module in modules]

    # ---- the pieces both forms share --------------------------------------------------------------

    def _queries(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """(q_nope [B, H_local, T, d_nope], rotated q_pe [B, H_local, T, d_rope]) of the prepared input."""
        batch, seq_len, _ = x.shape
        if self.q_lora_rank > 0:
            q = self.wq_up(self.q_norm(self.wq_down(x, input_prepared=True)), input_prepared=True)
        else:
            q = self.wq(x, input_prepared=True)
        q = q.view(batch, seq_len, self.heads_per_rank, self.qk_dim).transpose(1, 2)
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        return q_nope, apply_rotary(q_pe, cos, sin)

    def latent(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What a decoder caches per token: (c [B, T, kv_lora_rank], rotated k_pe [B, T, d_rope])."""
        c_kv, k_pe = self.wkv_down(x, input_prepared=True).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        return self.kv_norm(c_kv), apply_rotary(k_pe.unsqueeze(1), cos, sin).squeeze(1)

    def _rope_tables(self, x: torch.Tensor, position_ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        positions = position_ids
        if positions is None:
            positions = torch.arange(x.shape[1], device=x.device).unsqueeze(0)
        return self.rope(positions)

    def _up_projection(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_UK [H_local, d_nope, r], W_UV [H_local, d_v, r]) from this rank's rows of wkv_up."""
        weight = self.wkv_up.weight.view(self.heads_per_rank, self.nope_dim + self.v_dim, self.kv_lora_rank)
        return weight[:, :self.nope_dim], weight[:, self.nope_dim:]

    # ---- training: expanded keys and values ------------------------------------------------------

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor | None = None,
                cache: DecodeCache | None = None) -> torch.Tensor:
        """x [B, T, hidden] (under SP this rank's [B, T/tp, hidden]); position_ids [B, T] or None
        for 0..T-1 -> same shape as x.

        With `cache` (decoding) this call's latents are appended to it and the queries attend over
        everything cached, in the absorbed form; position_ids are then the new tokens' positions.
        """
        if cache is not None:
            attend = getattr(cache, "attend", None)  # a models.inference decode state runs its own attention
            if attend is not None:
                return attend(self, x, position_ids)
            return self._absorbed(x, position_ids, cache)
        x = self.tp.prepare_input(x)  # the layer's one input collective
        batch, seq_len, _ = x.shape
        cos, sin = self._rope_tables(x, position_ids)
        q_nope, q_pe = self._queries(x, cos, sin)
        c, k_pe = self.latent(x, cos, sin)
        kv = self.wkv_up(c, input_prepared=True).view(batch, seq_len, self.heads_per_rank, -1).transpose(1, 2)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        k = torch.cat([k_nope, k_pe.unsqueeze(1).expand(-1, self.heads_per_rank, -1, -1)], dim=-1)
        if self.cp.size > 1:
            out = self._context_parallel_attention(q, k, v, position_ids)
        elif self.recompute_core:
            out = recomputed(self._local_attention, q, k, v, position_ids, rng=self.tp.rng)
        else:
            out = self._local_attention(q, k, v, position_ids)
        return self.wo(out.transpose(1, 2).reshape(batch, seq_len, self.heads_per_rank * self.v_dim))

    def _local_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         position_ids: torch.Tensor | None) -> torch.Tensor:
        dropout_p = self.attention_dropout if self.training else 0.0
        # Heads differ per TP rank, so their dropout masks must too: the tp-sharded stream.
        with self.tp.sharded_rng() if dropout_p > 0 else nullcontext():
            if position_ids is None:
                return equal_width_sdpa(q, k, v, self.softmax_scale, dropout_p=dropout_p, is_causal=True)
            mask = causal_mask_from_positions(position_ids, position_ids)
            return equal_width_sdpa(q, k, v, self.softmax_scale, dropout_p=dropout_p, attn_mask=mask)

    def _context_parallel_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                    position_ids: torch.Tensor | None) -> torch.Tensor:
        if position_ids is None:
            raise ValueError("context-parallel MLA needs position_ids (the original positions of this "
                             "rank's zigzag tokens); the trainer passes them")
        if self.cp.comm == "a2a":
            return ulysses_attention(q, k, v, self.cp.group, position_ids, scale=self.softmax_scale)
        return ring_attention(q, k, v, self.cp.group, scale=self.softmax_scale)

    # ---- decoding: attention over the latent -----------------------------------------------------

    def absorbed(self, x: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The forward computed over the cached latent (no per-head K/V, no dropout, no CP):

            score_h = scale * ((q_nope_h W_UK^h) . c + q_pe_h . k_pe),  o_h = (softmax(score_h) c) W_UV^h^T

        equal to `forward` (checked in float64). Scores and softmax in fp32 (fp64 for fp64 input).
        """
        return self._absorbed(x, position_ids, None)

    def _absorbed(self, x: torch.Tensor, position_ids: torch.Tensor | None, cache: DecodeCache | None
                  ) -> torch.Tensor:
        if self.cp.size > 1:
            raise ValueError("MLA's absorbed form (and decoding) runs without context parallelism (parallel.cp=1)")
        x = self.tp.prepare_input(x)
        batch, seq_len, _ = x.shape
        acc = accumulation_dtype(x.dtype)
        positions = position_ids if position_ids is not None else torch.arange(seq_len, device=x.device)[None]
        positions = positions.expand(batch, seq_len)
        cos, sin = self.rope(positions)
        q_nope, q_pe = self._queries(x, cos, sin)
        c, k_pe = self.latent(x, cos, sin)
        key_positions = positions
        if cache is not None:
            c, k_pe, key_positions = cache.append_keys_values(c.unsqueeze(1), k_pe.unsqueeze(1), positions)
            c, k_pe = c.squeeze(1), k_pe.squeeze(1)
        w_uk, w_uv = self._up_projection()
        q_latent = torch.einsum("bhtn,hnr->bhtr", q_nope.to(acc), w_uk.to(acc))
        scores = (torch.einsum("bhtr,bsr->bhts", q_latent, c.to(acc))
                  + torch.einsum("bhtd,bsd->bhts", q_pe.to(acc), k_pe.to(acc))) * self.softmax_scale
        scores = scores.masked_fill(~causal_mask_from_positions(positions, key_positions), float("-inf"))
        out_latent = torch.einsum("bhts,bsr->bhtr", torch.softmax(scores, dim=-1), c.to(acc))
        out = torch.einsum("bhtr,hvr->bthv", out_latent, w_uv.to(acc)).to(x.dtype)
        return self.wo(out.reshape(batch, seq_len, self.heads_per_rank * self.v_dim))

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (3 x forward) of the full layer, in the expanded form trained here.

        Forward = 2 x projection parameters + 2 x seq_len x heads x (d_nope + d_rope) for the scores
        and 2 x seq_len x heads x d_v for the values (the causal half counted in full, as attention does).
        """
        heads = self.num_heads
        if self.q_lora_rank > 0:
            queries = self.hidden_size * self.q_lora_rank + self.q_lora_rank * heads * self.qk_dim
        else:
            queries = self.hidden_size * heads * self.qk_dim
        latent = self.hidden_size * (self.kv_lora_rank + self.rope_dim)
        up = self.kv_lora_rank * heads * (self.nope_dim + self.v_dim)
        out = heads * self.v_dim * self.hidden_size
        attention = 2.0 * seq_len * heads * (self.qk_dim + self.v_dim)
        return 3.0 * (2.0 * (queries + latent + up + out) + attention)
