"""Checkpoints: `run_dir/checkpoints/step_XXXXXX/`, written under a temporary name and renamed.

A directory named step_* therefore only exists once all of it is on disk. Resume picks the newest
one that loads; anything else (a half-copied directory, a corrupt file) is skipped with a warning
that names it. This is the one-process format; the sharded format replaces `state.pt` later.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "state.pt"
META_FILE = "meta.json"
_STEP_DIR = re.compile(r"^step_(\d{6,})$")


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


@dataclass
class LoadedCheckpoint:
    """A checkpoint that loaded completely."""

    path: str
    step: int
    state: dict[str, Any]


def save_checkpoint(run_dir: str, step: int, state: dict[str, Any], keep_last: int = 0) -> str:
    """Write `state` as checkpoint `step` atomically and prune to the newest `keep_last` (0 keeps all)."""
    root = os.path.join(run_dir, CHECKPOINT_DIR)
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, step_dir_name(step))
    tmp = os.path.join(root, f".tmp_{step_dir_name(step)}_{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    torch.save(state, os.path.join(tmp, STATE_FILE))
    # meta.json last: its presence marks a directory whose state file was fully written.
    with open(os.path.join(tmp, META_FILE), "w") as f:
        json.dump({"step": step, "format": "foldtron-single-v1"}, f)
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
    if keep_last > 0:
        for stale in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(stale[1], ignore_errors=True)
    return final


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


def load_checkpoint(path: str) -> LoadedCheckpoint:
    """Load one checkpoint directory; raises ValueError if it is incomplete or unreadable."""
    meta_path, state_path = os.path.join(path, META_FILE), os.path.join(path, STATE_FILE)
    if not os.path.isfile(meta_path) or not os.path.isfile(state_path):
        raise ValueError(f"checkpoint {path} is incomplete (missing {META_FILE} or {STATE_FILE})")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        state = torch.load(state_path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ValueError(f"checkpoint {path} is unreadable: {type(e).__name__}: {e}") from e
    return LoadedCheckpoint(path=path, step=int(meta["step"]), state=state)


def find_latest_checkpoint(run_dir: str) -> LoadedCheckpoint | None:
    """The newest checkpoint in run_dir that loads; incomplete or corrupt ones are skipped with a warning."""
    for step, path in reversed(list_checkpoints(run_dir)):
        try:
            return load_checkpoint(path)
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
