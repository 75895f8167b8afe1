"""Vocabulary-parallel embedding, LM head and cross-entropy (Megatron-LM), with vocabulary padding.

The vocabulary is padded to a multiple of tp (times an optional alignment) and split into tp
contiguous row ranges; rank r holds rows [r * V_p / tp, (r + 1) * V_p / tp) of the padded
[V_p, hidden] matrix. Padding rows are zeros (the `unpadded` metadata tells models.init to generate only
the real rows, so they equal the one-process model's), are never looked up, and their logits are
masked out of the loss, so they neither change it nor receive gradient.

The loss never gathers the logits: each rank holds [B, T, V_p / tp] and the softmax statistics
are combined with two all-reduces over TP (max, then [sum of exp, target logit] together).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.init import ParamInit
from models.layers.tensor_parallel import ColumnParallelLinear
from parallel_state.collectives import (
    all_reduce_max,
    all_reduce_sum,
    reduce_from_tp_region,
    reduce_scatter_to_sequence_parallel_region,
    resolve_group,
)
from parallel_state.groups import AxisGroup
from parallel_state.params import mark_shard, set_param_meta

IGNORE_INDEX = -100  # label of tokens without a loss (same as F.cross_entropy's default)
# Global name of the embedding matrix; a tied head on a stage without the embedding seeds from it.
EMBEDDING_WEIGHT_NAME = "embedding.weight"


def padded_vocab_size(vocab_size: int, tp: int, multiple: int = 1) -> int:
    """The smallest multiple of tp * multiple that is >= vocab_size (pure)."""
    if vocab_size < 1 or tp < 1 or multiple < 1:
        raise ValueError(f"padded_vocab_size: vocab_size={vocab_size}, tp={tp}, multiple={multiple} must be >= 1")
    step = tp * multiple
    return -(-vocab_size // step) * step


def vocab_range(padded_vocab: int, rank: int, tp: int) -> tuple[int, int]:
    """[start, end) of the padded vocabulary rows held by TP rank `rank` (pure)."""
    if padded_vocab % tp != 0:
        raise ValueError(f"vocab_range: padded vocabulary {padded_vocab} is not a multiple of tp={tp}")
    per_rank = padded_vocab // tp
    return rank * per_rank, (rank + 1) * per_rank


def _mark_padding(param: nn.Parameter, vocab_size: int, padded: int) -> None:
    if padded != vocab_size:
        set_param_meta(param, unpadded=(0, vocab_size))


class VocabParallelEmbedding(nn.Module):
    """Token embedding with rows split over TP: weight [V_p / tp, hidden], a slice of the padded table.

    Each rank looks up the ids in its range (zeros elsewhere) and the partial results are summed
    over TP; with sequence_parallel the sum is reduce-scattered so each rank keeps its sequence
    chunk [B, T / tp, hidden].
    """

    def __init__(self, vocab_size: int, hidden_size: int, tp: AxisGroup, *, init: ParamInit,
                 multiple: int = 1, sequence_parallel: bool = False):
        super().__init__()
        comm = resolve_group(tp)
        self.tp = comm
        self.vocab_size = vocab_size
        self.padded_vocab_size = padded_vocab_size(vocab_size, comm.size, multiple)
        self.vocab_start, self.vocab_end = vocab_range(self.padded_vocab_size, comm.rank, comm.size)
        self.sequence_parallel = sequence_parallel and comm.size > 1
        self.tp_size = comm.size
        self.weight_init = init
        self.weight = nn.Parameter(torch.empty(self.padded_vocab_size // comm.size, hidden_size))
        mark_shard(self.weight, 0, comm.rank, comm.size)
        _mark_padding(self.weight, vocab_size, self.padded_vocab_size)

    def init_specs(self) -> dict[str, ParamInit]:
        return {"weight": self.weight_init}

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        outside = (input_ids < self.vocab_start) | (input_ids >= self.vocab_end)
        local_ids = (input_ids - self.vocab_start).masked_fill(outside, 0)
        partial = F.embedding(local_ids, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return reduce_scatter_to_sequence_parallel_region(partial, self.tp)
        return reduce_from_tp_region(partial, self.tp)


class VocabParallelLMHead(ColumnParallelLinear):
    """Output projection to this rank's vocabulary slice: [B, T(/tp), hidden] -> logits [B, T, V_p / tp].

    A ColumnParallelLinear over the padded vocabulary (bias-free); feed its output to
    vocab_parallel_cross_entropy. Tied embeddings share the VocabParallelEmbedding's weight, whose
    shard layout is the same.
    """

    def __init__(self, vocab_size: int, hidden_size: int, tp: AxisGroup, *, init: ParamInit,
                 multiple: int = 1, sequence_parallel: bool = False):
        # init.seed_name = EMBEDDING_WEIGHT_NAME makes a tied head on a stage without the embedding
        # start equal to it.
        tp_size = resolve_group(tp).size
        padded = padded_vocab_size(vocab_size, tp_size, multiple)
        super().__init__(hidden_size, padded, tp, init=init, bias=False, gather_output=False,
                         sequence_parallel=sequence_parallel)
        self.vocab_size = vocab_size
        self.padded_vocab_size = padded
        _mark_padding(self.weight, vocab_size, padded)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token of the full (unpadded, unsharded) head: 3 x (2 x vocab x hidden)."""
        del seq_len
        return 3.0 * 2.0 * self.vocab_size * self.in_features


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, comm: AxisGroup, vocab_size: int, ignore_index: int):
        part = logits.shape[-1]
        start = comm.rank * part
        logits32 = logits.float()
        real_here = max(0, min(part, vocab_size - start))  # local columns before the padding
        if real_here < part:
            logits32 = logits32.clone()
            logits32[..., real_here:] = float("-inf")
        global_max = all_reduce_max(logits32.max(dim=-1).values, comm)
        shifted = logits32 - global_max.unsqueeze(-1)
        exp = shifted.exp()

        ignored = labels == ignore_index
        here = (labels >= start) & (labels < start + part) & ~ignored
        local_idx = torch.where(here, labels - start, torch.zeros_like(labels)).unsqueeze(-1)
        # where, not a product: a shard of padding only has -inf logits, and -inf * 0 is NaN.
        target_here = torch.where(here, shifted.gather(-1, local_idx).squeeze(-1), 0.0)
        sums = all_reduce_sum(torch.stack([exp.sum(dim=-1), target_here]), comm)
        sum_exp, target = sums[0], sums[1]
        losses = (sum_exp.log() - target).masked_fill(ignored, 0.0)

        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local_idx, here, ignored)
        ctx.input_dtype = logits.dtype
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        softmax, local_idx, here, ignored = ctx.saved_tensors
        grad = softmax  # d loss / d logit = softmax - onehot(target); padding columns have softmax 0
        grad.scatter_add_(-1, local_idx, -here.to(grad.dtype).unsqueeze(-1))
        grad.mul_((grad_losses * ~ignored).unsqueeze(-1))
        return grad.to(ctx.input_dtype), None, None, None, None


