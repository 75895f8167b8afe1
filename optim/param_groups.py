"""Split parameters into a weight-decay group and a no-decay group.

Each group keeps the parameter names in "names" (parallel to "params") so logging and tests can
tell what is where. Group order is fixed (decay, then no-decay) and both groups always exist, even
empty, so optimizer state dicts have the same structure for every model.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from optim.config import OptimConfig


def _wants_no_decay(names: list[str], param: torch.Tensor, cfg: OptimConfig) -> bool:
    # Norm weights and biases are 1-D; decaying them pulls gains toward 0 and hurts (Megatron,
    # torchtitan and nanoGPT all exempt them by default).
    if param.ndim < 2 and not cfg.decay_norms_and_biases:
        return True
    # A tied parameter is exempt if any of its names asks for it, so the result does not depend
    # on which alias the model happens to yield first.
    return any(sub in name for name in names for sub in cfg.no_decay_names)


def build_param_groups(
    named_params: Iterable[tuple[str, torch.nn.Parameter]], cfg: OptimConfig
) -> list[dict]:
    """Return [decay_group, no_decay_group] in named_params order.

    Params with requires_grad=False are skipped; a parameter seen under several names (tied
    weights) appears once, under its first name.
    """
    order: list[torch.nn.Parameter] = []
    names_by_id: dict[int, list[str]] = {}
    for name, param in named_params:
        if not param.requires_grad:
            continue
        key = id(param)
        if key not in names_by_id:
            names_by_id[key] = []
            order.append(param)
        names_by_id[key].append(name)

    decay = {"params": [], "names": [], "weight_decay": cfg.weight_decay}
    no_decay = {"params": [], "names": [], "weight_decay": 0.0}
    for param in order:
        names = names_by_id[id(param)]
        group = no_decay if _wants_no_decay(names, param, cfg) else decay
        group["params"].append(param)
        group["names"].append(names[0])
    return [decay, no_decay]
