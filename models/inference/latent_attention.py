"""MLA's absorbed attention over a latent cache, and TPLA's per-slice version (docs/tpla.md).

Per head h, with W_UK^h [d_nope, r] and W_UV^h [d_v, r] (rows of wkv_up):

    exact MLA:  s_h = scale * ((q_nope_h W_UK^h) . c + q_pe_h . k_pe),   v_h = softmax(s_h) c W_UV^h^T
    TPLA slice i of g (channels I_i of the latent, r/g of them):
                s_h^i = scale * ((q_nope_h W_UK^h[:, I_i]) . c[I_i] + q_pe_h . k_pe)
                v_h   = sum_i softmax(s_h^i) c[I_i] W_UV^h[:, I_i]^T

every slice keeping every head and the whole RoPE key. With g = 1 the two are the same sums.
Scores and softmax in fp32 (fp64 for fp64 input).
"""
from __future__ import annotations

import torch

from models.layers.context_parallel import accumulation_dtype


def slice_rms_norm(latent: torch.Tensor, gain: torch.Tensor, eps: float, width: int) -> torch.Tensor:
    """RMSNorm of each `width`-wide slice of latent [..., n * width] on its own: every slice is divided
    by the root mean square of its own channels (its sum of squares times g / r, g = r / width:
    the full vector's mean square estimated from the slice) and multiplied by its part of `gain`.

    With one slice this is models.layers.norm.RMSNorm, the same ops (statistics in fp32; fp64 input
    stays fp64).
    """
    shape, acc = latent.shape, accumulation_dtype(latent.dtype)
    x = latent.to(acc).reshape(*shape[:-1], shape[-1] // width, width)
    normed = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (normed.reshape(shape) * gain.to(acc)).to(latent.dtype)


def latent_attention(q_latent: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, rope_key: torch.Tensor,
                     scale: float, mask: torch.Tensor) -> torch.Tensor:
    """softmax(scale * (q_latent . latent + q_pe . rope_key)) latent.

    q_latent [B, H, T, w], q_pe [B, H, T, d_rope], latent [B, S, w], rope_key [B, S, d_rope],
    mask [B, 1, T, S] (True: attend) -> [B, H, T, w], in the accumulation dtype.
    """
    acc = accumulation_dtype(q_latent.dtype)
    scores = (torch.einsum("bhtr,bsr->bhts", q_latent.to(acc), latent.to(acc))
              + torch.einsum("bhtd,bsd->bhts", q_pe.to(acc), rope_key.to(acc))) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhts,bsr->bhtr", torch.softmax(scores, dim=-1), latent.to(acc))


def mla_values(q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, rope_key: torch.Tensor,
               w_uk: torch.Tensor, w_uv: torch.Tensor, scale: float, mask: torch.Tensor) -> torch.Tensor:
    """Exact MLA over the whole latent: per-head values [B, T, H, d_v] (accumulation dtype).

    q_nope [B, H, T, d_nope], w_uk [H, d_nope, r], w_uv [H, d_v, r]; the rest as latent_attention.
    """
    acc = accumulation_dtype(q_nope.dtype)
    q_latent = torch.einsum("bhtn,hnr->bhtr", q_nope.to(acc), w_uk.to(acc))
    out = latent_attention(q_latent, q_pe, latent, rope_key, scale, mask)
    return torch.einsum("bhtr,hvr->bthv", out, w_uv.to(acc))


def tpla_values(q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, rope_key: torch.Tensor,
                w_uk: torch.Tensor, w_uv: torch.Tensor, scale: float, mask: torch.Tensor, width: int) -> torch.Tensor:
    """TPLA over the slices held here: the sum over slices of each slice's own-softmax values
    [B, T, H, d_v]. latent [B, S, n * width] holds n slices; w_uk [H, d_nope, n * width] and
    w_uv [H, d_v, n * width] the matching columns; every head and the whole rope_key in each."""
    total = None
    for start in range(0, latent.shape[-1], width):
        cols = slice(start, start + width)
        part = mla_values(q_nope, q_pe, latent[..., cols], rope_key, w_uk[..., cols], w_uv[..., cols], scale, mask)
        total = part if total is None else total + part
    return total
