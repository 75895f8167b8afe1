"""One MLA layer's decode cache: the latent c of every token seen (or this rank's TPLA slices of
it), the rotated RoPE key k_pe, and the positions.

Buffers are allocated once for `capacity` tokens and doubled when a call would overflow them, so
a decode step writes one row instead of copying the whole cache (what a per-step torch.cat does).
"""
from __future__ import annotations

import torch


class LatentCache:
    """c [B, T, latent channels held], k_pe [B, T, d_rope] and positions [B, T], filled in order."""

    def __init__(self, capacity: int = 0):
        self.capacity = capacity
        self.length = 0
        self._latent: torch.Tensor | None = None
        self._rope_key: torch.Tensor | None = None
        self._positions: torch.Tensor | None = None

    def _grow(self, needed: int, latent: torch.Tensor, rope_key: torch.Tensor, positions: torch.Tensor) -> None:
        capacity = max(needed, self.capacity, 2 * (self._latent.shape[1] if self._latent is not None else 0))
        batch = latent.shape[0]
        new = (latent.new_empty(batch, capacity, latent.shape[-1]), rope_key.new_empty(batch, capacity, rope_key.shape[-1]),
               positions.new_empty(batch, capacity))
        if self._latent is not None:
            for buffer, old in zip(new, (self._latent, self._rope_key, self._positions)):
                buffer[:, :self.length] = old[:, :self.length]
        self._latent, self._rope_key, self._positions = new
        self.capacity = capacity

    def append(self, latent: torch.Tensor, rope_key: torch.Tensor, positions: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Add this call's latent [B, T, c], rope_key [B, T, d_rope] and positions [B, T];
        return views of everything cached so far."""
        end = self.length + latent.shape[1]
        if self._latent is None or end > self._latent.shape[1]:
            self._grow(end, latent, rope_key, positions)
        self._latent[:, self.length:end] = latent
        self._rope_key[:, self.length:end] = rope_key
        self._positions[:, self.length:end] = positions
        self.length = end
        return self.latent, self.rope_key, self.positions

    def truncate(self, length: int) -> None:
        """Forget every token after the first `length` (their rows are overwritten by the next append)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} tokens to {length}")
        self.length = length

    @property
    def latent(self) -> torch.Tensor:
        return self._latent[:, :self.length]

    @property
    def rope_key(self) -> torch.Tensor:
        return self._rope_key[:, :self.length]

    @property
    def positions(self) -> torch.Tensor:
        return self._positions[:, :self.length]

    def nbytes(self) -> int:
        """Bytes of the cached latent and RoPE key (not positions, nor unused capacity)."""
        if self._latent is None:
            return 0
        return self.latent.nelement() * self.latent.element_size() + self.rope_key.nelement() * self.rope_key.element_size()
