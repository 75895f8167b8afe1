"""Measure the bytes a forward saves for backward (the activation memory of training), with saved-tensor hooks.

Every tensor autograd saves passes through the pack hook; tensors sharing a storage (views, the same
tensor saved by two ops) are counted once, and parameters are left out (they are weights, not
activations). This is what the layers and kernels that actually run keep, so it is the reference the
formulas of trainer/memory_model.py are checked against (docs/memory.md).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from models.block import DecoderBlock
from models.config import ModelConfig
from models.init import materialize
from models.parallel_context import ParallelContext
from models.recompute import run_checkpointed_layers
from models.spec import layer_specs


def saved_bytes(forward: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages `forward()` saves for backward, those of `exclude` left out."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in excluded:
            storages.setdefault(storage.data_ptr(), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(storages.values())


def layer_saved_bytes(cfg: ModelConfig, layer: int, micro_batch: int, seq_len: int,
                      par: ParallelContext | None = None, dtype: torch.dtype = torch.float32,
                      position_ids: bool = False) -> int:
    """Bytes one decoder layer saves for backward in training, for this rank's shard.

    The layer is built as the model builds it (TP shard and SP from `par`), fed an input that
    requires grad: [micro_batch, seq_len, hidden] ([.., seq_len / tp, ..] under SP). With
    `model.recompute=full` the layer runs as its own checkpoint, as uniform recompute with groups
    of one does. `position_ids`: pass explicit positions (the masked kernel context parallelism uses).
    """
    with torch.device("meta"):
        block = DecoderBlock(cfg, layer_specs(cfg)[layer], par)
    materialize(block, seed=0, dtype=dtype)
    block.train()
    tp = block.tp
    tokens = seq_len // tp.size if tp.sp else seq_len
    x = torch.randn(micro_batch, tokens, cfg.hidden_size, dtype=dtype, requires_grad=True)
    positions = torch.arange(seq_len).expand(micro_batch, seq_len) if position_ids else None

    def forward() -> torch.Tensor:
        if cfg.recompute == "full":
            return run_checkpointed_layers([block], x, positions, tp.rng)
        return block(x, positions)

    return saved_bytes(forward, exclude=block.parameters())
