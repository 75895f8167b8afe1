"""Checkpoints: `run_dir/checkpoints/step_XXXXXX/`, written under a temporary name and renamed.

A directory named step_* therefore only exists once all of it is on disk. Resume picks the newest
one that loads; anything else (a half-copied directory, a corrupt file) is skipped with a warning
that names it.

Model-parallel runs write one state file per model shard (`state_tp01_pp00.pt`: the TP and PP
coordinates), each from the first DP x CP replica of that shard, into the same temporary
directory; the writer adds meta.json (step, layout, shard list) and renames once every shard is
on disk. A one-shard layout keeps the single `state.pt`. Loading needs the same tp and pp, and
under pipeline parallelism the same vpp and per-virtual-stage layer split: another layout is
refused with an error naming the checkpoint's settings (there is no resharding on load). A
meta.json without vpp and the split (older format) loads when tp and pp agree.

State files hold only tensors and Python primitives, so they load with `weights_only=True`: reading
a checkpoint never runs code from it.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from parallel_state.errors import ConfigError
from trainer.pipeline.orders import split_layers

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "state.pt"
META_FILE = "meta.json"
_STEP_DIR = re.compile(r"^step_(\d{6,})$")


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


class CheckpointLayoutError(ConfigError):
    """The checkpoint at `path` was written by a different model-parallel layout than the run loading
    it; `fix` names the checkpoint's settings to run with."""

    def __init__(self, path: str, problem: str, fix: str):
        super().__init__("trainer.resume", path, problem, fix)

    def __reduce__(self):  # pickles with its fields (e.g. back from a worker process)
        return (type(self), (self.value, self.problem, self.fix))


@dataclass(frozen=True)
class ShardLayout:
    """Which model shard this rank holds and whether it writes it (the first DP x CP replica does)."""

    tp_rank: int = 0
    tp: int = 1
    pp_rank: int = 0
    pp: int = 1
    writes: bool = True
    # MoE with experts spread over EP/ETP: every rank writes its own file (experts differ along
    # axes the dense shards do not); `world` ranks, this one `rank`. None: one file per (tp, pp).
    world: int | None = None
    rank: int = 0
    # Under pp > 1 the same tp/pp files hold other layers (and chunk keys) for another vpp or layer
    # split: parallel.vpp and the layer count of each virtual stage. 1 / None without a pipeline,
    # and None (unknown, not compared) for checkpoints written before they were recorded.
    vpp: int = 1
    stage_layers: tuple[int, ...] | None = None

    @staticmethod
    def of(ps: Any, experts_spread: bool = False, vpp: int = 1, num_layers: int | None = None,
           pipeline_layers: list[int] | None = None, sharded_optimizer: bool = False) -> ShardLayout:
        """This rank's layout from its ParallelState; `experts_spread` for a model with MoE layers;
        vpp, num_layers and pipeline_layers (parallel.*, model.num_layers) resolve the pipeline split."""
        per_rank = (experts_spread and ps.ep.size * ps.etp.size > 1) or sharded_optimizer
        pipelined = ps.pp.size > 1
        stage_layers = None
        if pipelined and num_layers is not None:
            stage_layers = tuple(len(ids) for ids in split_layers(num_layers, ps.pp.size, vpp, pipeline_layers))
        return ShardLayout(tp_rank=ps.tp.rank, tp=ps.tp.size, pp_rank=ps.pp.rank, pp=ps.pp.size,
                           writes=per_rank or ps.dp_cp.rank == 0, world=ps.world_size if per_rank else None,
                           rank=ps.rank, vpp=vpp if pipelined else 1, stage_layers=stage_layers)

    def file_name(self, tp_rank: int | None = None, pp_rank: int | None = None) -> str:
        if self.world is not None:
            return f"state_rank{self.rank:05d}.pt"
        if self.tp * self.pp == 1:
            return STATE_FILE
        tp_rank = self.tp_rank if tp_rank is None else tp_rank
        pp_rank = self.pp_rank if pp_rank is None else pp_rank
        return f"state_tp{tp_rank:02d}_pp{pp_rank:02d}.pt"

    def all_file_names(self) -> list[str]:
        if self.world is not None:
            return [f"state_rank{r:05d}.pt" for r in range(self.world)]
        return [self.file_name(t, p) for p in range(self.pp) for t in range(self.tp)]


SINGLE_SHARD = ShardLayout()


@dataclass
class LoadedCheckpoint:
    """A checkpoint that loaded completely."""

    path: str
    step: int
    state: dict[str, Any]


def save_checkpoint(run_dir: str, step: int, state: dict[str, Any], keep_last: int = 0,
                    layout: ShardLayout = SINGLE_SHARD, is_writer: bool = True,
                    barrier: Callable[[], None] = lambda: None) -> str:
    """Write checkpoint `step` atomically and prune to the newest `keep_last` (0 keeps all).

    Every rank of a model-parallel job calls this with its own `state` and `layout`; `barrier`
    synchronises them (the writer prepares the directory, shards are written, the writer commits).
    """
    root = os.path.join(run_dir, CHECKPOINT_DIR)
    final = os.path.join(root, step_dir_name(step))
    # Same name on every rank (they write into one directory); a leftover from a crash is wiped.
    tmp = os.path.join(root, f".tmp_{step_dir_name(step)}")
    if is_writer:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    if layout.writes:
        torch.save(state, os.path.join(tmp, layout.file_name()))
    barrier()
    if is_writer:
        stage_layers = list(layout.stage_layers) if layout.stage_layers is not None else None
        _commit(root, tmp, final, {"step": step, "format": "foldtron-shards-v1", "tp": layout.tp,
                                   "pp": layout.pp, "world": layout.world, "vpp": layout.vpp,
                                   "stage_layers": stage_layers, "shards": layout.all_file_names()})
        if keep_last > 0:
            for stale in list_checkpoints(run_dir)[:-keep_last]:
                shutil.rmtree(stale[1], ignore_errors=True)
    barrier()
    return final


