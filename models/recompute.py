"""Activation recomputation (Megatron's --recompute-granularity / --recompute-method / --recompute-num-layers).

`model.recompute`:
- ``none``: every activation a layer's backward needs is kept from the forward.
- ``selective``: each layer keeps its inputs but recomputes the part of the token mixer whose saved
  tensors grow fastest and cost least to redo (`SELECTIVE_PART`; docs/recompute.md): attention's
  and MLA's core (K/V head expansion, mask, softmax(QK^T)V with its dropout), GLA's chunkwise
  recurrence. ParaRNN and the MoE/MLP channel mixers have none.
- ``full``: whole decoder layers are recomputed in backward from their saved input. Which ones is
  `full_recompute_groups` (pure): ``uniform`` checkpoints consecutive groups of
  `model.recompute_layers` layers (each group's input is kept), ``block`` checkpoints the first
  `model.recompute_layers` layers of each pipeline stage one by one and keeps the rest.

A "stage" is what one model chunk holds: a pipeline stage, or a virtual stage under interleaving
(Megatron applies the same rule per TransformerBlock).

The recompute repeats the forward exactly (bit for bit): torch's non-reentrant checkpoint restores
the default random generator and autocast state, and `recompute_contexts` also puts back foldtron's
named random streams (the TP-sharded dropout stream) as they were at the forward, and undoes what
the recomputed forward changes in module buffers (the MoE router's token counts), so the step sees
one forward per microbatch, as without recompute.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from parallel_state.rng import RNGStreams

RECOMPUTE_MODES = ("none", "selective", "full")
RECOMPUTE_METHODS = ("uniform", "block")

# What selective recompute redoes in each token mixer (None: nothing; the reason is in docs/recompute.md).
SELECTIVE_PART = {
    "attention": "core attention: K/V head expansion, mask, softmax(QK^T)V (and its dropout)",
    "mla": "core attention: mask, softmax(QK^T)V (and its dropout)",
    "gla": "the chunkwise recurrence (intra-chunk scores and chunk states)",
    "pararnn_gru": None,
    "pararnn_lstm": None,
}


def full_recompute_groups(stage_layers: int, method: str, layers: int) -> list[range]:
    """The local layer positions (0..stage_layers-1) checkpointed together under model.recompute=full.

    Each range is one checkpoint: its first layer's input is kept, everything inside is recomputed
    in backward. ``uniform``: every layer, in consecutive groups of `layers` (the last group may be
    shorter). ``block``: the first `layers` layers, one by one; the remaining layers keep their
    activations. Megatron-LM's meanings of --recompute-method / --recompute-num-layers.
    """
    if method not in RECOMPUTE_METHODS:
        raise ValueError(f"model.recompute_method={method!r}: use one of {', '.join(RECOMPUTE_METHODS)}")
    if layers < 1:
        raise ValueError(f"model.recompute_layers={layers}: must be >= 1")
    if method == "uniform":
        return [range(start, min(start + layers, stage_layers)) for start in range(0, stage_layers, layers)]
    return [range(i, i + 1) for i in range(min(layers, stage_layers))]


def recompute_contexts(rng: RNGStreams | None, modules: Iterable[nn.Module]
                       ) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """`context_fn` of torch's non-reentrant checkpoint: (forward context, recompute context).

    Called at the forward: the named random streams' states are taken then, and the recompute runs
    with them (restoring the streams' later states afterwards). Buffers of `modules` that the
    recomputed forward changes in place are put back when it ends (also when torch stops it early).
    """
    saved_streams = rng.state_dict() if rng is not None else None
    return contextlib.nullcontext(), _recompute_context(rng, saved_streams, list(modules))


@contextlib.contextmanager
def _recompute_context(rng: RNGStreams | None, saved_streams: dict | None,
                       modules: list[nn.Module]) -> Iterator[None]:
    later_streams = rng.state_dict() if rng is not None else None
    buffers = [b for m in modules for b in m.buffers() if b.device.type != "meta"]
    before = [(b, b._version, b.clone()) for b in buffers]
    if rng is not None:
        rng.load_state_dict(saved_streams)
    try:
        yield
    finally:
        if rng is not None:
            rng.load_state_dict(later_streams)
        with torch.no_grad():
            for buffer, version, value in before:
                if buffer._version != version:
                    buffer.copy_(value)


def recomputed(fn: Callable[..., torch.Tensor], *args, rng: RNGStreams | None = None,
               modules: Iterable[nn.Module] = ()) -> torch.Tensor:
    """fn(*args), keeping only its tensor inputs for backward and recomputing the rest there.

    Outside autograd (evaluation, decoding) it is a plain call. `rng`: the rank's named random
    streams, so dropout inside `fn` draws the same masks again; `modules`: those whose buffers
    `fn` may change (see `recompute_contexts`).
    """
    if not torch.is_grad_enabled():
        return fn(*args)
    modules = list(modules)
    return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=True,
                      context_fn=lambda: recompute_contexts(rng, modules))


def run_checkpointed_layers(blocks: list[nn.Module], hidden: torch.Tensor, position_ids: torch.Tensor | None,
                            rng: RNGStreams | None) -> torch.Tensor:
    """Consecutive decoder blocks as one checkpoint: only `hidden` (and position_ids) is kept."""
    def run(x: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        for block in blocks:
            x = block(x, positions)
        return x
    return recomputed(run, hidden, position_ids, rng=rng, modules=blocks)
