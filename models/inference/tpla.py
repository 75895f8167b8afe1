"""The decode attention of one MLA layer over its LatentCache: exact MLA, or TPLA (docs/tpla.md).

`LatentDecodeAttention` is what launch/generate.py hands an MLA layer as its `cache`: the layer's
forward (models/layers/mla.py) passes the call to `attend`. Two modes:

- exact MLA (`tpla=None`): heads split over TP as in training; every rank caches the whole latent c
  and k_pe, attends over it with its heads (absorbed form) and the row-parallel wo sums the heads.
- TPLA (`tpla=TPLAWeights`): the first call (the prompt, prefill) is exact MLA as above and caches
  only this rank's latent slice and the whole k_pe; every later call is TPLA: each rank computes
  all query heads, its latent slice (normalised on its own, latent_attention.slice_rms_norm),
  its own softmax per head over [its slice | k_pe] and a partial output through its slices of
  W_UV and the whole W_O; an all-reduce over TP sums them. A one-process run may hold all g
  slices (`slices=range(g)`): the same sums without ranks, which is how quality is measured.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.inference.latent_attention import mla_values, slice_rms_norm, tpla_values
from models.inference.latent_cache import LatentCache
from models.layers.context_parallel import accumulation_dtype
from models.layers.masks import causal_mask_from_positions
from models.layers.mla import MultiHeadLatentAttention
from models.layers.rope import apply_rotary
from parallel_state.collectives import gather_from_tp_region, reduce_from_tp_region


def gather_rows(weight: torch.Tensor, layer: MultiHeadLatentAttention) -> torch.Tensor:
    """The full weight from TP shards split along dim 0 (column-parallel rows), on every rank."""
    return gather_from_tp_region(weight.t().contiguous(), layer.tp.group).t().contiguous()


@dataclass
class TPLAWeights:
    """What one rank of TPLA holds for one MLA layer: every head's query weights, its latent slices'
    rows of W_DKV and of the norm gain, the RoPE rows of W_DKV, the matching columns of W_UK and
    W_UV for every head, and the whole W_O."""

    degree: int  # g: the latent is cut into g slices of width r / g
    latent_norm: str  # "slice": each slice normalised by its own RMS; "full": by the whole latent's
    slices: tuple[int, ...]  # the slices this process computes (one per rank; all g when simulating)
    width: int  # r / g
    wq: torch.Tensor  # wq_up [H * (d_nope + d_rope), q_lora_rank], or wq [.., hidden] without query latent
    w_latent: torch.Tensor  # [len(slices) * width, hidden]; with latent_norm="full" all r rows
    w_rope: torch.Tensor  # [d_rope, hidden]
    gain: torch.Tensor  # [len(slices) * width]
    w_uk: torch.Tensor  # [H, d_nope, len(slices) * width]
    w_uv: torch.Tensor  # [H, d_v, len(slices) * width]
    wo: torch.Tensor  # [hidden, H * d_v]

    @classmethod
    def from_layer(cls, layer: MultiHeadLatentAttention, degree: int, slices: tuple[int, ...] | None = None,
                   latent_norm: str = "slice") -> TPLAWeights:
        """Slice the (current) weights of `layer`, a TP shard or the whole layer. Under TP the head-split
        weights are all-gathered once here; `slices` defaults to (this TP rank,) under TP, all g on one
        process."""
        r, tp = layer.kv_lora_rank, layer.tp
        if r % degree:
            raise ValueError(f"model.mla.kv_lora_rank={r} is not divisible by g={degree} TPLA slices")
        if slices is None:
            slices = (tp.rank,) if tp.size > 1 else tuple(range(degree))
        if latent_norm not in ("slice", "full"):
            raise ValueError(f"latent_norm={latent_norm!r}: available slice, full")
        if tp.size > 1 and (degree != tp.size or len(slices) != 1):
            raise ValueError(f"TPLA under tp={tp.size} needs g = tp (got g={degree}) and one slice per rank")
        width = r // degree
        channels = torch.cat([torch.arange(s * width, (s + 1) * width) for s in slices])
        wq = layer.wq_up.weight if layer.q_lora_rank > 0 else layer.wq.weight
        heads, nope, v_dim = layer.num_heads, layer.nope_dim, layer.v_dim
        wkv_up = gather_rows(layer.wkv_up.weight, layer).view(heads, nope + v_dim, r)
        down = layer.wkv_down.weight
        return cls(degree=degree, latent_norm=latent_norm, slices=tuple(slices), width=width,
                   wq=gather_rows(wq, layer),
                   w_latent=down[channels] if latent_norm == "slice" else down[:r], w_rope=down[r:],
                   gain=layer.kv_norm.weight[channels],
                   w_uk=wkv_up[:, :nope][..., channels].contiguous(),
                   w_uv=wkv_up[:, nope:][..., channels].contiguous(),
                   wo=gather_from_tp_region(layer.wo.weight, tp.group).contiguous())


class LatentDecodeAttention:
    """One MLA layer's decode state: its LatentCache and, for TPLA, its TPLAWeights (module docstring)."""

    def __init__(self, tpla: TPLAWeights | None = None, capacity: int = 0):
        self.tpla = tpla
        self.cache = LatentCache(capacity)

    def attend(self, layer: MultiHeadLatentAttention, x: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
        """The layer's output for x [B, T, hidden] at positions [B, T] (None: after the cached tokens)."""
        if layer.cp.size > 1:
            raise ValueError("MLA decoding runs without context parallelism (parallel.cp=1)")
        x = layer.tp.prepare_input(x)
        batch, seq_len, _ = x.shape
        positions = position_ids
        if positions is None:
            positions = torch.arange(self.cache.length, self.cache.length + seq_len, device=x.device)[None]
        positions = positions.expand(batch, seq_len)
        cos, sin = layer.rope(positions)
        if self.tpla is None or self.cache.length == 0:
            return self._exact(layer, x, positions, cos, sin)
        return self._tpla(layer, x, positions, cos, sin)

    def _exact(self, layer: MultiHeadLatentAttention, x: torch.Tensor, positions: torch.Tensor,
               cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, seq_len, _ = x.shape
        q_nope, q_pe = layer._queries(x, cos, sin)
        latent, rope_key = layer.latent(x, cos, sin)
        if self.tpla is None:
            latent, rope_key, key_positions = self.cache.append(latent, rope_key, positions)
        else:  # prefill: attend over the whole latent of the prompt, keep only this rank's slices
            tpla = self.tpla
            held = torch.cat([latent[..., s * tpla.width:(s + 1) * tpla.width] for s in tpla.slices], dim=-1)
            self.cache.append(held, rope_key, positions)
            key_positions = positions
        w_uk, w_uv = layer._up_projection()
        mask = causal_mask_from_positions(positions, key_positions)
        values = mla_values(q_nope, q_pe, latent, rope_key, w_uk, w_uv, layer.softmax_scale, mask)
        return layer.wo(values.to(x.dtype).reshape(batch, seq_len, layer.heads_per_rank * layer.v_dim))

    def _tpla(self, layer: MultiHeadLatentAttention, x: torch.Tensor, positions: torch.Tensor,
              cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        tpla, batch, seq_len = self.tpla, x.shape[0], x.shape[1]
        query_input = layer.q_norm(F.linear(x, layer.wq_down.weight)) if layer.q_lora_rank > 0 else x
        q = F.linear(query_input, tpla.wq).view(batch, seq_len, layer.num_heads, layer.qk_dim).transpose(1, 2)
        q_nope, q_pe = q.split([layer.nope_dim, layer.rope_dim], dim=-1)
        q_pe = apply_rotary(q_pe, cos, sin)
        latent = self._decode_latent(x, layer.kv_norm.eps)
        rope_key = apply_rotary(F.linear(x, tpla.w_rope).unsqueeze(1), cos, sin).squeeze(1)
        latent, rope_key, key_positions = self.cache.append(latent, rope_key, positions)
        mask = causal_mask_from_positions(positions, key_positions)
        values = tpla_values(q_nope, q_pe, latent, rope_key, tpla.w_uk, tpla.w_uv, layer.softmax_scale, mask,
                             tpla.width)
        acc = accumulation_dtype(x.dtype)
        partial = F.linear(values.reshape(batch, seq_len, layer.num_heads * layer.v_dim), tpla.wo.to(acc))
        return reduce_from_tp_region(partial.to(x.dtype), layer.tp.group)


    def _decode_latent(self, x: torch.Tensor, eps: float) -> torch.Tensor:
        """This rank's latent slices of the decode tokens, normalised per slice or by the whole latent."""
        tpla = self.tpla
        if tpla.latent_norm == "slice":
            return slice_rms_norm(F.linear(x, tpla.w_latent), tpla.gain, eps, tpla.width)
        c_kv = F.linear(x, tpla.w_latent)
        ones = torch.ones(c_kv.shape[-1], dtype=tpla.gain.dtype, device=tpla.gain.device)
        normed = slice_rms_norm(c_kv, ones, eps, c_kv.shape[-1])
        held = torch.cat([normed[..., s * tpla.width:(s + 1) * tpla.width] for s in tpla.slices], dim=-1)
        return (held.to(torch.promote_types(held.dtype, torch.float32)) * tpla.gain).to(x.dtype)


def mla_layers(model: nn.Module) -> dict[int, MultiHeadLatentAttention]:
    """The MLA token mixers of a DecoderModel by global layer index."""
    return {int(key): block.token_mixer for key, block in model.layers.items()
            if isinstance(block.token_mixer, MultiHeadLatentAttention)}
