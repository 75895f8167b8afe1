"""Global gradient-norm clipping, written so model-parallel ranks can share one norm.

The norm is sqrt of the sum of per-parameter squared L2 norms, accumulated in fp32 whatever the
gradient dtype. `norm_reduce_fn` receives that squared sum (a 0-d fp32 tensor) and returns the
global one — later an all-reduce(SUM) over the model-parallel groups. Each parameter must be
counted once globally, so the caller passes only the parameters this rank owns for the norm
(e.g. a TP-duplicated norm weight on one TP rank only).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

# Same guard as torch.nn.utils.clip_grad_norm_, so results match it to rounding.
_CLIP_EPS = 1e-6


def clip_grad_norm_(
    params: torch.Tensor | Iterable[torch.Tensor],
    max_norm: float,
    norm_reduce_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Scale grads in place by min(1, max_norm / (norm + 1e-6)); return the norm before clipping.

    max_norm <= 0 computes the norm without clipping. A non-finite norm is returned as is and the
    grads are left untouched (the trainer decides what to do with NaN/inf).
    """
    if isinstance(params, torch.Tensor):
        params = [params]
    params = list(params)
    grads = [p.grad for p in params if p.grad is not None]
    # A rank with no grads still takes part in norm_reduce_fn: skipping it would hang the
    # collective on the other ranks.
    device = grads[0].device if grads else (params[0].device if params else torch.device("cpu"))

    if grads:
        per_param = [torch.linalg.vector_norm(g, 2, dtype=torch.float32).to(device) for g in grads]
        sq_sum = torch.stack(per_param).square().sum()
    else:
        sq_sum = torch.zeros((), dtype=torch.float32, device=device)
    if norm_reduce_fn is not None:
        sq_sum = norm_reduce_fn(sq_sum)
    total_norm = sq_sum.sqrt()

    if max_norm > 0 and grads:
        # torch.where instead of a Python `if` keeps this free of a device->host sync.
        coef = torch.clamp(max_norm / (total_norm + _CLIP_EPS), max=1.0)
        coef = torch.where(torch.isfinite(total_norm), coef, torch.ones_like(coef))
        for g in grads:
            g.mul_(coef.to(device=g.device, dtype=g.dtype))
    return total_norm
