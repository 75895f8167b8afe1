"""What each data-parallel rank feeds the model at each step: tensors built from the prepared tokens.

Global step s consumes samples [s*G, (s+1)*G) of the sample stream (G = global_batch_size) in that order.
DP rank d takes the contiguous slice [d*G/dp, (d+1)*G/dp) and cuts it into microbatches, so the global batch
is the same samples in the same order for every layout, which is what layout invariance needs.
"""

from __future__ import annotations

import numpy as np
import torch

from trainer.data.config import DataConfig
from trainer.data.dataset import TokenWindows
from trainer.data.prepare import PreparedData, prepare
from trainer.data.sampler import EpochShuffledSampler

Microbatch = dict[str, torch.Tensor]
"""input_ids, labels, position_ids: int64 [b, T]; loss_mask: float32 [b, T] (1 where the label counts)."""


class DataPipeline:
    """Deterministic train and validation microbatches for one data-parallel rank.

    No iterator state: train_microbatches(step) is a pure function of (data, seed, step, layout), so a
    resumed run just asks for the step it resumes at.
    """

    def __init__(
        self,
        cfg: DataConfig,
        seed: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        prepared: PreparedData | None = None,
    ):
        self.cfg = cfg
        self.seed = seed
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        # The trainer prepares on one rank and passes the result in; preparing here is for single processes.
        self.prepared = prepared if prepared is not None else prepare(cfg)
        self.train_windows = TokenWindows(self.prepared.tokens("train"), cfg.seq_len, "train")
        self.val_windows = TokenWindows(self.prepared.tokens("val"), cfg.seq_len, "val")
        if len(self.val_windows) < cfg.global_batch_size:
            raise ValueError(
                f"the val split has {self.prepared.val_tokens} tokens = {len(self.val_windows)} windows of "
                f"data.seq_len={cfg.seq_len}, fewer than one global batch (data.global_batch_size="
                f"{cfg.global_batch_size}); lower data.seq_len or data.global_batch_size, or raise "
                "data.val_fraction"
            )
        self.sampler = EpochShuffledSampler(len(self.train_windows), seed)

    @property
    def vocab_size(self) -> int:
        return self.prepared.vocab_size

    @property
    def eos_id(self) -> int:
        return self.prepared.eos_id

    @property
    def unigram_entropy(self) -> float:
        """Nats; the loss of a context-free model on the train split (a reference line for loss curves)."""
        return self.prepared.unigram_entropy

    @property
    def num_microbatches(self) -> int:
        """Microbatches per step on each DP rank."""
        return self.cfg.global_batch_size // (self.cfg.micro_batch_size * self.dp_size)

    @property
    def samples_per_rank(self) -> int:
        return self.cfg.global_batch_size // self.dp_size

    @property
    def tokens_per_step(self) -> int:
        """Tokens in one global batch, all ranks together."""
        return self.cfg.global_batch_size * self.cfg.seq_len

    def epoch_of_step(self, step: int) -> float:
        """How many passes over the train windows steps 0..step-1 made (fractional)."""
        return step * self.cfg.global_batch_size / len(self.train_windows)

    def train_microbatches(self, step: int) -> list[Microbatch]:
        """This rank's microbatches of global step `step` (0-based), in order."""
        if step < 0:
            raise ValueError(f"step={step} must be >= 0")
        first = step * self.cfg.global_batch_size + self.dp_rank * self.samples_per_rank
        indices = self.sampler.window_indices(first, first + self.samples_per_rank)
        return self._microbatches(self.train_windows, indices)

    def val_microbatches(self, num_batches: int) -> list[Microbatch]:
        """This rank's microbatches of `num_batches` global validation batches, batch after batch.

        Always the first num_batches * G windows of the val split in order (wrapping if there are fewer),
        so validation losses of different steps and runs are comparable.
        """
        if num_batches < 0:
            raise ValueError(f"num_batches={num_batches} must be >= 0")
        microbatches: list[Microbatch] = []
        for batch in range(num_batches):
            first = batch * self.cfg.global_batch_size + self.dp_rank * self.samples_per_rank
            indices = np.arange(first, first + self.samples_per_rank) % len(self.val_windows)
            microbatches += self._microbatches(self.val_windows, indices)
        return microbatches

    def _microbatches(self, windows: TokenWindows, indices: np.ndarray) -> list[Microbatch]:
        samples = windows.gather(indices)
        size = self.cfg.micro_batch_size
        return [make_microbatch(samples[start : start + size]) for start in range(0, len(samples), size)]


def make_microbatch(windows: np.ndarray) -> Microbatch:
    """Tensors for windows [b, T+1]: inputs are the first T tokens, labels the last T."""
    batch, length = windows.shape[0], windows.shape[1] - 1
    return {
        "input_ids": torch.from_numpy(np.ascontiguousarray(windows[:, :-1])),
        "labels": torch.from_numpy(np.ascontiguousarray(windows[:, 1:])),
        "loss_mask": torch.from_numpy(np.ones((batch, length), dtype=np.float32)),
        "position_ids": torch.from_numpy(np.tile(np.arange(length, dtype=np.int64), (batch, 1))),
    }
