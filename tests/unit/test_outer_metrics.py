"""An outer optimizer's metrics reach metrics.jsonl: the outer round, the staleness, |Delta| and the
time spent waiting for the outer average (docs/co2.md, "Metrics")."""
from __future__ import annotations

import json
import os

import pytest

from optim.outer.metrics import outer_window_metrics
from trainer.config import compose
from trainer.trainer import Trainer


def test_window_keeps_the_last_round_and_averages_the_wait():
    window = [{"outer/round": 1.0, "outer/staleness": 1.0, "outer/wait_s": 0.0},
              {"outer/round": 2.0, "outer/staleness": 1.0, "outer/wait_s": 0.4, "outer/delta_norm": 3.0}]
    assert outer_window_metrics(window) == {"outer/round": 2.0, "outer/staleness": 1.0, "outer/delta_norm": 3.0,
                                            "outer/wait_s": 0.2}
    assert outer_window_metrics([{"loss": 1.0}]) == {}


def test_metrics_jsonl_carries_the_outer_figures(tmp_path, tiny):
    run = tmp_path / "run"
    Trainer(compose(tiny(run_dir=run, steps=6) + ["trainer.log_interval=2", "optim.outer=co2", "optim.co2.tau=2",
                                                    "trainer.save_final=false"])).train()
    with open(os.path.join(run, "metrics.jsonl")) as f:
        rows = [r for r in map(json.loads, f) if "loss" in r]
    assert [r["step"] for r in rows] == [2, 4, 6]
    assert [r["outer/round"] for r in rows] == [1, 2, 3]
    assert all(r["outer/staleness"] == 1 and r["outer/wait_s"] >= 0 for r in rows)
    assert "outer/delta_norm" not in rows[0]  # round 0's average is applied at the end of round 1
    assert rows[1]["outer/delta_norm"] > 0 and rows[2]["outer/penalty"] == pytest.approx(1.0)
