"""Which window is the j-th sample of training: a pure function of (seed, j).

Sample j belongs to epoch e = j // n and is window perm(seed, e)[j % n], where perm is a permutation of the
n windows drawn from a numpy Generator seeded by (seed, e). With no iterator state, resuming at step s only
needs s, and every data-parallel layout can compute any slice of the stream on its own.
"""

from __future__ import annotations

import numpy as np


def epoch_permutation(seed: int, epoch: int, num_windows: int) -> np.ndarray:
    """The order in which epoch `epoch` visits the windows; identical wherever and whenever it is computed."""
    generator = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch])))
    return generator.permutation(num_windows)


class EpochShuffledSampler:
    """Maps sample-stream indices to window indices: each epoch visits every window once, in a fresh order."""

    def __init__(self, num_windows: int, seed: int):
        if num_windows < 1:
            raise ValueError(f"num_windows={num_windows}: there must be at least one window to sample")
        if seed < 0:
            raise ValueError(f"seed={seed} must be >= 0 (numpy SeedSequence entropy)")
        self.num_windows = num_windows
        self.seed = seed
        # A cache only: results never depend on it. Steps move through the stream in order, so one
        # epoch's permutation serves ~n/G consecutive steps before the next one is needed.
        self._cached_epoch = -1
        self._cached_permutation = np.empty(0, dtype=np.int64)

    def window_indices(self, start: int, stop: int) -> np.ndarray:
        """Window indices of samples start..stop-1 of the stream (may span epochs)."""
        if not 0 <= start <= stop:
            raise ValueError(f"need 0 <= start <= stop, got start={start} stop={stop}")
        out = np.empty(stop - start, dtype=np.int64)
        position = start
        while position < stop:
            epoch, offset = divmod(position, self.num_windows)
            take = min(stop - position, self.num_windows - offset)
            out[position - start : position - start + take] = self._permutation(epoch)[offset : offset + take]
            position += take
        return out

    def window_index(self, sample: int) -> int:
        return int(self.window_indices(sample, sample + 1)[0])

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._cached_epoch:
            self._cached_permutation = epoch_permutation(self.seed, epoch, self.num_windows)
            self._cached_epoch = epoch
        return self._cached_permutation
