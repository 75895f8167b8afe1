"""The MoE channel mixer: [B, T_local, H] -> [B, T_local, H], in any (tp, cp, dp) x (etp, ep, edp) folding.

Flow: tokens (attention layout; without sequence parallelism the TP ranks hold the same tokens,
so each routes its 1/tp slice and the outputs are all-gathered at the end) -> router -> balance
losses -> capacity -> dispatch -> routed experts -> combine (+ shared experts, computed while the
dispatch exchange is in flight) -> back to the attention layout.

Aux-loss contract (docs/loss_and_layout.md, "Loss normalisation"; docs/moe.md, "Balance losses"):
each balance loss is defined per MoE layer on the tokens routed together in one forward call by
the ranks that hold parts of the same sequences (the tp x cp group; its statistics f_e are
all-reduced over that group), and enters the loss exactly like token losses do: the layer adds

    aux_sum = aux_loss_coeff     * (Switch loss)         * tokens
            + seq_aux_loss_coeff * (sequence-level loss) * tokens
            + z_loss_coeff       * (z-loss)              * tokens

to the microbatch's loss SUM, which the trainer divides by the global number of loss tokens.
Each rank holds the part of aux_sum that its own tokens contribute (the Switch loss is linear in
the probabilities once f is fixed, so this split is exact). The addition happens in backward:
`AuxLossAutoScaler` attaches aux_sum to the layer output and, in backward, gives it the gradient
`ctx.aux_loss_scale.value` -- the trainer sets that to the same factor it applies to the loss sum
(1 / global loss tokens) before backward. This works on every pipeline stage, although only the
last holds the loss. The result: gradients are independent of tp, cp, dp, pp, ep, etp and of the
microbatch split, as long as the microbatches hold the same sequences (the Switch loss, being
quadratic in the batch statistics, depends on which sequences are routed together).

Per-rank values for logging (detached, this rank's tokens): `last_aux_sums` {"load_balancing",
"seq_load_balancing", "z_loss"} (unweighted sums over tokens; divide by `last_num_tokens` summed
over the ranks), `last_dropped_slots`, and the router's `tokens_per_expert`.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from moe.config import MoEConfig
from moe.context import AuxLossScale, MoEContext
from moe.dispatcher import make_dispatcher
from moe.experts import GroupedExperts, SharedExperts
from moe.router import (
    Router,
    Routing,
    apply_capacity,
    capacity_of,
    load_imbalance,
    seq_aux_sum,
    switch_aux_sum,
    z_loss_sum,
)
from parallel_state.collectives import (
    all_reduce_sum,
    gather_from_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)
from parallel_state.groups import AxisGroup
from parallel_state.params import set_param_meta


class AuxLossAutoScaler(torch.autograd.Function):
    """Identity on the activation; in backward the attached aux loss receives gradient `scale.value`."""

    @staticmethod
    def forward(ctx, output: torch.Tensor, aux_sum: torch.Tensor, scale: AuxLossScale | None):
        ctx.scale = scale
        ctx.aux_shape = aux_sum.shape
        ctx.aux_dtype = aux_sum.dtype
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad):
        value = 1.0 if ctx.scale is None else ctx.scale.value
        aux_grad = torch.full(ctx.aux_shape, value, dtype=ctx.aux_dtype, device=grad.device)
        return grad, aux_grad, None


class MoELayer(nn.Module):
    """Router, dispatcher (dispatch / combine), grouped experts and shared experts; see the module docstring.

    `init_std` for the router and the expert/shared w1, w3; `output_init_std` for w2 (the scaled
    output init). `ctx` None means one process.
    """

    def __init__(self, cfg: MoEConfig, hidden_size: int, init_std: float, output_init_std: float,
                 ctx: MoEContext | None = None):
        super().__init__()
        ctx = ctx or MoEContext()
        self.cfg, self.ctx, self.hidden_size = cfg, ctx, hidden_size
        self.router = Router(cfg, hidden_size, init_std)
        if ctx.tp_size > 1:
            # Each TP rank routes different tokens: the replicated router's grads are partial sums
            # over TP (summed by the optimizer step, optim.step.allreduce_tp_partial_grads).
            for p in self.router.parameters():
                set_param_meta(p, tp_partial_grad=True)
        self.experts = GroupedExperts(cfg.num_experts, hidden_size, cfg.ffn_hidden_size, init_std, output_init_std,
                                      ep_rank=ctx.ep_rank, ep_size=ctx.ep_size, etp_rank=ctx.etp_rank,
                                      etp_size=ctx.etp_size, grouped_gemm=cfg.grouped_gemm)
        shared_width = cfg.resolved_shared_ffn_hidden_size()
        self.shared = (SharedExperts(hidden_size, shared_width, init_std, output_init_std, ctx.tp)
                       if shared_width else None)
        self.dispatcher = make_dispatcher(cfg.dispatcher, cfg.num_experts, ctx)
        self.last_aux_sums: dict[str, torch.Tensor] = {}
        self.last_num_tokens = 0
        self.last_dropped_slots = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, hidden = x.shape
        ctx = self.ctx
        tokens = x.reshape(batch * seq, hidden)
        seq_index = torch.arange(batch, device=x.device).repeat_interleave(seq)
        split = ctx.tp_size > 1 and not ctx.sp
        if split:  # TP-replicated tokens: route a disjoint 1/tp slice on each TP rank
            if tokens.shape[0] % ctx.tp_size:
                raise ValueError(f"MoE layer without sequence parallelism splits the {tokens.shape[0]} tokens "
                                 f"of a microbatch over tp={ctx.tp_size}; use a multiple of tp or enable SP")
            tokens = scatter_to_sequence_parallel_region(tokens, ctx.tp, dim=0)
            seq_index = seq_index.chunk(ctx.tp_size)[ctx.tp_rank]
        routing = self.router(tokens)
        aux_sum = self._aux_losses(routing, seq_index, batch)
        block_rows = self._apply_capacity(routing)
        out = self._routed_and_shared(tokens, routing, block_rows)
        if aux_sum is not None:
            out = AuxLossAutoScaler.apply(out, aux_sum, ctx.aux_loss_scale)
        if split:
            out = gather_from_sequence_parallel_region(out, ctx.tp, dim=0,
                                                       tensor_parallel_output_grad=False)
        return out.reshape(batch, seq, hidden)

    def _routed_and_shared(self, tokens: torch.Tensor, routing: Routing, block_rows: int | None) -> torch.Tensor:
        """Routed experts between dispatch and combine, plus the shared experts, [N, H].

        The shared experts need no routed token, so they run while the dispatch exchange is in
        flight (between `launch` and `wait`).
        """
        pending = self.dispatcher.launch(tokens, routing, block_rows)
        shared = self.shared(tokens) if self.shared is not None else None
        rows, meta = pending.wait()
        out = self.dispatcher.combine(self.experts(rows, meta.rows_per_expert), meta)
        return out if shared is None else out + shared

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (3 x forward): router + k routed SwiGLUs + the shared SwiGLU.

        Counts the k slots a token may fill (no drops); for BlockFFN all E experts, an upper bound.
        """
        del seq_len  # position-wise
        cfg, hidden = self.cfg, self.hidden_size
        active = cfg.experts_per_token() * cfg.ffn_hidden_size + cfg.resolved_shared_ffn_hidden_size()
        return 3.0 * 2.0 * (hidden * cfg.num_experts + 3 * hidden * active)

    def _apply_capacity(self, routing: Routing) -> int | None:
        """Drop over-capacity slots in place; the padded block size when pad_to_capacity."""
        cfg = self.cfg
        if cfg.capacity_factor is None:
            self.last_dropped_slots = 0
            return None
        capacity = capacity_of(routing.num_tokens, cfg.experts_per_token(), cfg.num_experts, cfg.capacity_factor)
        kept = apply_capacity(routing.expert, routing.weight, routing.active, cfg.num_experts, capacity,
                              cfg.drop_policy)
        self.last_dropped_slots = int(routing.active.sum() - kept.sum())  # one host sync
        routing.active = kept
        return capacity if cfg.pad_to_capacity else None

    def _aux_losses(self, routing: Routing, seq_index: torch.Tensor, num_seqs: int) -> torch.Tensor | None:
        """This rank's share of the weighted aux sum (module docstring), or None when all are off."""
        cfg, num_experts = self.cfg, self.cfg.num_experts
        self.last_num_tokens = routing.num_tokens
        sums: dict[str, torch.Tensor] = {}
        weighted = []
        if cfg.aux_loss_coeff > 0 or cfg.seq_aux_loss_coeff > 0:
            # f_e counts the plain top-k of the unbiased scores (moe/router.py), not the biased,
            # group-limited selection the experts compute.
            chosen = routing.aux_expert.reshape(-1)
            seq_of = seq_index.unsqueeze(1).expand_as(routing.aux_expert).reshape(-1)
            counts = torch.bincount(chosen, minlength=num_experts)
            seq_counts = torch.bincount(seq_of * num_experts + chosen, minlength=num_seqs * num_experts)
            # One all-reduce over the ranks holding the same sequences: f_e and f_{s,e} of the layer.
            both = torch.cat([counts, seq_counts]).double()
            both = all_reduce_sum(both, self.ctx.seq_group)
            counts, seq_counts = both[:num_experts], both[num_experts:].view(num_seqs, num_experts)
            if cfg.aux_loss_coeff > 0:
                sums["load_balancing"] = switch_aux_sum(routing.aux_probs, counts.float(), float(counts.sum()))
                weighted.append(cfg.aux_loss_coeff * sums["load_balancing"])
            if cfg.seq_aux_loss_coeff > 0:
                sums["seq_load_balancing"] = seq_aux_sum(routing.aux_probs, seq_index, seq_counts.float(), cfg.topk)
                weighted.append(cfg.seq_aux_loss_coeff * sums["seq_load_balancing"])
        if cfg.z_loss_coeff > 0:
            sums["z_loss"] = z_loss_sum(routing.logits)
            weighted.append(cfg.z_loss_coeff * sums["z_loss"])
        self.last_aux_sums = {name: value.detach() for name, value in sums.items()}
        return torch.stack(weighted).sum() if weighted else None

    def update_bias(self, global_counts: torch.Tensor) -> None:
        """Aux-loss-free bias step (see Router.update_bias); call once per global batch."""
        self.router.update_bias(global_counts)


def update_aux_free_biases(layers: Iterable[MoELayer], group: AxisGroup) -> list[float]:
    """Once per global batch, after the last microbatch's backward: sum every layer's counted slots
    over `group` (ParallelState.tp_dp_cp: every rank that routes tokens of this pipeline stage) in
    one all-reduce, apply the aux-loss-free bias step where enabled, and restart the counts.

    Every rank of `group` must call this with its MoE layers in the same order. Returns each
    layer's load imbalance (max / mean of its global counts) for logging.
    """
    layers = list(layers)
    if not layers:
        return []
    counts = torch.stack([layer.router.tokens_per_expert for layer in layers])
    counts = all_reduce_sum(counts, group)
    imbalance = []
    for layer, global_counts in zip(layers, counts):
        imbalance.append(load_imbalance(global_counts))
        layer.update_bias(global_counts)
    return imbalance
