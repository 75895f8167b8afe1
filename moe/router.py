"""Token routing: scores, top-k (optionally group-limited, optionally biased), capacity, balance losses.

Semantics (docs/moe.md):

- logits = x W_r^T in fp32; scores = softmax(logits) or sigmoid(logits).
- Selection: top-k of (scores + aux-free bias); the bias changes which experts are chosen, never
  the weights. Group-limited: experts form n_group contiguous groups; a token keeps the
  topk_group groups with the largest sum of their top-2 selection scores and chooses inside them.
- Weights: softmax scores of the chosen experts as they are; with `topk_then_softmax`, a softmax
  over the k chosen logits (Mixtral); sigmoid scores renormalised over the k choices.
- BlockFFN router: R = RMSNorm(ReLU(x W_r^T)) with a learnable gain, no top-k: every expert is a
  slot, weighted by R, and slots with R = 0 are skipped.
- Balance losses: the load fraction f_e counts each token's plain top-k of the unbiased scores over
  all experts (`Routing.aux_expert`, DeepSeek-V3's indicator): the aux-free bias and the group limit
  change which experts compute, not f_e, and capacity drops do not change it either.
- Capacity per expert on a rank: ceil(tokens * k / E * capacity_factor); over-capacity slots are
  dropped by lowest weight (`probs`; ties keep the earlier slot) or latest position (`position`,
  slot order = token order, then choice order).

A routing is the `Routing` record of [N, k] slot tensors; the dispatchers move only active slots.
The balance-loss helpers below return SUMS over this rank's tokens whose sum over the ranks that
share sequences is the per-layer loss times the number of tokens (see moe/layer.py for the
contract with the trainer).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moe.config import MoEConfig
from moe.context import InitSpec

RMS_EPS = 1e-6


@dataclass
class Routing:
    """Which experts each of N tokens uses: k slots per token."""

    expert: torch.Tensor  # [N, k] int64 expert ids
    weight: torch.Tensor  # [N, k] combine weights (differentiable; dtype of the scores)
    active: torch.Tensor  # [N, k] bool: slot computed (selected, not dropped, nonzero for BlockFFN)
    logits: torch.Tensor  # [N, E] router logits (fp32, or fp64 for fp64 inputs)
    aux_probs: torch.Tensor | None  # [N, E] per-token probabilities the balance losses use (top-k router)
    # [N, k] the experts the balance losses count for f_e: the plain top-k of the unbiased scores over
    # all experts (top-k router; equals `expert` unless the aux-free bias or the group limit is on).
    aux_expert: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return self.expert.shape[0]

    def counts(self, num_experts: int) -> torch.Tensor:
        """[E] int64: active slots per expert."""
        # Inactive slots go to a spare bin E: no boolean indexing, so no host sync for its size.
        spare = torch.full_like(self.expert, num_experts)
        return torch.bincount(torch.where(self.active, self.expert, spare).flatten(),
                              minlength=num_experts + 1)[:num_experts]


def scores_from_logits(logits: torch.Tensor, score_function: str) -> torch.Tensor:
    """softmax over experts, or elementwise sigmoid."""
    if score_function == "softmax":
        return torch.softmax(logits, dim=-1)
    if score_function == "sigmoid":
        return torch.sigmoid(logits)
    raise ValueError(f"unknown score_function {score_function!r}; use softmax or sigmoid")


def group_limited_mask(selection_scores: torch.Tensor, n_group: int, topk_group: int) -> torch.Tensor:
    """[N, E] bool: experts inside each token's topk_group best groups (group score = sum of its top-2)."""
    n, e = selection_scores.shape
    grouped = selection_scores.view(n, n_group, e // n_group)
    top = min(2, e // n_group)
    group_scores = grouped.topk(top, dim=-1).values.sum(-1)  # [N, n_group]
    keep = group_scores.topk(topk_group, dim=-1).indices
    group_mask = torch.zeros(n, n_group, dtype=torch.bool, device=selection_scores.device)
    group_mask.scatter_(1, keep, True)
    return group_mask.unsqueeze(-1).expand(n, n_group, e // n_group).reshape(n, e)


def select_topk(selection_scores: torch.Tensor, k: int, n_group: int | None = None,
                topk_group: int | None = None) -> torch.Tensor:
    """[N, k] expert ids: the k largest selection scores (within the kept groups if group-limited)."""
    if n_group is not None:
        mask = group_limited_mask(selection_scores, n_group, topk_group)
        selection_scores = selection_scores.masked_fill(~mask, float("-inf"))
    return selection_scores.topk(k, dim=-1).indices


def capacity_of(num_tokens: int, k: int, num_experts: int, capacity_factor: float) -> int:
    """Slots each expert may take on a rank: ceil(tokens * k / E * capacity_factor)."""
    return math.ceil(num_tokens * k / num_experts * capacity_factor)


def apply_capacity(expert: torch.Tensor, weight: torch.Tensor, active: torch.Tensor, num_experts: int,
                   capacity: int, policy: str) -> torch.Tensor:
    """The `active` mask after dropping each expert's slots beyond `capacity` (see module docstring)."""
    flat_expert = expert.reshape(-1)
    flat_active = active.reshape(-1)
    slot = torch.arange(flat_expert.numel(), device=expert.device)
    if policy == "probs":
        # Highest weight first, earlier slot first among equals (stable sorts, last key first).
        order = torch.sort(-weight.detach().reshape(-1).float(), stable=True).indices
    elif policy == "position":
        order = slot
    else:
        raise ValueError(f"unknown drop policy {policy!r}; use probs or position")
    # Inactive slots go to a virtual expert E so they never use capacity.
    key = torch.where(flat_active, flat_expert, torch.full_like(flat_expert, num_experts))[order]
    order = order[torch.sort(key, stable=True).indices]
    sorted_key = torch.where(flat_active, flat_expert, torch.full_like(flat_expert, num_experts))[order]
    counts = torch.bincount(sorted_key, minlength=num_experts + 1)
    starts = torch.cumsum(counts, 0) - counts
    rank_in_expert = torch.arange(order.numel(), device=expert.device) - starts[sorted_key]
    keep_sorted = (rank_in_expert < capacity) & (sorted_key < num_experts)
    keep = torch.zeros_like(flat_active)
    keep[order] = keep_sorted
    return keep.view_as(active)


def switch_aux_sum(aux_probs: torch.Tensor, counts: torch.Tensor, total_slots: float) -> torch.Tensor:
    """E * sum_e f_e * sum_{local t} P_{t,e}, f_e = counts_e / total_slots (counts over the sequence group).

    Summed over the ranks of the group this is (Switch aux loss) * (tokens of the group).
    """
    num_experts = aux_probs.shape[-1]
    f = counts.to(aux_probs.dtype) / max(total_slots, 1.0)
    return num_experts * (aux_probs.sum(0) * f).sum()


def seq_aux_sum(aux_probs: torch.Tensor, seq_index: torch.Tensor, seq_counts: torch.Tensor, k: int) -> torch.Tensor:
    """Sequence-level balance loss, summed: sum_s (E * sum_e f_{s,e} P_{s,e}) * T_s over local tokens.

    seq_counts [S, E]: selected slots per (sequence, expert) over the sequence group; T_s =
    slots / k. Summed over the group this is the per-sequence loss averaged over tokens, times tokens.
    """
    num_experts = aux_probs.shape[-1]
    tokens_per_seq = seq_counts.sum(-1, keepdim=True).to(aux_probs.dtype) / k
    f = seq_counts.to(aux_probs.dtype) / (tokens_per_seq * k).clamp_min(1.0)  # [S, E]
    return num_experts * (aux_probs * f[seq_index]).sum()


def z_loss_sum(logits: torch.Tensor) -> torch.Tensor:
    """sum over local tokens of logsumexp(logits)^2 (the z-loss times the token count)."""
    return torch.logsumexp(logits, dim=-1).square().sum()


def load_imbalance(counts: torch.Tensor) -> float:
    """max / mean of per-expert token counts (1.0 is perfect balance; 0 tokens gives 1.0)."""
    counts = counts.double()
    mean = counts.mean()
    return 1.0 if mean == 0 else (counts.max() / mean).item()


class Router(nn.Module):
    """Router weights [E, hidden] (replicated on every rank) and the selection rules above.

    Buffers: `expert_bias` [E] (aux-loss-free balancing; changes only via `update_bias`) and
    `tokens_per_expert` [E] (selected slots per expert counted in training forwards since the last
    `update_bias` / `reset_counts`, this rank's tokens only).
    """

    def __init__(self, cfg: MoEConfig, hidden_size: int, init_std: float):
        super().__init__()
        self.cfg = cfg
        self.num_experts = cfg.num_experts
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, hidden_size))
        self.norm_weight = nn.Parameter(torch.empty(cfg.num_experts)) if cfg.router == "blockffn" else None
        self.init_std = init_std
        self.register_buffer("expert_bias", torch.zeros(cfg.num_experts, dtype=torch.float32))
        # Transient step statistics: not saved in checkpoints.
        self.register_buffer("tokens_per_expert", torch.zeros(cfg.num_experts, dtype=torch.float64),
                             persistent=False)

    def init_specs(self) -> dict[str, InitSpec]:
        specs = {"weight": InitSpec("normal", self.init_std)}
        if self.norm_weight is not None:
            specs["norm_weight"] = InitSpec("ones")
        return specs

    def reset_buffers(self) -> None:
        """Zero the bias and counts (called by materialize after allocating from meta)."""
        with torch.no_grad():
            self.expert_bias.zero_()
            self.tokens_per_expert.zero_()

    def forward(self, x: torch.Tensor) -> Routing:
        """Route tokens x [N, hidden] (no capacity applied yet)."""
        dtype = torch.promote_types(x.dtype, torch.float32)  # fp32 at least (fp64 in reference tests)
        logits = F.linear(x.to(dtype), self.weight.to(dtype))
        if self.cfg.router == "blockffn":
            routing = self._blockffn(logits)
        else:
            routing = self._topk(logits)
        if self.training:
            with torch.no_grad():
                self.tokens_per_expert += routing.counts(self.num_experts).to(self.tokens_per_expert.dtype)
        return routing

    def _topk(self, logits: torch.Tensor) -> Routing:
        cfg, k = self.cfg, self.cfg.topk
        scores = scores_from_logits(logits, cfg.score_function)
        selection = scores.detach()
        if cfg.aux_free_bias_rate > 0:
            selection = selection + self.expert_bias
        expert = select_topk(selection, k, cfg.n_group, cfg.topk_group)
        if cfg.score_function == "softmax":
            if cfg.topk_then_softmax:
                weight = torch.softmax(logits.gather(1, expert), dim=-1)
            else:
                weight = scores.gather(1, expert)
            aux_probs = scores
        else:
            chosen = scores.gather(1, expert)
            weight = chosen / chosen.sum(-1, keepdim=True)
            aux_probs = scores / scores.sum(-1, keepdim=True)
        active = torch.ones_like(expert, dtype=torch.bool)
        biased = cfg.aux_free_bias_rate > 0 or cfg.n_group is not None
        aux_expert = select_topk(scores.detach(), k) if biased else expert
        return Routing(expert=expert, weight=weight, active=active, logits=logits, aux_probs=aux_probs,
                       aux_expert=aux_expert)

    def _blockffn(self, logits: torch.Tensor) -> Routing:
        r = F.relu(logits)
        weight = r * torch.rsqrt(r.square().mean(-1, keepdim=True) + RMS_EPS) * self.norm_weight.to(logits.dtype)
        n = logits.shape[0]
        expert = torch.arange(self.num_experts, device=logits.device).expand(n, -1)
        return Routing(expert=expert, weight=weight, active=r.detach() > 0, logits=logits, aux_probs=None)

    @torch.no_grad()
    def update_bias(self, global_counts: torch.Tensor) -> None:
        """Aux-loss-free step, once per global batch: bias += rate * sign(mean load - load).

        `global_counts` [E]: selected slots per expert summed over every rank that routes tokens of
        this layer (the tp x cp x dp group of its pipeline stage) and every microbatch of the step,
        e.g. an all-reduce of `tokens_per_expert`. Resets `tokens_per_expert`.
        """
        rate = self.cfg.aux_free_bias_rate
        if rate > 0:
            counts = global_counts.to(self.expert_bias.device, torch.float64)
            self.expert_bias += (rate * torch.sign(counts.mean() - counts)).to(self.expert_bias.dtype)
        self.tokens_per_expert.zero_()

    @torch.no_grad()
    def reset_counts(self) -> None:
        """Forget the counted slots (e.g. after logging when the bias update is off)."""
        self.tokens_per_expert.zero_()
