"""What a training run saves and loads, as global tensors that fit any layout (docs/checkpoints.md).

Keys of a checkpoint (torch.distributed.checkpoint, one global tensor each):

    model/<name>                 a weight or persistent buffer, by its one-process name
    optim/<name>/exp_avg         AdamW's moments of that weight (fp32), whatever the optimizer's
    optim/<name>/exp_avg_sq        sharding: the distributed optimizer's flat pieces and the
    optim/<name>/step              all-reduce step's whole tensors land on the same keys
    optim/<name>/master          fp32 master weights, where the weights are bf16 / fp16
    trainer                      step (= the LR schedule's and the data's position), skipped steps,
                                 the fp16 loss scale
    rng/rank<r>                  rank r's generator states; restored only in the layout that wrote
                                 them (the streams depend on rank coordinates)

`Checkpointer.save` writes them synchronously or, with `asynchronous`, copies this rank's parts
(staging: one extra copy of the state in host memory) and writes in a background thread over a
process group of its own, so the training collectives never interleave with the checkpoint's.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from optim.outer.checkpoint import check_outer_keys, outer_checkpoint, restore_outer
from optim.step import OptimizerStep, ParamState
from parallel_state.errors import ConfigError
from parallel_state.params import param_meta
from trainer.checkpoint import (
    CONFIG_FILE,
    IncompleteCheckpointError,
    PendingSave,
    commit_save,
    prepare_save,
    read_meta,
)
from trainer.checkpoint_boxes import TIED_WEIGHT_NAME, Box, Entry, boxes_of, global_name, global_shape
from trainer.checkpoint_dcp import load_boxes, read_metadata, save_boxes, stored_shapes

log = logging.getLogger(__name__)

MODEL_PREFIX = "model/"
EXPORT_FILE = "model.safetensors"  # launch/export.py's consolidated weights


def param_key(name: str, param: torch.Tensor) -> str:
    """The global name of a local parameter (the tied head copy of a pipeline holds the embedding)."""
    return TIED_WEIGHT_NAME if param_meta(param).tied_copy else global_name(name)


def model_entries(model: nn.Module) -> list[Entry]:
    """Every parameter (each tied tensor once) and persistent buffer, as views of this rank's storage."""
    entries = []
    for name, p in model.named_parameters():
        meta = param_meta(p)
        flat = p.detach().view(-1)
        entries.append(Entry(MODEL_PREFIX + param_key(name, p), global_shape(tuple(p.shape), meta), boxes_of(tuple(p.shape), meta, flat)))
    params = {id(p) for p in model.parameters()}
    for name, value in model.state_dict(keep_vars=True).items():
        if id(value) not in params and isinstance(value, torch.Tensor):
            entries.append(Entry(MODEL_PREFIX + global_name(name), tuple(value.shape),
                                 boxes_of(tuple(value.shape), param_meta(value), value.detach().view(-1))))
    return entries


def optimizer_entries(states: list[ParamState], keys: dict[int, str]) -> list[Entry]:
    """AdamW's state per global parameter name (`keys`: id of a model parameter -> its name)."""
    entries: dict[str, Entry] = {}
    for state in states:
        name, meta, shape = keys[id(state.param)], param_meta(state.param), tuple(state.param.shape)
        for what, flat in state.tensors.items():
            key = f"optim/{name}/{what}"
            entry = entries.setdefault(key, Entry(key, global_shape(shape, meta)))
            entry.boxes += boxes_of(shape, meta, flat, state.start)
        step = entries.setdefault(f"optim/{name}/step", Entry(f"optim/{name}/step", ()))
        if not step.boxes:  # several pieces of one parameter share one count
            step.boxes.append(Box((), state.step))
    return list(entries.values())


def param_keys(model: nn.Module) -> dict[int, str]:
    return {id(p): param_key(name, p) for name, p in model.named_parameters()}


def check_shapes(path: str, entries: list[Entry], stored: dict[str, tuple[int, ...]], field: str) -> None:
    """One clear error for the first tensor the checkpoint lacks or holds in another shape."""
    for entry in entries:
        name = entry.key.removeprefix(MODEL_PREFIX)
        if entry.key not in stored:
            raise ConfigError(field, path, f"the checkpoint has no {entry.key!r} (this model's {name}); it was saved "
                              "from another model", "load a checkpoint of this model (same model.* settings)")
        if stored[entry.key] != entry.shape:
            raise ConfigError(field, path, f"{name} has shape {list(stored[entry.key])} in the checkpoint but "
                              f"{list(entry.shape)} in this model ({entry.key})",
                              "use the model.* settings of the checkpoint's config.yaml")


