"""The zigzag context-parallel split of a microbatch (pure functions).

Each sequence of length T is cut into 2*cp chunks of T/(2*cp) tokens; CP rank r keeps chunks r and
2*cp-1-r, in that order (T=16, cp=4: rank 0 keeps tokens 0, 1, 14, 15). Pairing an early with a late
chunk gives every rank the same causal attention work. The kept tokens carry their ORIGINAL
positions in `position_ids`, which RoPE and any position-based mask must use.

    local = zigzag_split(microbatch, cp_size, cp_rank)     # every [b, T] tensor -> [b, T/cp]
    full = zigzag_gather([local_0, ..., local_{cp-1}])      # the inverse (tests, debugging)
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from parallel_state.ring import zigzag_chunks

SEQ_DIM = 1  # microbatch tensors are [b, T]


def check_zigzag_seq_len(seq_len: int, cp_size: int) -> None:
    """ValueError naming data.seq_len when it does not cut into 2*cp equal chunks."""
    chunks = 2 * cp_size
    if seq_len % chunks != 0:
        below = seq_len - seq_len % chunks
        raise ValueError(f"data.seq_len={seq_len} is not a multiple of 2 * parallel.cp = {chunks} "
                         f"(zigzag context parallelism cuts each sequence into 2*cp equal chunks); set "
                         f"data.seq_len to a multiple of {chunks}, e.g. {below or chunks} or {below + chunks}")


def zigzag_positions(seq_len: int, cp_size: int, cp_rank: int) -> torch.Tensor:
    """int64 [seq_len / cp]: the token indices (original positions) CP rank `cp_rank` keeps, ascending."""
    check_zigzag_seq_len(seq_len, cp_size)
    chunk = seq_len // (2 * cp_size)
    first, second = zigzag_chunks(cp_size, cp_rank)
    return torch.cat([torch.arange(first * chunk, (first + 1) * chunk),
                      torch.arange(second * chunk, (second + 1) * chunk)])


def zigzag_split(microbatch: dict[str, torch.Tensor], cp_size: int, cp_rank: int) -> dict[str, torch.Tensor]:
    """This CP rank's part of a microbatch: every [b, T, ...] tensor keeps the zigzag tokens along dim 1.

    input_ids, labels, loss_mask and position_ids are split alike; a missing position_ids is added
    (the original positions 0..T-1 of the kept tokens), so the model sees where each token was.
    Every tensor must have the sequence length of input_ids on dim 1.
    """
    if "input_ids" not in microbatch:
        raise ValueError(f"zigzag_split needs input_ids in the microbatch; got {sorted(microbatch)}")
    batch, seq_len = microbatch["input_ids"].shape[:2]
    keep = zigzag_positions(seq_len, cp_size, cp_rank)
    local: dict[str, torch.Tensor] = {}
    for name, tensor in microbatch.items():
        if tensor.dim() < 2 or tensor.shape[SEQ_DIM] != seq_len:
            raise ValueError(f"zigzag_split: {name} has shape {tuple(tensor.shape)}, expected [b, {seq_len}, ...]")
        local[name] = tensor.index_select(SEQ_DIM, keep.to(tensor.device))
    if "position_ids" not in local:
        local["position_ids"] = keep.to(microbatch["input_ids"].device).expand(batch, -1).clone()
    return local


def zigzag_gather(parts: Sequence[torch.Tensor], dim: int = SEQ_DIM) -> torch.Tensor:
    """Inverse of the split: the per-rank tensors (index = CP rank) -> the full sequence along `dim`."""
    cp_size = len(parts)
    pieces: list[torch.Tensor | None] = [None] * (2 * cp_size)
    for rank, part in enumerate(parts):
        if part.shape[dim] % 2 != 0:
            raise ValueError(f"zigzag_gather: part {rank} has odd length {part.shape[dim]} on dim {dim}")
        first, second = zigzag_chunks(cp_size, rank)
        pieces[first], pieces[second] = part.chunk(2, dim)
    return torch.cat(pieces, dim)
