"""torch's AdamW over the decay / no-decay parameter groups.

The optimizer always sees fp32 tensors: the parameters themselves in fp32 training, fp32 master
copies (or a distributed optimizer's slices of them) with bf16/fp16 weights (docs/precision.md).
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