def _stage(entries: list[Entry]) -> list[Entry]:
    """Copies of this rank's boxes: training may change the originals while a background save runs."""
    return [Entry(e.key, e.shape, [Box(b.offsets, b.tensor.detach().clone()) for b in e.boxes]) for e in entries]


@dataclass
class RunState:
    """What a checkpoint holds besides tensors, as the trainer has it."""

    step: int
    skipped_in_a_row: int
    loss_scale: dict[str, Any] | None
    rng: dict[str, Any]


class Checkpointer:
    """Saves and loads one run's state; owns the background save in flight (at most one)."""

    def __init__(self, run_dir: str, rank: int, world_size: int, layout: str, keep_last: int,
                 asynchronous: bool = False):
        self.run_dir, self.rank, self.world_size = run_dir, rank, world_size
        self.layout, self.keep_last, self.asynchronous = layout, keep_last, asynchronous
        self.distributed = dist.is_initialized() and world_size > 1
        # A group of its own for the background writes (created by every rank, here, in the same order).
        self.group = dist.new_group(backend="gloo") if asynchronous and self.distributed else None
        self.executor = (ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint", initializer=_lower_priority)
                         if asynchronous else None)
        self.pending: Future | None = None

    # ---- save --------------------------------------------------------------------------------

    def save(self, model: nn.Module, optim_step: OptimizerStep, state: RunState, config_yaml: str,
             barrier) -> str:
        """Write checkpoint `state.step`; returns its final path (still being written when asynchronous)."""
        self.wait()  # one save in flight: its group and its directory are free again
        keys = param_keys(model)
        entries = with_outer_state(model_entries(model) + optimizer_entries(optim_step.param_states(), keys),
                                   optim_step, keys)
        objects = {"trainer": {"step": state.step, "skipped_in_a_row": state.skipped_in_a_row,
                               "loss_scale": state.loss_scale},
                   f"rng/rank{self.rank:05d}": state.rng}
        pending = prepare_save(self.run_dir, state.step, self.rank == 0, barrier)
        if self.rank == 0:
            with open(os.path.join(pending.tmp, CONFIG_FILE), "w") as f:
                f.write(config_yaml)
        if self.executor is None:
            self._write(pending, entries, objects, None)
        else:
            self.pending = self.executor.submit(self._write, pending, _stage(entries), objects, self.group)
        return pending.final

    def _write(self, pending: PendingSave, entries: list[Entry], objects: dict[str, Any], group) -> None:
        save_boxes(pending.tmp, entries, objects, process_group=group, distributed=self.distributed)
        # DCP returns on every rank once the coordinator wrote its index after all ranks' data.
        if self.rank == 0:
            commit_save(pending, {"layout": self.layout, "world_size": self.world_size}, self.keep_last)
            log.info("saved checkpoint %s", pending.final)

    def wait(self) -> None:
        """Block until the save in flight (if any) is on disk; re-raises its error."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.result()

    def close(self) -> None:
        self.wait()
        if self.executor is not None:
            self.executor.shutdown()

    # ---- load --------------------------------------------------------------------------------

    def load(self, path: str, model: nn.Module, optim_step: OptimizerStep | None, field: str) -> RunState | None:
        """Read checkpoint `path` into the model (and, given `optim_step`, the optimizer: a resume);
        returns the run state of a resume, None for weights only. Every check runs, and every rank
        agrees on its outcome, before any tensor is overwritten."""
        plan, error = None, None
        try:
            plan = self._plan_load(path, model, optim_step, field)
        except ConfigError as e:
            error = e
        # A rank whose pipeline stage lacks the mismatching tensor would otherwise wait in DCP's
        # collectives for the rank that raised: every rank raises the first error.
        error = self._agreed_error(error)
        if error is not None:
            raise error
        if plan is None:  # an export, already loaded
            return None
        entries, objects, masters_loaded, meta = plan
        loaded = load_boxes(path, entries, objects, distributed=self.distributed)
        if optim_step is None:
            return None
        optim_step.finish_state_import(masters_loaded)
        run = loaded["trainer"]
        restore_outer(optim_step, int(run["step"]))
        rng_key = f"rng/rank{self.rank:05d}"
        if rng_key not in loaded:
            log.info("checkpoint %s was saved at another layout (%s): random generator states start fresh",
                     path, meta.get("layout"))
        return RunState(step=int(run["step"]), skipped_in_a_row=int(run["skipped_in_a_row"]),
                        loss_scale=run["loss_scale"], rng=loaded.get(rng_key))

    def _plan_load(self, path: str, model: nn.Module, optim_step: OptimizerStep | None, field: str):
        """(entries to read, objects to read, whether fp32 masters are among them, the marker), or
        None after loading an export; raises ConfigError for a checkpoint that does not fit."""
        if not os.path.exists(path):
            raise ConfigError(field, path, "no such checkpoint", "point it at a checkpoints/step_XXXXXX directory "
                              "or an export of launch/export.py")
        if optim_step is None and _is_export(path):
            load_export(path, model, field)
            return None
        try:
            meta = read_meta(path, field)
        except IncompleteCheckpointError as e:
            raise ConfigError(field, path, str(e), "use a complete checkpoint (one with meta.json), e.g. "
                              "trainer.resume=auto picks the newest complete one") from e
        stored = stored_shapes(read_metadata(path))
        entries = model_entries(model)
        check_shapes(path, entries, stored, field)
        masters_loaded = False
        if optim_step is not None:
            keys = param_keys(model)
            optim = optimizer_entries(optim_step.param_states(), keys)
            has_masters = all(f"optim/{k}/master" in stored for k in set(keys.values()))
            wants_masters = any(e.key.endswith("/master") for e in optim)
            if wants_masters and not has_masters:  # masters will come from the loaded weights
                optim = [e for e in optim if not e.key.endswith("/master")]
            check_shapes(path, optim, stored, field)
            masters_loaded = wants_masters and has_masters
            entries += optim
        # fp32 weights read the fp32 masters a bf16 run kept (its bf16 weights are their rounding).
        entries = [_from_master(e, stored) for e in entries]
        if optim_step is not None:
            entries = with_outer_state(entries, optim_step, param_keys(model))
            check_outer_keys(field, path, [e.key for e in entries], stored)
        objects = []
        if optim_step is not None:
            objects.append("trainer")
            if meta.get("layout") == self.layout:  # RNG streams depend on rank coordinates
                objects.append(f"rng/rank{self.rank:05d}")
        return entries, objects, masters_loaded, meta

    def _agreed_error(self, error: ConfigError | None) -> ConfigError | None:
        if not self.distributed:
            return error
        found: list = [None] * self.world_size
        mine = None if error is None else (error.field, error.value, error.problem, error.fix)
        dist.all_gather_object(found, mine)
        first = next((f for f in found if f is not None), None)
        return error if error is not None else (ConfigError(*first) if first is not None else None)


def with_outer_state(entries: list[Entry], optim_step: OptimizerStep, keys: dict[int, str]) -> list[Entry]:
    """An outer optimizer's checkpoint (optim/outer/checkpoint.py): this worker's weights and inner
    state under its own keys, plus the outer state; `entries` unchanged without one."""
    outer = outer_checkpoint(optim_step)
    if outer is None:
        return entries
    own = [Entry(outer.key(e.key), e.shape, e.boxes) for e in entries]
    return own + [e for e in optimizer_entries(outer.states, keys) if not e.key.endswith("/step")]


def _lower_priority() -> None:
    # The background writer yields the cores to training where they are short (Linux: per-thread nice).
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)


def _from_master(entry: Entry, stored: dict[str, tuple[int, ...]]) -> Entry:
    if not entry.key.startswith(MODEL_PREFIX) or not entry.boxes or entry.boxes[0].tensor.dtype != torch.float32:
        return entry
    master = f"optim/{entry.key.removeprefix(MODEL_PREFIX)}/master"
    return Entry(master, entry.shape, entry.boxes) if stored.get(master) == entry.shape else entry


def _is_export(path: str) -> bool:
    return path.endswith(".safetensors") or os.path.isfile(os.path.join(path, EXPORT_FILE))


def load_export(path: str, model: nn.Module, field: str) -> None:
    """Weights from launch/export.py's consolidated safetensors file (or its directory)."""
    from safetensors import safe_open

    file = path if path.endswith(".safetensors") else os.path.join(path, EXPORT_FILE)
    entries = model_entries(model)
    with safe_open(file, framework="pt") as f:
        stored = {MODEL_PREFIX + k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 -- safe_open is not iterable
        check_shapes(path, entries, stored, field)
        with torch.no_grad():
            for entry in entries:
                if not entry.boxes:
                    continue
                full = f.get_tensor(entry.key.removeprefix(MODEL_PREFIX))
                for box in entry.boxes:
                    part = full
                    for dim, (offset, size) in enumerate(zip(box.offsets, box.sizes)):
                        part = part.narrow(dim, offset, size)
                    box.tensor.copy_(part)
