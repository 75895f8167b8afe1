"""Global gradient-norm clipping, written so model-parallel ranks can share one norm.

The norm is sqrt of the sum of per-parameter squared L2 norms, accumulated in fp32 chunks whatever
the gradient dtype and combined in fp64 (see `squared_norm`). `norm_reduce_fn` receives that
squared sum (a 0-d fp64 tensor) and returns the global one: an all-reduce(SUM) over the model-parallel group. Each parameter must be counted once
globally, so the caller names the parameters this rank counts (`counted`, e.g. a TP-replicated
norm gain on TP rank 0 only); every gradient is scaled by the same global coefficient.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

# Same guard as torch.nn.utils.clip_grad_norm_, so results match it to rounding.
_CLIP_EPS = 1e-6
# Elements per fp32 partial sum of a squared norm; the partials are added in fp64.
_NORM_CHUNK = 1024


def squared_norm(grad: torch.Tensor) -> torch.Tensor:
    """sum(grad**2) as a 0-d fp64 tensor, accurate to ~1e-8 relative however the tensor is sharded.

    One fp32 reduction over a large, skewed gradient (an embedding's: a few rows carry most of the
    mass) drifts by up to ~1e-4 relative, and differently for each TP shard: the clip coefficient
    would then depend on the layout. fp32 norms over chunks of _NORM_CHUNK elements, summed in
    fp64, stay exact to rounding without an fp64 copy of the gradient.
    """
    flat = grad.reshape(-1)
    whole = flat.numel() - flat.numel() % _NORM_CHUNK
    total = torch.zeros((), dtype=torch.float64, device=grad.device)
    if whole:
        chunks = torch.linalg.vector_norm(flat[:whole].view(-1, _NORM_CHUNK), 2, dim=1, dtype=torch.float32)
        total = total + chunks.double().square().sum()
    if whole < flat.numel():
        total = total + torch.linalg.vector_norm(flat[whole:], 2, dtype=torch.float32).double().square()
    return total


def clip_grad_norm_(
    params: torch.Tensor | Iterable[torch.Tensor],
    max_norm: float,
    norm_reduce_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    counted: Callable[[torch.Tensor], bool] | None = None,
) -> torch.Tensor:
    """Scale grads in place by min(1, max_norm / (norm + 1e-6)); return the norm before clipping.

    max_norm <= 0 computes the norm without clipping. A non-finite norm is returned as is and the
    grads are left untouched (the trainer decides what to do with NaN/inf).
    """
    if isinstance(params, torch.Tensor):
        params = [params]
    params = list(params)
    grads = [p.grad for p in params if p.grad is not None]
    norm_grads = grads if counted is None else [p.grad for p in params if p.grad is not None and counted(p)]
    # A rank with no grads still takes part in norm_reduce_fn: skipping it would hang the
    # collective on the other ranks.
    device = grads[0].device if grads else (params[0].device if params else torch.device("cpu"))

    if norm_grads:
        sq_sum = torch.stack([squared_norm(g).to(device) for g in norm_grads]).sum()
    else:
        sq_sum = torch.zeros((), dtype=torch.float64, device=device)
    if norm_reduce_fn is not None:
        sq_sum = norm_reduce_fn(sq_sum)
    total_norm = sq_sum.sqrt().float()

    if max_norm > 0 and grads:
        # torch.where instead of a Python `if` keeps this free of a device->host sync.
        coef = torch.clamp(max_norm / (total_norm + _CLIP_EPS), max=1.0)
        coef = torch.where(torch.isfinite(total_norm), coef, torch.ones_like(coef))
        for g in grads:
            g.mul_(coef.to(device=g.device, dtype=g.dtype))
    return total_norm
