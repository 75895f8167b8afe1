"""An outer optimizer's checkpoint in one process (the multi-worker resume is in
tests/multirank/test_co2.py): the outer keys are written, and a resume that needs them from a
checkpoint without them fails with a clear error before anything is overwritten."""
from __future__ import annotations

import pytest

from parallel_state.errors import ConfigError
from trainer.checkpoint_dcp import read_metadata, stored_shapes
from trainer.config import compose
from trainer.trainer import Trainer

CO2 = ["optim.outer=co2", "optim.co2.tau=3", "optim.co2.penalty=gap"]


def test_a_co2_checkpoint_holds_the_outer_state(tmp_path, tiny):
    run = tmp_path / "run"
    Trainer(compose(tiny(run_dir=run, steps=4) + CO2 + ["trainer.save_interval=4"])).train()
    shapes = stored_shapes(read_metadata(str(run / "checkpoints" / "step_000004")))
    for what in ("outer_anchor", "outer_momentum", "outer_pending"):
        assert shapes[f"optim/embedding.weight/{what}"] == shapes["model/embedding.weight"], what
    assert not any(key.startswith("worker") for key in shapes)  # one worker: the usual keys


def test_resuming_co2_from_a_checkpoint_without_outer_state_names_the_fix(tmp_path, tiny):
    run = tmp_path / "run"
    Trainer(compose(tiny(run_dir=run, steps=4) + ["trainer.save_interval=2"])).train()
    with pytest.raises(ConfigError) as info:
        Trainer(compose(tiny(run_dir=run, steps=6) + CO2 + ["trainer.resume=auto"]))
    assert info.value.field == "trainer.resume"
    assert "outer_anchor" in str(info.value) and "optim.outer" in str(info.value)
