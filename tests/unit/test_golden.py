"""A short per-step loss curve kept in a file, so any change to the numerics is a visible, reviewed diff.

Regenerate deliberately with FOLDTRON_UPDATE_GOLDEN=1 and commit the new file with the change that
explains it. The tolerance absorbs CPU instruction-set and thread-count rounding, nothing more.
"""
from __future__ import annotations

import json
import os

import pytest

from trainer.config import compose
from trainer.trainer import Trainer

GOLDEN = os.path.join(os.path.dirname(os.path.dirname(__file__)), "golden", "tiny_losses.json")


def test_tiny_loss_curve_matches_golden(tmp_path, tiny):
    run = tmp_path / "run"
    Trainer(compose(tiny(run_dir=run, steps=12) + ["trainer.eval_interval=0", "trainer.save_final=false"])).train()
    with open(run / "metrics.jsonl") as f:
        losses = [json.loads(line)["loss"] for line in f if "loss" in json.loads(line)]
    if os.environ.get("FOLDTRON_UPDATE_GOLDEN"):
        with open(GOLDEN, "w") as f:
            json.dump({"losses": losses}, f, indent=1)
    with open(GOLDEN) as f:
        golden = json.load(f)["losses"]
    assert losses == pytest.approx(golden, rel=2e-4)
