"""Typed parameter metadata: what the parallel machinery must know about each parameter.

One `ParamMeta` record per parameter, set where the parameter is made (the TP linears, the
vocab-parallel embedding, the experts, the pipeline's tied head copy) and read through
`param_meta` everywhere else (initialisation, gradient reduction, the grad-norm count,
checkpoint assembly in tests). Nothing reads loose tensor attributes.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import torch

META_ATTR = "foldtron_meta"


class Shard(NamedTuple):
    """This tensor is slice `index` of `count` equal slices of the full parameter along `dim`."""

    dim: int
    index: int
    count: int


@dataclass(frozen=True)
class ParamMeta:
    """How one parameter is split, replicated and reduced.

    The gradient of a dense parameter is summed over DP x CP, that of a routed expert over EDP
    (`grad_group`); a `tp_partial_grad` parameter is replicated over TP but each TP rank's gradient
    is a partial sum (sequence-parallel norm gains, a Row bias, replicated K/V, the MoE router), so it
    is summed over TP too.
    """

    # TP (or expert-TP) slice of the full tensor; None: this rank holds the whole tensor.
    shard: Shard | None = None
    # A routed expert's weight: lives on the expert grid, gradient reduced over EDP.
    expert: bool = False
    # Replicated over TP with a partial gradient on each TP rank: summed over TP after backward.
    tp_partial_grad: bool = False
    # The second copy of a weight tied over pipeline stages (the head on the last stage): it holds
    # the same values as the first, so the global grad norm does not count it.
    tied_copy: bool = False
    # (dim, real size): entries past `real size` along `dim` of the full tensor are padding (a
    # vocabulary padded to a multiple of tp); they are initialised to zero and never trained.
    unpadded: tuple[int, int] | None = None

    @property
    def grad_group(self) -> str:
        """The ParallelState group the gradient is summed over: "edp" for experts, else "dp_cp"."""
        return "edp" if self.expert else "dp_cp"


_DEFAULT = ParamMeta()


def param_meta(param: torch.Tensor) -> ParamMeta:
    """The parameter's metadata (the defaults for a plain, replicated, dense parameter)."""
    return getattr(param, META_ATTR, _DEFAULT)


def set_param_meta(param: torch.Tensor, **fields) -> torch.Tensor:
    """Set some fields of `param`'s metadata (the others keep their values); returns `param`."""
    setattr(param, META_ATTR, dataclasses.replace(param_meta(param), **fields))
    return param


def mark_shard(param: torch.Tensor, dim: int, index: int, count: int) -> torch.Tensor:
    """Record that `param` is slice `index` of `count` along `dim` (nothing when count is 1)."""
    if count > 1:
        set_param_meta(param, shard=Shard(dim, index, count))
    return param


def is_tp_duplicate(param: torch.Tensor, tp_rank: int) -> bool:
    """Whether `param` is a TP replica that another rank already counts (for a global grad norm):
    sharded params count on every TP rank, replicated ones on TP rank 0 only."""
    return param_meta(param).shard is None and tp_rank != 0


def tp_partial_grad_params(params) -> list[torch.Tensor]:
    """The parameters whose gradients must be summed over TP after backward."""
    return [p for p in params if param_meta(p).tp_partial_grad]