def vocab_parallel_cross_entropy(local_logits: torch.Tensor, labels: torch.Tensor, tp: AxisGroup | None,
                                 vocab_size: int,
                                 ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Per-token cross entropy [B, T] in fp32 (0 where labels == ignore_index), never gathering logits.

    local_logits [B, T, V_p / tp]: this rank's vocabulary slice (VocabParallelLMHead's output);
    labels [B, T] global ids < vocab_size; vocab_size: the real (unpadded) vocabulary. Every TP rank
    returns the same losses. The backward is only valid once (it reuses the saved softmax).
    """
    if labels.shape != local_logits.shape[:-1]:
        raise ValueError(f"vocab_parallel_cross_entropy: labels {tuple(labels.shape)} do not match "
                         f"logits {tuple(local_logits.shape)} without the vocabulary dim")
    comm = resolve_group(tp)
    if local_logits.shape[-1] * comm.size < vocab_size:
        raise ValueError(f"vocab_parallel_cross_entropy: {local_logits.shape[-1]} columns x tp={comm.size} "
                         f"cover fewer than vocab_size={vocab_size} entries")
    if comm.size == 1 and local_logits.shape[-1] == vocab_size:
        # Nothing to combine or mask: torch's fused log-softmax kernel (upcast: bf16 over a large
        # vocabulary is lossy).
        flat = F.cross_entropy(local_logits.float().flatten(0, -2), labels.flatten(), ignore_index=ignore_index,
                               reduction="none")
        return flat.view(labels.shape)
    return _VocabParallelCrossEntropy.apply(local_logits, labels, comm, vocab_size, ignore_index)
