"""Atomic checkpoint directories, keep-last pruning, skipping incomplete ones, and bitwise resume."""
from __future__ import annotations

import json
import os

import pytest

from trainer.checkpoint import (
    commit_save,
    find_latest_checkpoint,
    list_checkpoints,
    prepare_save,
    read_meta,
)
from trainer.config import compose


def _save(run_dir, step: int, payload: str, keep_last: int = 0) -> str:
    pending = prepare_save(str(run_dir), step)
    with open(os.path.join(pending.tmp, "payload.txt"), "w") as f:
        f.write(payload)
    return commit_save(pending, {}, keep_last)


def _payload(path: str) -> str:
    with open(os.path.join(path, "payload.txt")) as f:
        return f.read()


def test_save_is_atomic_and_prunes(tmp_path):
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, str(step), keep_last=2)
    assert [s for s, _ in list_checkpoints(str(tmp_path))] == [3, 4]
    assert not [n for n in os.listdir(tmp_path / "checkpoints") if n.startswith(".tmp")]
    path, meta = find_latest_checkpoint(str(tmp_path))
    assert meta["step"] == 4 and meta["format"] == "foldtron-dcp-v1" and _payload(path) == "4"


def test_resave_same_step_replaces(tmp_path):
    _save(tmp_path, 5, "a")
    _save(tmp_path, 5, "b")
    assert _payload(find_latest_checkpoint(str(tmp_path))[0]) == "b"


def test_incomplete_and_corrupt_checkpoints_are_skipped_with_a_warning(tmp_path, caplog):
    _save(tmp_path, 1, "1")
    incomplete = tmp_path / "checkpoints" / "step_000003"
    incomplete.mkdir()  # e.g. a half-finished copy: no meta.json
    (incomplete / "payload.txt").write_text("partial")
    corrupt = tmp_path / "checkpoints" / "step_000002"
    corrupt.mkdir()
    (corrupt / "meta.json").write_text("{not json")
    (tmp_path / "checkpoints" / ".tmp_step_000004").mkdir()  # a save that never committed
    with caplog.at_level("WARNING"):
        found = find_latest_checkpoint(str(tmp_path))
    assert found[1]["step"] == 1
    assert "step_000003" in caplog.text and "step_000002" in caplog.text and ".tmp_step_000004" in caplog.text
    with pytest.raises(ValueError, match="incomplete"):
        read_meta(str(incomplete))


def _losses(run_dir) -> list[float]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f if "loss" in json.loads(line)]


def test_resume_is_bitwise_identical(tmp_path, tiny):
    """20 steps straight == 10 steps, stop, resume=auto, 10 more (same loss sequence, bit for bit)."""
    from trainer.trainer import Trainer

    straight = tmp_path / "straight"
    Trainer(compose(tiny(run_dir=straight, steps=20) + ["trainer.save_final=false"])).train()

    split = tmp_path / "split"
    first = Trainer(compose(tiny(run_dir=split, steps=20) + ["trainer.save_interval=10"]))
    first.cfg.trainer.max_steps = 10  # stop early as a killed job would, after the step-10 save
    first.train()
    assert [s for s, _ in list_checkpoints(str(split))] == [10]
    Trainer(compose(tiny(run_dir=split, steps=20) + ["trainer.resume=auto", "trainer.save_final=false"])).train()

    a, b = _losses(straight), _losses(split)
    assert len(a) == 20 and len(b) == 20
    assert a == b  # exact float equality, not approx


def test_resume_from_explicit_path(tmp_path, tiny):
    from trainer.trainer import Trainer

    run = tmp_path / "run"
    Trainer(compose(tiny(run_dir=run, steps=4))).train()
    path = run / "checkpoints" / "step_000004"
    t = Trainer(compose(tiny(run_dir=tmp_path / "other", steps=6) + [f"trainer.resume={path}"]))
    assert t.step == 4


def test_resume_takes_the_optimizer_implementation_from_this_run(tmp_path, tiny):
    """The saved param groups carry fused/foreach; a resume with other optim flags uses the new ones."""
    from trainer.trainer import Trainer

    run = tmp_path / "run"
    Trainer(compose(tiny(run_dir=run, steps=3))).train()
    t = Trainer(compose(tiny(run_dir=run, steps=5) + ["trainer.resume=auto", "optim.fused=true"]))
    assert t.step == 3 and all(g["fused"] is True and g["foreach"] is None for g in t.optimizer.param_groups)
    t.train()


def test_fresh_run_refuses_a_run_dir_with_checkpoints(tmp_path, tiny):
    from trainer.trainer import Trainer
    from trainer.validation import ConfigError

    run = tmp_path / "run"
    Trainer(compose(tiny(run_dir=run, steps=3))).train()
    before = (run / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match="already holds checkpoints.*trainer.resume=auto"):
        Trainer(compose(tiny(run_dir=run, steps=3)))
    assert (run / "metrics.jsonl").read_text() == before  # nothing touched


def test_resume_drops_metrics_logged_after_the_checkpoint(tmp_path, tiny):
    from trainer.trainer import Trainer

    run = tmp_path / "run"
    first = Trainer(compose(tiny(run_dir=run, steps=8) + ["trainer.save_interval=4", "trainer.save_final=false"]))
    first.cfg.trainer.max_steps = 6  # logs steps 1..6, the newest checkpoint is step 4
    first.train()
    Trainer(compose(tiny(run_dir=run, steps=8) + ["trainer.resume=auto"])).train()
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [s for s in steps if s <= 8] == sorted(steps) and len(set(steps)) == len(steps)


def test_checkpoint_objects_load_with_weights_only(tmp_path):
    """Objects in a checkpoint (step counters, RNG states) are read with torch.load(weights_only=True):
    a pickled object that is not a tensor or primitive is refused, never executed."""
    from trainer.checkpoint_dcp import load_boxes, save_boxes

    save_boxes(str(tmp_path / "evil"), [], {"trainer": _NotAllowlisted()}, distributed=False)
    refused = r"'trainer' is unreadable by torch.load\(weights_only=True\).*Unsupported global.*_NotAllowlisted"
    with pytest.raises(ValueError, match=refused):
        load_boxes(str(tmp_path / "evil"), [], ["trainer"], distributed=False)


class _NotAllowlisted:
    """A picklable object torch.load(weights_only=True) must refuse."""


def test_checkpoint_of_the_old_per_layout_format_is_a_clear_error(tmp_path, tiny):
    from trainer.trainer import Trainer
    from trainer.validation import ConfigError

    old = tmp_path / "run" / "checkpoints" / "step_000004"
    old.mkdir(parents=True)
    (old / "meta.json").write_text(json.dumps({"step": 4, "format": "foldtron-shards-v1", "tp": 1, "pp": 1}))
    (old / "state.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match="format 'foldtron-shards-v1'.*Fix: resume it with the foldtron version"):
        Trainer(compose(tiny(run_dir=tmp_path / "run", steps=6) + ["trainer.resume=auto"]))
