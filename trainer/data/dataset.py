"""Fixed-length training samples cut from a flat token stream."""

from __future__ import annotations

import numpy as np


class TokenWindows:
    """The non-overlapping samples of a token stream: window i is tokens[i*T : i*T + T + 1], T = seq_len.

    Consecutive windows share one boundary token so that every token is a label exactly once; the model
    reads window[:-1] and predicts window[1:]. The tail that does not fill a window is unused.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, split: str = "train"):
        if seq_len < 1:
            raise ValueError(f"data.seq_len={seq_len} must be >= 1")
        if len(tokens) < seq_len + 1:
            raise ValueError(
                f"data.seq_len={seq_len} needs at least {seq_len + 1} tokens per sample but the {split} "
                f"split has only {len(tokens)}; lower data.seq_len or use a larger corpus"
            )
        self.tokens = tokens
        self.seq_len = seq_len
        self.split = split

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.seq_len

    def window(self, index: int) -> np.ndarray:
        """Window `index` as int64, shape [seq_len + 1]."""
        if not 0 <= index < len(self):
            raise IndexError(f"window {index} out of range for {len(self)} {self.split} windows")
        start = index * self.seq_len
        return np.asarray(self.tokens[start : start + self.seq_len + 1], dtype=np.int64)

    def gather(self, indices: np.ndarray) -> np.ndarray:
        """The windows at `indices`, in that order, as int64 of shape [len(indices), seq_len + 1]."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and not (0 <= indices.min() and indices.max() < len(self)):
            raise IndexError(
                f"window indices {indices.min()}..{indices.max()} out of range for {len(self)} "
                f"{self.split} windows"
            )
        positions = indices[:, None] * self.seq_len + np.arange(self.seq_len + 1)
        return np.asarray(self.tokens[positions], dtype=np.int64)
