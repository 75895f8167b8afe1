"""Local parts <-> global tensors (trainer.checkpoint_boxes) and resharding through DCP, in one process."""
from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from parallel_state.params import ParamMeta, Shard
from trainer.checkpoint_boxes import Entry, boxes_of, flat_range_boxes, global_name, global_shape
from trainer.checkpoint_dcp import load_boxes, load_whole, save_boxes


@pytest.mark.parametrize("shape", [(7,), (4, 5), (3, 4, 5), (2, 1, 3, 2)])
def test_flat_range_boxes_cover_exactly_the_range(shape):
    rng = random.Random(0)
    numel = math.prod(shape)
    for _ in range(50):
        start = rng.randrange(numel)
        end = rng.randrange(start + 1, numel + 1)
        covered = torch.zeros(shape, dtype=torch.int64)
        flat_seen = []
        for offsets, sizes, first in flat_range_boxes(shape, start, end):
            region = covered
            for dim, (o, n) in enumerate(zip(offsets, sizes)):
                region = region.narrow(dim, o, n)
            region += 1
            # The box's first element sits at its flat offset, and boxes come in flat order.
            assert first == sum(o * math.prod(shape[d + 1:]) for d, o in enumerate(offsets))
            flat_seen.append((first, math.prod(sizes)))
        expected = torch.zeros(numel, dtype=torch.int64)
        expected[start:end] = 1
        assert torch.equal(covered.view(-1), expected)
        assert [f for f, _ in flat_seen] == sorted(f for f, _ in flat_seen)
        assert all(a + n == b for (a, n), (b, _) in itertools.pairwise(flat_seen))
        assert len(flat_seen) <= 2 * len(shape) - 1  # a partial row each side per dimension, whole rows between


def test_shards_map_to_global_offsets_without_padding():
    meta = ParamMeta(shard=Shard(dim=0, index=1, count=2), unpadded=(0, 5))
    assert global_shape((3, 4), meta) == (5, 4)
    local = torch.arange(12.0).view(3, 4)
    (box,) = boxes_of((3, 4), meta, local.view(-1))
    assert box.offsets == (3, 0) and box.sizes == (2, 4)  # rows 3, 4 of the vocabulary; row 5 is padding
    assert box.tensor.data_ptr() == local.data_ptr()  # a view: loads write in place
    column = ParamMeta(shard=Shard(dim=1, index=2, count=4))
    (box,) = boxes_of((3, 2), column, torch.zeros(6))
    assert box.offsets == (0, 4) and global_shape((3, 2), column) == (3, 8)
    # A padding-only shard holds nothing of the global tensor.
    assert boxes_of((2, 4), ParamMeta(shard=Shard(0, 3, 4), unpadded=(0, 5)), torch.zeros(8)) == []


def test_global_name_drops_the_pipeline_chunk():
    assert global_name("chunks.1.layers.5.attn.qkv.weight") == "layers.5.attn.qkv.weight"
    assert global_name("layers.0.mlp.experts.w1.3") == "layers.0.mlp.experts.w1.3"


def _tp_entry(full: torch.Tensor, tp: int, padded_rows: int) -> tuple[Entry, list[torch.Tensor]]:
    """`full` as `tp` row shards of a vocabulary padded to `padded_rows`, as tp ranks would hold it."""
    padded = torch.cat([full, torch.full((padded_rows - full.shape[0], full.shape[1]), 99.0)])
    per = padded_rows // tp
    entry, locals_ = Entry("w", tuple(full.shape)), []
    for rank in range(tp):
        local = padded[rank * per:(rank + 1) * per].clone()
        locals_.append(local)
        entry.boxes += boxes_of(tuple(local.shape), ParamMeta(shard=Shard(0, rank, tp), unpadded=(0, full.shape[0])),
                                local.view(-1))
    return entry, locals_


def test_a_tp_sharded_padded_tensor_loads_as_pieces_of_another_split(tmp_path):
    """Saved as 2 padded TP shards; read back as 4 padded shards and as a distributed optimizer's
    uneven flat pieces of the whole tensor."""
    full = torch.randn(9, 6)
    saved, _ = _tp_entry(full, tp=2, padded_rows=10)
    save_boxes(str(tmp_path / "ckpt"), [saved], {"step": 7}, distributed=False)

    four, locals_ = _tp_entry(torch.zeros_like(full), tp=4, padded_rows=12)
    loaded = load_boxes(str(tmp_path / "ckpt"), [four], ["step"], distributed=False)
    assert loaded == {"step": 7}
    assert torch.equal(torch.cat(locals_)[:9], full)
    assert (torch.cat(locals_)[9:] == 99.0).all()  # padding is not in the checkpoint: left alone

    flat = torch.zeros(54)
    pieces = Entry("w", (9, 6))
    for start, end in [(0, 13), (13, 14), (14, 40), (40, 54)]:
        pieces.boxes += boxes_of((9, 6), ParamMeta(), flat[start:end], start)
    load_boxes(str(tmp_path / "ckpt"), [pieces], [], distributed=False)
    assert torch.equal(flat.view(9, 6), full)
    assert torch.equal(load_whole(str(tmp_path / "ckpt"), ["w"])["w"], full)
