"""Atomic checkpoints, keep-last pruning, skipping incomplete ones, and bitwise resume."""
from __future__ import annotations

import json
import os
import shutil

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


def test_trainer_checkpoint_loads_with_weights_only(tmp_path, tiny):
    """State files hold tensors and primitives only: torch.load(weights_only=True) reads them, and
    load_checkpoint uses it, so a pickled object in a state file is refused, never executed."""
    import torch

    from trainer.trainer import Trainer

    run = tmp_path / "run"
    trainer = Trainer(compose(tiny(run_dir=run, steps=3) + ["model.dropout=0.1"]))
    trainer.train()
    path = run / "checkpoints" / "step_000003"
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    assert state["step"] == 3 and isinstance(state["rng"]["torch"], torch.Tensor)
    assert all(isinstance(v, torch.Tensor) for v in state["rng"]["streams"].values())
    assert load_checkpoint(str(path)).state.keys() == trainer.state_dict().keys()

    save_checkpoint(str(tmp_path / "evil"), 1, {"x": _NotAllowlisted()})
    refused = r"unreadable by torch.load\(weights_only=True\).*Unsupported global.*_NotAllowlisted"
    with pytest.raises(ValueError, match=refused):
        load_checkpoint(str(tmp_path / "evil" / "checkpoints" / "step_000001"))


class _NotAllowlisted:
    """A picklable object torch.load(weights_only=True) must refuse."""


def _pipeline_layout(pp_rank: int, vpp: int, layers: tuple[int, ...] | None):
    from trainer.checkpoint import ShardLayout

    return ShardLayout(pp_rank=pp_rank, pp=2, vpp=vpp, stage_layers=layers)


def _save_pipeline_checkpoint(run_dir, vpp: int, layers: tuple[int, ...] | None) -> str:
    """Both pp shards of a pp=2 checkpoint, as the two ranks would write them."""
    path = save_checkpoint(str(run_dir), 4, {"x": 0}, layout=_pipeline_layout(0, vpp, layers))
    first, second = (os.path.join(path, _pipeline_layout(r, vpp, layers).file_name()) for r in (0, 1))
    shutil.copyfile(first, second)
    return path


def test_checkpoint_of_another_vpp_or_layer_split_is_refused_with_both_values(tmp_path):
    from trainer.checkpoint import CheckpointLayoutError

    path = _save_pipeline_checkpoint(tmp_path / "run", vpp=2, layers=(1, 1, 1, 1))
    meta = json.loads((tmp_path / "run" / "checkpoints" / "step_000004" / "meta.json").read_text())
    assert (meta["vpp"], meta["stage_layers"]) == (2, [1, 1, 1, 1])
    for rank in (0, 1):
        assert load_checkpoint(path, _pipeline_layout(rank, 2, (1, 1, 1, 1))).step == 4

    with pytest.raises(CheckpointLayoutError) as e:
        load_checkpoint(path, _pipeline_layout(0, 1, (2, 2)))
    assert "saved with parallel.vpp=2 parallel.pipeline_layers=[1,1,1,1]" in str(e.value)
    assert "this run has parallel.vpp=1 parallel.pipeline_layers=[2,2]" in str(e.value)
    assert e.value.fix.startswith("run with the checkpoint's parallel.vpp=2 parallel.pipeline_layers=[1,1,1,1]")
    assert "trainer.run_dir" in e.value.fix

    uneven = _save_pipeline_checkpoint(tmp_path / "uneven", vpp=1, layers=(3, 1))
    with pytest.raises(CheckpointLayoutError, match=r"pipeline_layers=\[3,1\].*this run has parallel.vpp=1 "
                                                    r"parallel.pipeline_layers=\[2,2\]") as e:
        find_latest_checkpoint(str(tmp_path / "uneven"), _pipeline_layout(1, 1, (2, 2)))
    assert "parallel.pipeline_layers=[3,1]" in e.value.fix
    assert load_checkpoint(uneven, _pipeline_layout(1, 1, (3, 1))).step == 4


def test_checkpoint_without_pipeline_metadata_loads_in_the_same_tp_pp(tmp_path):
    """Checkpoints from before vpp and the layer split were recorded: unknown, so not refused."""
    path = _save_pipeline_checkpoint(tmp_path / "run", vpp=2, layers=(1, 1, 1, 1))
    meta_path = os.path.join(path, "meta.json")
    with open(meta_path) as f:
        meta = json.load(f)
    del meta["vpp"], meta["stage_layers"]
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    assert load_checkpoint(path, _pipeline_layout(0, 1, (2, 2))).step == 4
    # A run that does not know its own split (layout built without it) compares vpp only.
    path = _save_pipeline_checkpoint(tmp_path / "new", vpp=2, layers=(1, 1, 1, 1))
    assert load_checkpoint(path, _pipeline_layout(0, 2, None)).step == 4


def test_shard_layout_resolves_the_pipeline_split():
    from types import SimpleNamespace

    from trainer.checkpoint import ShardLayout

    def ps(pp: int, pp_rank: int = 0):
        one = SimpleNamespace(size=1, rank=0)
        return SimpleNamespace(tp=one, pp=SimpleNamespace(size=pp, rank=pp_rank), ep=one, etp=one, dp_cp=one,
                               world_size=pp, rank=pp_rank)

    assert ShardLayout.of(ps(2), vpp=2, num_layers=8).stage_layers == (2, 2, 2, 2)
    assert ShardLayout.of(ps(2, 1), vpp=1, num_layers=5, pipeline_layers=[3, 2]).stage_layers == (3, 2)
    # Without a pipeline the model is one piece whatever parallel.vpp says.
    single = ShardLayout.of(ps(1), vpp=2, num_layers=8)
    assert (single.vpp, single.stage_layers) == (1, None)
