"""Writing and reading global tensors with torch.distributed.checkpoint (DCP), by boxes.

Every rank hands DCP the boxes it holds (trainer.checkpoint_boxes): DCP writes each box once
(replicas of the same box on other ranks are deduplicated), records the global shape and the
offsets of every stored chunk, and on load intersects the loading rank's boxes with the stored
chunks. So the writer's and the reader's layouts need not agree. No DTensor is needed: the
planners below turn boxes into DCP's write and read items directly.

Small Python objects (step counters, the loss scale, RNG states) are stored by DCP as pickles; they
are read back with torch.load(weights_only=True), so loading a checkpoint never runs code from it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import pickle
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import ReadItem, SavePlan, TensorWriteData, WriteItem, WriteItemType
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from trainer.checkpoint_boxes import Box, Entry


class _BoxSavePlanner(DefaultSavePlanner):
    """DCP's default planner for the objects, plus one write item per box at its global offsets."""

    def __init__(self, entries: list[Entry]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.entries = entries
        self.boxes = {(e.key, b.offsets): b for e in entries for b in e.boxes}

    def create_local_plan(self) -> SavePlan:
        plan = super().create_local_plan()
        items = [WriteItem(index=MetadataIndex(e.key, torch.Size(b.offsets)), type=WriteItemType.SHARD,
                           tensor_data=TensorWriteData(
                               chunk=ChunkStorageMetadata(offsets=torch.Size(b.offsets), sizes=torch.Size(b.sizes)),
                               properties=TensorProperties.create_from_tensor(b.tensor), size=torch.Size(e.shape)))
                 for e in self.entries for b in e.boxes]
        self.plan = dataclasses.replace(plan, items=plan.items + items)
        return self.plan

    def resolve_data(self, write_item: WriteItem):
        index = write_item.index
        box = self.boxes.get((index.fqn, tuple(index.offset or ())))
        if box is not None:
            return box.tensor.detach()
        return super().resolve_data(write_item)


class _BoxLoadPlanner(DefaultLoadPlanner):
    """Reads the stored chunks that overlap each of this rank's boxes into them, and the objects."""

    def __init__(self, entries: list[Entry]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.entries = {e.key: e for e in entries}

    def create_local_plan(self):
        plan = super().create_local_plan()
        items = []
        for key, entry in self.entries.items():
            chunks = [ChunkStorageMetadata(offsets=torch.Size(b.offsets), sizes=torch.Size(b.sizes))
                      for b in entry.boxes]
            items += create_read_items_for_chunk_list(key, self.metadata.state_dict_metadata[key], chunks)
        return dataclasses.replace(plan, items=plan.items + items)

    def resolve_tensor(self, read_item: ReadItem):
        index = read_item.dest_index
        if index.fqn in self.entries:
            box = self.entries[index.fqn].boxes[index.index]
            return _narrow(box.tensor, read_item.dest_offsets, read_item.lengths)
        return super().resolve_tensor(read_item)

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            self.state_dict[fqn] = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            # torch's message is a page of advice; the line naming what it refused is what matters.
            found = [line.strip() for line in str(e).splitlines() if "Unsupported" in line]
            detail = found[0].split(" Please use")[0] if found else type(e).__name__
            raise ValueError(f"checkpoint object {fqn!r} is unreadable by torch.load(weights_only=True), which "
                             f"accepts only tensors and Python primitives: {detail}") from e


def _narrow(tensor: torch.Tensor, offsets, lengths) -> torch.Tensor:
    for dim, (offset, length) in enumerate(zip(offsets, lengths)):
        if length != tensor.shape[dim]:
            tensor = tensor.narrow(dim, offset, length)
    return tensor


@contextlib.contextmanager
def _one_process_quietly() -> Iterator[None]:
    # DCP warns on every call without a process group that it assumes one process: that is the intent.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to")
        yield


def save_boxes(path: str, entries: list[Entry], objects: dict[str, Any], process_group=None,
               distributed: bool = True) -> None:
    """Write this rank's boxes of `entries` and the `objects` (every rank calls it; objects with the
    same key on several ranks must be equal, one copy is kept) into the directory `path`."""
    with _one_process_quietly():
        dcp.save(dict(objects), storage_writer=dcp.FileSystemWriter(path, thread_count=1),
                 planner=_BoxSavePlanner(entries), process_group=process_group, no_dist=not distributed)


def load_boxes(path: str, entries: list[Entry], objects: list[str], process_group=None,
               distributed: bool = True) -> dict[str, Any]:
    """Read the stored values into this rank's boxes of `entries` (in place) and return `objects`."""
    state: dict[str, Any] = {key: None for key in objects}
    planner = _BoxLoadPlanner(entries)
    try:
        with _one_process_quietly():
            dcp.load(state, storage_reader=dcp.FileSystemReader(path), planner=planner,
                     process_group=process_group, no_dist=not distributed)
    except CheckpointException as e:
        # DCP gathers every rank's failure into one BaseException; a refused object is a plain error.
        refused = [exc for exc, _ in e.failures.values() if isinstance(exc, ValueError)]
        if refused:
            raise refused[0] from e
        raise
    return dict(planner.state_dict)


def read_metadata(path: str) -> Metadata:
    """DCP's index of a checkpoint directory: every stored key with its global shape and dtype."""
    return dcp.FileSystemReader(path).read_metadata()


def stored_shapes(metadata: Metadata) -> dict[str, tuple[int, ...]]:
    """Global shape of every tensor stored in the checkpoint."""
    return {key: tuple(md.size) for key, md in metadata.state_dict_metadata.items()
            if isinstance(md, TensorStorageMetadata)}


def load_whole(path: str, keys: list[str], metadata: Metadata | None = None) -> dict[str, torch.Tensor]:
    """The global tensors `keys` assembled in this process alone (export, one-process loads)."""
    metadata = metadata or read_metadata(path)
    tensors = {}
    entries = []
    for key in keys:
        md = metadata.state_dict_metadata[key]
        tensors[key] = torch.empty(tuple(md.size), dtype=md.properties.dtype)
        entries.append(Entry(key, tuple(md.size), [Box((0,) * len(md.size), tensors[key])]))
    load_boxes(path, entries, [], distributed=False)
    return tensors
