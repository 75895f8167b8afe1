"""Orthogonal reparameterisation of MLA's latent before TPLA slices it (docs/tpla.md).

For an orthogonal Q [r, r] the model computes the same function with the latent c replaced by c Q:

1. fold the latent RMSNorm gain into W_UKV (k_nope and v read c through W_UKV, so
   RMSNorm_gamma(c_kv) W_UKV^T = RMSNorm_1(c_kv) (W_UKV diag(gamma))^T) and set the gain to 1;
2. W_DKV's latent rows become Q^T W_DKV and W_UKV becomes W_UKV Q. A gain-free RMSNorm commutes with
   Q (an orthogonal map keeps the root mean square), so the new latent is RMSNorm_1(c_kv) Q, and
   W_UKV Q maps it back: every score and value is unchanged, before slicing (tested in float64).

The transform changes what each TPLA slice sees: Hadamard spreads every direction over all channels
(each slice gets an even share of the latent's energy); PCA rotates onto the principal axes of
latents collected from calibration text, dealt round-robin over the g slices so each slice holds
an equal share of the leading directions.

Under TP the replicated W_DKV and gain are transformed on every rank and the head-split rows of W_UKV
locally (their columns are the whole latent); every rank uses rank 0's Q.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from models.layers.mla import MultiHeadLatentAttention
from parallel_state.groups import AxisGroup


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The orthonormal Sylvester-Hadamard matrix H_n / sqrt(n), n a power of two."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Hadamard transform needs a power-of-two size, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(n)).to(dtype)


def pca_transform(latents: torch.Tensor, degree: int) -> torch.Tensor:
    """Orthogonal Q [r, r] whose columns are the principal axes of latents [N, r] (eigenvectors of their
    second moment, largest first), dealt round-robin over `degree` contiguous slices: slice s holds
    axes s, s + g, s + 2g, ..."""
    x = latents.reshape(-1, latents.shape[-1]).double()
    second_moment = x.T @ x / x.shape[0]
    eigenvalues, vectors = torch.linalg.eigh(second_moment)
    by_variance = vectors[:, torch.argsort(eigenvalues, descending=True)]
    r = by_variance.shape[1]
    order = [k for s in range(degree) for k in range(s, r, degree)]
    return by_variance[:, order]


@torch.no_grad()
def fold_latent_norm_gain(layer: MultiHeadLatentAttention) -> None:
    """W_UKV <- W_UKV diag(gamma), gamma <- 1: the same layer with a gain-free latent norm."""
    gain = layer.kv_norm.weight
    layer.wkv_up.weight.mul_(gain.to(layer.wkv_up.weight.dtype)[None, :])
    gain.fill_(1.0)


@torch.no_grad()
def rotate_latent(layer: MultiHeadLatentAttention, q: torch.Tensor) -> None:
    """Latent c -> c Q (after fold_latent_norm_gain): W_DKV latent rows <- Q^T W, W_UKV <- W_UKV Q."""
    if not torch.all(layer.kv_norm.weight == 1):
        raise ValueError("rotate_latent needs the latent norm gain folded first (fold_latent_norm_gain)")
    r = layer.kv_lora_rank
    down, up = layer.wkv_down.weight, layer.wkv_up.weight
    acc = torch.promote_types(down.dtype, torch.float64)
    q = q.to(acc)
    down[:r] = (q.T @ down[:r].to(acc)).to(down.dtype)
    up.copy_((up.to(acc) @ q).to(up.dtype))


@torch.no_grad()
def collect_latents(model: nn.Module, tokens: torch.Tensor, layers: dict[int, MultiHeadLatentAttention]
                    ) -> dict[int, torch.Tensor]:
    """The latents c [N, r] of every MLA layer (the latent norm's output) for calibration tokens [B, T]."""
    found: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    hooks = [layer.kv_norm.register_forward_hook(lambda _m, _i, out, i=i: found[i].append(out.detach()))
             for i, layer in layers.items()]
    try:
        model(tokens)
    finally:
        for hook in hooks:
            hook.remove()
    return {i: torch.cat([o.reshape(-1, o.shape[-1]) for o in outs]) for i, outs in found.items()}


def _same_on_every_rank(q: torch.Tensor, tp: AxisGroup) -> torch.Tensor:
    if tp.size > 1:
        dist.broadcast(q, src=tp.ranks[0], group=tp.group)
    return q


@torch.no_grad()
def reparameterize(model: nn.Module, layers: dict[int, MultiHeadLatentAttention], transform: str, degree: int,
                   calibration: torch.Tensor | None = None) -> None:
    """Fold the gain and rotate the latent of every MLA layer in `layers` (in place): transform "none"
    leaves the weights, "hadamard" uses one Hadamard matrix, "pca" one Q per layer from the latents
    of `calibration` tokens [B, T] (required)."""
    if transform == "none":
        return
    if transform not in ("hadamard", "pca"):
        raise ValueError(f"latent transform {transform!r}: available none, hadamard, pca")
    for layer in layers.values():
        fold_latent_norm_gain(layer)
    if transform == "hadamard":
        for layer in layers.values():
            rotate_latent(layer, hadamard_matrix(layer.kv_lora_rank))
        return
    if calibration is None:
        raise ValueError("the pca transform needs calibration tokens")
    latents = collect_latents(model, calibration, layers)
    for i, layer in layers.items():
        rotate_latent(layer, _same_on_every_rank(pca_transform(latents[i], degree), layer.tp.group))
