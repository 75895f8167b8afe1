"""Build the optimizer for the single-process / data-parallel foundation.

Mixed precision is "bf16 autocast with fp32 master weights": parameters (and hence gradients and
optimizer state) stay fp32, and the trainer runs the forward pass under torch.autocast(bf16). The
optimizer is therefore a plain torch.optim.AdamW; no separate master copy or loss scaling is
needed (bf16 has fp32's exponent range). The distributed (ZeRO-1) optimizer will shard these same
param groups.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from optim.config import OptimConfig
from optim.param_groups import build_param_groups


def build_optimizer(
    named_params: Iterable[tuple[str, torch.nn.Parameter]], cfg: OptimConfig
) -> torch.optim.Optimizer:
    """AdamW over the decay / no-decay groups of build_param_groups, initial lr = cfg.lr."""
    groups = build_param_groups(named_params, cfg)
    if not any(group["params"] for group in groups):
        raise ValueError(
            "build_optimizer got no trainable parameters (all requires_grad=False or none passed); "
            "pass model.named_parameters() of the model being trained"
        )
    return adamw_over(groups, cfg)


def adamw_over(groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    """torch's AdamW over ready-made parameter groups (each with its own weight_decay)."""
    # fused is opt-in: the fused kernel rounds differently from the foreach/for-loop paths, and the
    # pinned one-process losses and the layout-parity tests are produced without it.
    return torch.optim.AdamW(
        groups,
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        foreach=cfg.foreach,
        fused=cfg.fused,
    )
