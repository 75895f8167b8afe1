"""Input shape checks shared by the torch references and the Triton kernels.

Kept apart from both so that a Triton module (imported lazily by its op module, triton being
optional) never imports its op module back: the op modules and the kernels import this one.
"""
from __future__ import annotations

import torch

# ParaRNN Jacobian structures (kernels/pararnn.py, docs/pararnn.md "Parallel scan").
JACOBIAN_STRUCTURES = ("diagonal", "block2")


def check_gla_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                     initial_state: torch.Tensor | None) -> None:
    """GLA's layout: q, k, g [B, T, H, K], v [B, T, H, V], initial_state [B, H, K, V] or None."""
    if q.dim() != 4 or q.shape != k.shape or q.shape != g.shape:
        raise ValueError(f"q, k, g must share one [B, T, H, K] shape; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, g {tuple(g.shape)}")
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be [B, T, H, V] matching q's [B, T, H]; got v {tuple(v.shape)}, "
                         f"q {tuple(q.shape)}")
    if initial_state is not None:
        batch, _, heads, key_dim = q.shape
        expected = (batch, heads, key_dim, v.shape[-1])
        if tuple(initial_state.shape) != expected:
            raise ValueError(f"initial_state must be [B, H, K, V] = {expected}; got {tuple(initial_state.shape)}")


def check_scan_shapes(a: torch.Tensor, b: torch.Tensor, structure: str) -> None:
    """A ParaRNN linear scan's maps `a` and states `b` for a Jacobian `structure`."""
    if structure == "diagonal":
        ok = b.dim() >= 2 and a.shape == b.shape
        expected = "a and b both [B, T, D]"
    elif structure == "block2":
        ok = b.dim() >= 3 and b.shape[-2] == 2 and a.shape == b.shape[:-2] + (2, 2, b.shape[-1])
        expected = "a [B, T, 2, 2, D] and b [B, T, 2, D]"
    else:
        raise ValueError(f"unknown Jacobian structure {structure!r}; available: {', '.join(JACOBIAN_STRUCTURES)}")
    if not ok:
        raise ValueError(f"{structure} scan needs {expected}; got a {tuple(a.shape)}, b {tuple(b.shape)}")
