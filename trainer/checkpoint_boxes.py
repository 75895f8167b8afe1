"""Where this rank's tensors sit inside the global tensors a checkpoint holds (pure, no processes).

A checkpoint stores every weight and optimizer state as its global tensor: the tensor one process
would hold, without vocabulary padding. A rank holds rectangular parts of some of them ("boxes"): a
TP shard is a slab along its shard dimension, a pipeline stage holds whole layers (already named
by their global index), an expert rank holds whole experts (named by global id), and a distributed
optimizer's piece is a flat range of a parameter, which is cut into at most a few boxes per
dimension. torch.distributed.checkpoint writes each box at its offsets and reads any other set of
boxes back, which is what lets a checkpoint load into another layout.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch

from parallel_state.params import ParamMeta

# The global name of the embedding; the pipeline's tied head copy on the last stage holds it too.
TIED_WEIGHT_NAME = "embedding.weight"


@dataclass(frozen=True)
class Box:
    """A rectangular part of a global tensor: `tensor` (a view of this rank's storage, so a load
    writes in place) covers `offsets` .. `offsets + tensor.shape`."""

    offsets: tuple[int, ...]
    tensor: torch.Tensor

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(self.tensor.shape)


@dataclass
class Entry:
    """One global tensor of the checkpoint and the parts of it this rank holds (possibly none)."""

    key: str
    shape: tuple[int, ...]
    boxes: list[Box] = field(default_factory=list)


def global_name(name: str) -> str:
    """A parameter's one-process name: pipeline chunks ("chunks.1.layers.5...") already use global
    layer indices, so dropping the chunk prefix gives it."""
    return re.sub(r"^chunks\.\d+\.", "", name)


def flat_range_boxes(shape: tuple[int, ...], start: int, end: int) -> list[tuple[tuple[int, ...], tuple[int, ...], int]]:
    """Cut elements [start, end) of a row-major tensor of `shape` into rectangular boxes:
    (offsets, sizes, flat offset of the box's first element), in order. A range is a partial
    first row, whole rows, and a partial last row, each cut the same way one dimension down."""
    if start >= end:
        return []
    if not shape:
        return [((), (), start)]
    inner = math.prod(shape[1:])
    rest = tuple(shape[1:])
    boxes: list[tuple[tuple[int, ...], tuple[int, ...], int]] = []

    def partial_row(row: int, lo: int, hi: int) -> None:
        base = row * inner
        for offsets, sizes, flat in flat_range_boxes(rest, lo - base, hi - base):
            boxes.append(((row, *offsets), (1, *sizes), flat + base))

    if start % inner:
        row_end = min(end, (start // inner + 1) * inner)
        partial_row(start // inner, start, row_end)
        start = row_end
    whole = (end - start) // inner
    if whole:
        boxes.append(((start // inner, *([0] * len(rest))), (whole, *rest), start))
        start += whole * inner
    if start < end:
        partial_row(start // inner, start, end)
    return boxes


def global_shape(local_shape: tuple[int, ...], meta: ParamMeta) -> tuple[int, ...]:
    """The shape of the whole parameter whose local part has `local_shape` (padding removed)."""
    shape = list(local_shape)
    if meta.shard is not None:
        shape[meta.shard.dim] *= meta.shard.count
    if meta.unpadded is not None:
        dim, size = meta.unpadded
        shape[dim] = size
    return tuple(shape)


def _local_origin(local_shape: tuple[int, ...], meta: ParamMeta) -> list[int]:
    origin = [0] * len(local_shape)
    if meta.shard is not None:
        origin[meta.shard.dim] = meta.shard.index * local_shape[meta.shard.dim]
    return origin


def _clip(offsets: list[int], tensor: torch.Tensor, shape: tuple[int, ...]) -> Box | None:
    """The part of a box inside the global shape (padding rows dropped), or None if nothing is."""
    for dim, size in enumerate(shape):
        keep = min(offsets[dim] + tensor.shape[dim], size) - offsets[dim]
        if keep <= 0:
            return None
        if keep < tensor.shape[dim]:
            tensor = tensor.narrow(dim, 0, keep)
    return Box(tuple(offsets), tensor)


def boxes_of(local_shape: tuple[int, ...], meta: ParamMeta, flat: torch.Tensor, start: int = 0) -> list[Box]:
    """The boxes of the global tensor covered by `flat`, elements [start, start + flat.numel()) of
    this rank's part of a parameter (of `local_shape`, row-major): a whole parameter's flattened
    view, or a distributed optimizer's piece of it. The boxes are views of `flat`."""
    shape = global_shape(local_shape, meta)
    origin = _local_origin(local_shape, meta)
    boxes = []
    for offsets, sizes, first in flat_range_boxes(tuple(local_shape), start, start + flat.numel()):
        view = flat[first - start:first - start + math.prod(sizes)].view(sizes)
        box = _clip([o + d for o, d in zip(origin, offsets)], view, shape)
        if box is not None:
            boxes.append(box)
    return boxes
