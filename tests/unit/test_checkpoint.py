"""Atomic checkpoints, keep-last pruning, skipping incomplete ones, and bitwise resume."""
from __future__ import annotations

import json
import os

import pytest

from trainer.checkpoint import find_latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from trainer.config import compose


def test_save_is_atomic_and_prunes(tmp_path):
    for step in (1, 2, 3, 4):
        save_checkpoint(str(tmp_path), step, {"x": step}, keep_last=2)
    assert [s for s, _ in list_checkpoints(str(tmp_path))] == [3, 4]
    assert not [n for n in os.listdir(tmp_path / "checkpoints") if n.startswith(".tmp")]
    assert load_checkpoint(str(tmp_path / "checkpoints" / "step_000004")).state == {"x": 4}


def test_resave_same_step_replaces(tmp_path):
    save_checkpoint(str(tmp_path), 5, {"x": 1})
    save_checkpoint(str(tmp_path), 5, {"x": 2})
    assert find_latest_checkpoint(str(tmp_path)).state == {"x": 2}


def test_incomplete_and_corrupt_checkpoints_are_skipped_with_a_warning(tmp_path, caplog):
    save_checkpoint(str(tmp_path), 1, {"x": 1})
    incomplete = tmp_path / "checkpoints" / "step_000003"
    incomplete.mkdir()  # e.g. a half-finished copy: no meta.json
    (incomplete / "state.pt").write_bytes(b"partial")
    corrupt = tmp_path / "checkpoints" / "step_000002"
    corrupt.mkdir()
    (corrupt / "state.pt").write_bytes(b"not a torch file")
    (corrupt / "meta.json").write_text(json.dumps({"step": 2}))
    with caplog.at_level("WARNING"):
        found = find_latest_checkpoint(str(tmp_path))
    assert found.step == 1
    assert "step_000003" in caplog.text and "step_000002" in caplog.text
    with pytest.raises(ValueError, match="incomplete"):
        load_checkpoint(str(incomplete))


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
