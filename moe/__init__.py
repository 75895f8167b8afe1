"""Mixture of experts: router, token dispatchers (dispatch / combine; all-to-all, all-gather), grouped
experts, the MoE layer, and its per-step metrics (`moe.metrics`).

`moe` imports only `parallel_state` (and torch); `models` builds `MoELayer` as a channel mixer.
"""
from moe.config import MoEConfig
from moe.context import AuxLossScale, InitSpec, MoEContext
from moe.layer import MoELayer

__all__ = ["AuxLossScale", "InitSpec", "MoEConfig", "MoEContext", "MoELayer"]
