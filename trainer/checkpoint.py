"""Checkpoint directories: `run_dir/checkpoints/step_XXXXXX/`, written under a temporary name and renamed.

A save goes to `.tmp_step_XXXXXX/` (wiped first if a crashed save left it), every rank writes its
part there, and one rank then writes the marker `meta.json` and renames the directory. A directory
named step_* therefore only exists once all of it is on disk, and one without the marker (a copy
that stopped half-way) is never loaded: resume picks the newest complete one, and names every
incomplete or unreadable one it skips, leftover temporary directories included.

What is inside (global tensors written with torch.distributed.checkpoint) is trainer.checkpointer's
business; this module only knows directories, markers and pruning (keep the newest K).
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from parallel_state.errors import ConfigError

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
META_FILE = "meta.json"  # the marker: written last, into the temporary directory, before the rename
CONFIG_FILE = "config.yaml"  # the run's resolved config, beside the tensors
FORMAT = "foldtron-dcp-v1"
# One pickle per (tp, pp) shard, loadable only in the layout that wrote it; no longer read.
LEGACY_FORMAT = "foldtron-shards-v1"
_STEP_DIR = re.compile(r"^step_(\d{6,})$")
_TMP_DIR = re.compile(r"^\.tmp_step_(\d{6,})$")


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


class IncompleteCheckpointError(ValueError):
    """A checkpoint directory without its marker, or whose marker does not read: skipped by resume=auto."""


@dataclass(frozen=True)
class PendingSave:
    """A save in progress: every rank writes into `tmp`, the writer then commits it as `final`."""

    root: str
    tmp: str
    final: str
    step: int


def prepare_save(run_dir: str, step: int, is_writer: bool = True,
                 barrier: Callable[[], None] = lambda: None) -> PendingSave:
    """Create the (empty) temporary directory of checkpoint `step`; every rank calls it, `barrier`
    keeps the others from writing before the writer has wiped a crashed save's leftovers."""
    root = os.path.join(run_dir, CHECKPOINT_DIR)
    pending = PendingSave(root, os.path.join(root, f".tmp_{step_dir_name(step)}"),
                          os.path.join(root, step_dir_name(step)), step)
    if is_writer:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(pending.tmp, ignore_errors=True)
        os.makedirs(pending.tmp)
    barrier()
    return pending


def commit_save(pending: PendingSave, meta: dict[str, Any], keep_last: int = 0) -> str:
    """The writer, once every rank's part is on disk: write the marker, rename, prune to the newest
    `keep_last` complete checkpoints (0 keeps all). Returns the checkpoint's path."""
    with open(os.path.join(pending.tmp, META_FILE), "w") as f:
        json.dump({"step": pending.step, "format": FORMAT, **meta}, f)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(pending.tmp)
    if os.path.exists(pending.final):
        # Re-saving a step (e.g. a final save after an interval save) replaces it; the old one is
        # moved aside first and deleted only once the new one is in place.
        old = pending.final + f".old_{os.getpid()}"
        os.replace(pending.final, old)
        os.replace(pending.tmp, pending.final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(pending.tmp, pending.final)
    _fsync_dir(pending.root)
    if keep_last > 0:
        run_dir = os.path.dirname(pending.root)
        complete = [(s, p) for s, p in list_checkpoints(run_dir) if os.path.isfile(os.path.join(p, META_FILE))]
        for _, stale in complete[:-keep_last]:
            shutil.rmtree(stale, ignore_errors=True)
    return pending.final


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


def unfinished_saves(run_dir: str) -> list[str]:
    """Temporary directories of saves that never committed (the writer died during a save)."""
    root = os.path.join(run_dir, CHECKPOINT_DIR)
    if not os.path.isdir(root):
        return []
    return sorted(os.path.join(root, n) for n in os.listdir(root) if _TMP_DIR.match(n))


def read_meta(path: str, field: str = "trainer.resume") -> dict[str, Any]:
    """The marker of a checkpoint directory. IncompleteCheckpointError without it (or unreadable);
    a ConfigError for a checkpoint of the old per-layout format."""
    meta_path = os.path.join(path, META_FILE)
    if not os.path.isfile(meta_path):
        raise IncompleteCheckpointError(f"checkpoint {path} is incomplete (no {META_FILE}: its save did not finish)")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        int(meta["step"])
    except Exception as e:
        raise IncompleteCheckpointError(f"checkpoint {path} is unreadable ({META_FILE}: {type(e).__name__}: {e})") from e
    fmt = meta.get("format", LEGACY_FORMAT)
    if fmt != FORMAT:
        raise ConfigError(field, path, f"checkpoint {path} has the format {fmt!r} (one file per model shard, "
                          "written before checkpoints held global tensors); this version reads only "
                          f"{FORMAT!r}",
                          "resume it with the foldtron version that wrote it and save again, or start a new "
                          "trainer.run_dir")
    return meta


def find_latest_checkpoint(run_dir: str) -> tuple[str, dict[str, Any]] | None:
    """(path, marker) of the newest complete checkpoint in run_dir, or None. Incomplete ones and the
    temporary directories of unfinished saves are named in a warning and skipped."""
    for tmp in unfinished_saves(run_dir):
        log.warning("skipping %s: an unfinished save (the run stopped while writing it)", tmp)
    for _, path in reversed(list_checkpoints(run_dir)):
        try:
            return path, read_meta(path)
        except IncompleteCheckpointError as e:
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
