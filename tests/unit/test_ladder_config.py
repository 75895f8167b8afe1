"""Validation of the ladder-residual settings (model.residual, model.ladder_layers, model.ladder_restarts)."""
from __future__ import annotations

import pytest

from trainer.config import compose
from trainer.validation import ConfigError, validate


def _bad(overrides: list[str], world_size: int = 1) -> ConfigError:
    cfg = compose(overrides)
    with pytest.raises(ConfigError) as e:
        validate(cfg, world_size)
    return e.value


def test_ladder_quickstart_composes_and_validates():
    cfg = compose(["+experiment=ladder_quickstart"])
    assert cfg.model.residual == "ladder" and cfg.model.ladder_layers is None and cfg.trainer.max_steps == 200
    quickstart = compose(["+experiment=quickstart"])
    assert (cfg.model.hidden_size, cfg.model.num_layers, cfg.seed, cfg.data.seq_len) == (
        quickstart.model.hidden_size, quickstart.model.num_layers, quickstart.seed, quickstart.data.seq_len)
    validate(cfg)
    validate(compose(["model.residual=ladder", "model.ladder_layers=0"]))
    validate(compose(["model.residual=ladder", "model.num_layers=4", "model.ladder_layers=4"]))


def test_unknown_residual_names_the_choices():
    e = _bad(["model.residual=hyper"])
    assert e.field == "model.residual" and e.value == "hyper"
    assert "standard" in str(e) and "ladder" in str(e)


@pytest.mark.parametrize("count", [5, -1])
def test_ladder_layers_outside_the_layer_count(count):
    e = _bad(["model.residual=ladder", "model.num_layers=4", f"model.ladder_layers={count}"])
    assert e.field == "model.ladder_layers" and e.value == count
    assert "model.num_layers=4" in str(e) and "Fix:" in str(e)


def test_ladder_layers_without_the_ladder_residual():
    e = _bad(["model.num_layers=4", "model.ladder_layers=2"])
    assert e.field == "model.ladder_layers" and "model.residual=ladder" in e.fix


def test_restart_outside_the_model():
    e = _bad(["model.residual=ladder", "model.num_layers=4", "model.ladder_restarts=[4]"])
    assert e.field == "model.ladder_restarts" and "[4]" in str(e)


def test_ladder_with_dropout_is_refused():
    e = _bad(["model.residual=ladder", "model.dropout=0.1"])
    assert e.field == "model.dropout"


def test_pipeline_stage_inside_a_ladder_run_asks_for_a_restart():
    e = _bad(["model.residual=ladder", "model.num_layers=4", "parallel.pp=2"], world_size=2)
    assert e.field == "model.ladder_restarts" and "[2]" in e.fix
    validate(compose(["model.residual=ladder", "model.num_layers=4", "parallel.pp=2", "model.ladder_restarts=[2]"]), 2)
    # A ladder part inside the last stage needs no restart.
    validate(compose(["model.residual=ladder", "model.num_layers=4", "parallel.pp=2", "model.ladder_layers=2"]), 2)
