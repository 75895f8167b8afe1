"""Per-step MoE metrics and the once-per-step aux-loss-free bias update (docs/moe.md, "Balance losses").

`step_metrics` runs once per global batch, after the last backward, on every rank (each joins the
all-reduces, with zeros where it holds no MoE layer):

- the aux-loss-free bias step over the ranks that route the tokens of a pipeline stage
  (`update_aux_free_biases`), which also gives each layer's load imbalance;
- one all-reduce over every rank of the per-rank sums below, so the metrics are global.

Metrics (the "moe/" names the trainer logs):

    moe/load_balancing, moe/seq_load_balancing, moe/z_loss   unweighted aux losses per routed token
    moe/load_imbalance         max / mean slots per expert, averaged over the MoE layers
    moe/dropped_fraction       share of the routed token-slots dropped by the capacity
    moe/tokens_per_expert/<e>  routed slots of expert e, all MoE layers together (E <= max_logged_experts)
    moe/layer<L>/expert_load   with `layer_ids`: the slots per expert of global layer L, a list of E
                               values (the dashboards show it as a histogram per layer)

Aux-loss sums, routed tokens and dropped slots are the last microbatch's (what the layers keep);
the slots per expert are the whole step's (counted by the routers until the bias step resets them).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from moe.config import MoEConfig
from moe.layer import MoELayer, update_aux_free_biases
from parallel_state.collectives import all_reduce_sum
from parallel_state.groups import AxisGroup

AUX_LOSS_NAMES = ("load_balancing", "seq_load_balancing", "z_loss")


def _slots_per_expert(layers: Sequence[MoELayer], num_experts: int) -> torch.Tensor:
    """[E] float64: the slots each expert was routed this step, summed over this rank's layers."""
    return sum((layer.router.tokens_per_expert.double().cpu() for layer in layers),
               torch.zeros(num_experts, dtype=torch.float64))


def _scalar_sums(layers: Sequence[MoELayer], imbalance: list[float]) -> list[float]:
    """This rank's aux sums (one per AUX_LOSS_NAMES), routed tokens, imbalance sum, layer count and
    dropped slots."""
    aux = [sum(float(layer.last_aux_sums.get(name, 0.0)) for layer in layers) for name in AUX_LOSS_NAMES]
    return aux + [float(sum(layer.last_num_tokens for layer in layers)), sum(imbalance), float(len(imbalance)),
                  float(sum(layer.last_dropped_slots for layer in layers))]


# Per-expert token counts are logged as one metric each up to this many experts.
MAX_LOGGED_EXPERTS = 64


def step_metrics(layers: Sequence[MoELayer], cfg: MoEConfig, stage_group: AxisGroup, world_group: AxisGroup,
                 max_logged_experts: int = MAX_LOGGED_EXPERTS, layer_ids: Sequence[int] | None = None,
                 num_layers: int = 0) -> dict:
    """The bias step and the "moe/" metrics dict (module docstring) of one global batch.

    layers: this rank's MoE layers (possibly none); stage_group: the ranks routing the tokens of
    one pipeline stage (ParallelState.tp_dp_cp); world_group: the group the metrics are summed over
    (ParallelState.world); layer_ids: the global layer index of each of `layers`, out of
    `num_layers` (every rank passes the same num_layers), for the per-layer loads.
    """
    slots = _slots_per_expert(layers, cfg.num_experts)  # before the bias step resets the counts
    per_layer = torch.zeros(num_layers if layer_ids is not None else 0, cfg.num_experts, dtype=torch.float64)
    for layer, index in zip(layers, layer_ids or ()):
        per_layer[index] += layer.router.tokens_per_expert.double().cpu()
    imbalance = update_aux_free_biases(layers, stage_group)
    local = torch.cat([torch.tensor(_scalar_sums(layers, imbalance), dtype=torch.float64), slots,
                       per_layer.reshape(-1)])
    reduced = all_reduce_sum(local, world_group)
    per_layer = reduced[7 + cfg.num_experts:].reshape(per_layer.shape)  # counted like the totals below
    totals = reduced[:7 + cfg.num_experts].tolist()
    tokens, imbalance_sum, layers_counted, dropped = totals[3], totals[4], totals[5], totals[6]
    # Every rank of a stage's TP x DP x CP group counts the layers and their imbalance.
    layers_counted /= stage_group.size
    imbalance_sum /= stage_group.size
    metrics = {f"moe/{name}": value / max(tokens, 1.0) for name, value in zip(AUX_LOSS_NAMES, totals[:3])}
    metrics["moe/load_imbalance"] = imbalance_sum / max(layers_counted, 1.0)
    metrics["moe/dropped_fraction"] = dropped / max(tokens * cfg.experts_per_token(), 1.0)
    if cfg.num_experts <= max_logged_experts:
        metrics.update({f"moe/tokens_per_expert/{e}": count for e, count in enumerate(totals[7:])})
    if layer_ids is not None:
        metrics.update({f"moe/layer{index}/expert_load": per_layer[index].tolist()
                        for index in range(num_layers) if per_layer[index].any()})
    return metrics