def _commit(root: str, tmp: str, final: str, meta: dict[str, Any]) -> None:
    # meta.json last: its presence marks a directory whose state files were fully written.
    with open(os.path.join(tmp, META_FILE), "w") as f:
        json.dump(meta, f)
    _fsync_dir(tmp)
    if os.path.exists(final):
        # Re-saving the same step (e.g. the final save after an interval save) replaces it; move
        # the old one aside first so a crash in between never leaves neither.
        old = final + f".old_{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)


def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every step_* directory, oldest first (complete or not)."""
    root = os.path.join(run_dir, CHECKPOINT_DIR)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _STEP_DIR.match(name)
        if m and os.path.isdir(os.path.join(root, name)):
            found.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(found)


def load_checkpoint(path: str, layout: ShardLayout = SINGLE_SHARD) -> LoadedCheckpoint:
    """Load this rank's shard of one checkpoint directory.

    Raises ValueError if it is incomplete or unreadable, CheckpointLayoutError if it was written
    by another tp/pp layout.
    """
    meta_path = os.path.join(path, META_FILE)
    if not os.path.isfile(meta_path):
        raise ValueError(f"checkpoint {path} is incomplete (missing {META_FILE})")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except Exception as e:
        raise ValueError(f"checkpoint {path} is unreadable: {type(e).__name__}: {e}") from e
    saved = (int(meta.get("tp", 1)), int(meta.get("pp", 1)), meta.get("world"))
    if saved != (layout.tp, layout.pp, layout.world):
        per_rank = f" and one file per rank of {saved[2]}" if saved[2] is not None else ""
        raise CheckpointLayoutError(
            path, f"checkpoint {path} was saved with parallel.tp={saved[0]} parallel.pp={saved[1]}{per_rank}, but this "
            f"run has tp={layout.tp} pp={layout.pp}"
            + (f" on {layout.world} ranks with experts spread" if layout.world is not None else "")
            + " (resharding on load is not implemented yet)",
            f"run with the checkpoint's parallel.tp={saved[0]} parallel.pp={saved[1]}"
            + (f" on {saved[2]} ranks" if saved[2] is not None else "") + ", or a new trainer.run_dir")
    _check_pipeline_split(path, meta, layout)
    missing = [name for name in meta.get("shards", [STATE_FILE]) if not os.path.isfile(os.path.join(path, name))]
    if missing:
        raise ValueError(f"checkpoint {path} is incomplete (missing {', '.join(missing)})")
    try:
        state = torch.load(os.path.join(path, layout.file_name()), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message is a page of advice; the line naming what it refused is what matters
        # (an object that is not allowlisted, or an opcode of a file that is not a checkpoint).
        found = [line.strip() for line in str(e).splitlines() if "Unsupported" in line]
        detail = found[0].split(" Please use")[0] if found else type(e).__name__
        raise ValueError(f"checkpoint {path} is unreadable by torch.load(weights_only=True), which accepts "
                         f"only tensors and Python primitives: {detail}") from e
    except Exception as e:
        raise ValueError(f"checkpoint {path} is unreadable: {type(e).__name__}: {e}") from e
    return LoadedCheckpoint(path=path, step=int(meta["step"]), state=state)


def _check_pipeline_split(path: str, meta: dict[str, Any], layout: ShardLayout) -> None:
    """Same vpp and per-virtual-stage layer counts as the checkpoint; a value missing on either side
    (a checkpoint written before they were recorded) is unknown and not compared."""
    saved_vpp, saved_layers = meta.get("vpp"), meta.get("stage_layers")
    vpp_differs = saved_vpp is not None and int(saved_vpp) != layout.vpp
    layers_differ = (saved_layers is not None and layout.stage_layers is not None
                     and tuple(saved_layers) != layout.stage_layers)
    if not (vpp_differs or layers_differ):
        return

    def describe(vpp: Any, layers: Any) -> str:
        known = [f"parallel.vpp={vpp}"] if vpp is not None else []
        if layers is not None:
            known.append(f"parallel.pipeline_layers={_as_override(layers)}")
        return " ".join(known)

    saved = describe(saved_vpp, saved_layers)
    raise CheckpointLayoutError(
        path, f"checkpoint {path} was saved with {saved} (layers per virtual stage), but this run has "
        f"{describe(layout.vpp, layout.stage_layers)}; its pipeline chunks hold other layers "
        "(resharding on load is not implemented yet)",
        f"run with the checkpoint's {saved} (and its model.num_layers), or a new trainer.run_dir")


def _as_override(values: Any) -> str:
    """[2,1,1]: a list as a Hydra command-line value (no spaces, so it needs no quoting)."""
    return "[" + ",".join(str(int(v)) for v in values) + "]"


def find_latest_checkpoint(run_dir: str, layout: ShardLayout = SINGLE_SHARD) -> LoadedCheckpoint | None:
    """The newest checkpoint in run_dir that loads; incomplete or corrupt ones are skipped with a
    warning, one of another layout is an error."""
    for step, path in reversed(list_checkpoints(run_dir)):
        try:
            return load_checkpoint(path, layout)
        except CheckpointLayoutError:
            raise
        except ValueError as e:
            log.warning("skipping checkpoint %s: %s", path, e)
    return None


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
