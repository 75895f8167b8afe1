"""The worker axis of an outer optimizer (pure topology) and the `optim.outer` / `optim.co2.*` /
`optim.name=sgd` rules: bad input fails at validation with the field, the value and a fix."""
from __future__ import annotations

import copy

import pytest

from launch.topology import main as print_topology
from parallel_state.errors import ConfigError
from parallel_state.topology import GROUP_NAMES, Topology
from trainer.config import compose
from trainer.validation import validate


@pytest.mark.parametrize("kwargs", [{"tp": 2}, {"tp": 2, "pp": 2}, {"cp": 2, "ep": 2, "etp": 1},
                                    {"tp": 2, "ep": 2, "order": "tp-cp-ep-pp-dp"}])
def test_workers_are_blocks_of_contiguous_ranks_holding_the_whole_layout(kwargs):
    world, workers = 16, 2
    split, one = Topology(world, workers=workers, **kwargs), Topology(world // workers, **kwargs)
    block = world // workers
    assert split.dp == one.dp * workers and split.worker_dp == one.dp
    for w in range(workers):
        for r in range(block):
            c, ref = split.coords(w * block + r), one.coords(r)
            assert c.worker == w
            assert (c.tp, c.cp, c.dp, c.pp, c.etp, c.ep, c.edp) == (ref.tp, ref.cp, ref.dp, ref.pp, ref.etp, ref.ep, ref.edp)
            assert split.data_rank(w * block + r) == w * one.dp + ref.dp
    for name in GROUP_NAMES:  # every group of a worker is the one-worker layout's, shifted by its block
        expected = [[w * block + r for r in g] for w in range(workers) for g in one.groups(name)]
        assert sorted(split.groups(name)) == sorted(expected), name
    assert split.groups("worker") == [list(range(w * block, (w + 1) * block)) for w in range(workers)]
    assert split.groups("outer") == [[r, r + block] for r in range(block)]


def test_one_worker_changes_nothing():
    t = Topology(8, tp=2, pp=2)
    assert t.with_workers(1) is t and t.workers == 1 and t.worker_dp == t.dp
    assert "worker" not in t.dense.names and "workers" not in repr(t)
    assert t.groups("worker") == [list(range(8))] and t.groups("outer") == [[r] for r in range(8)]
    assert all(t.data_rank(r) == t.coords(r).dp for r in range(8))


def test_topology_printout_shows_the_workers(capsys):
    assert print_topology(["--world", "8", "--tp", "2", "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "workers=2" in out and "worker=2 (stride 4)" in out
    assert "outer" in out and "[0, 4] [1, 5] [2, 6] [3, 7]" in out


@pytest.fixture(scope="module")
def base():
    """One composed config (composing is the slow part); each case sets its fields on a copy."""
    return compose(["data.micro_batch_size=1"])


def _with(cfg, fields: dict):
    cfg = copy.deepcopy(cfg)
    for path, value in fields.items():
        *parents, leaf = path.split(".")
        node = cfg
        for name in parents:
            node = getattr(node, name)
        setattr(node, leaf, value)
    return cfg


@pytest.mark.parametrize("fields, world, field, mentions", [
    ({"optim.outer": "co2", "optim.co2.workers": 3}, 4, "optim.co2.workers", ["dp", "[1, 2, 4]"]),
    ({"optim.outer": "co2", "optim.co2.workers": 2, "parallel.tp": 2}, 2, "optim.co2.workers", ["dp", "= 1"]),
    ({"optim.outer": "co2", "optim.co2.workers": 4, "parallel.ep": 2, "model.channel_mixers": ["moe"]}, 4,
     "optim.co2.workers", ["expert grid", "[1, 2]"]),
    ({"optim.outer": "co2", "optim.co2.tau": 0}, 1, "optim.co2.tau", [">= 1"]),
    ({"optim.outer": "diloco", "optim.co2.penalty": "gap"}, 1, "optim.co2.penalty", ["optim.outer=co2"]),
    ({"optim.outer": "co2", "optim.co2.penalty": "fancy"}, 1, "optim.co2.penalty", ["constant", "gap"]),
    ({"optim.outer": "co2", "optim.co2.beta": 1.0}, 1, "optim.co2.beta", ["[0, 1)"]),
    ({"optim.outer": "co2", "optim.co2.clip": -1.0}, 1, "optim.co2.clip", [">= 0"]),
    ({"optim.outer": "co2", "optim.co2.alpha": 0.0}, 1, "optim.co2.alpha", []),
    ({"optim.outer": "async"}, 1, "optim.outer", ["localsgd", "diloco", "co2"]),
    ({"optim.outer": "co2", "optim.backend": "deepspeed"}, 1, "optim.outer", ["DeepSpeed", "optim.backend=native"]),
    ({"optim.co2.workers": 2}, 2, "optim.co2.workers", ["optim.outer=none"]),
    ({"optim.name": "sgd", "optim.distributed": True}, 1, "optim.name", ["optim.distributed=false"]),
    ({"optim.nesterov": True}, 1, "optim.nesterov", ["optim.momentum"]),
    ({"optim.name": "sgd", "optim.momentum": 1.0}, 1, "optim.momentum", ["[0, 1)"]),
])
def test_bad_outer_input_names_field_value_and_fix(base, fields, world, field, mentions):
    with pytest.raises(ConfigError) as info:
        validate(_with(base, fields), world)
    assert info.value.field == field
    for text in mentions:
        assert text in str(info.value), (text, str(info.value))


def test_validation_returns_the_split_layout(base):
    topology = validate(_with(base, {"optim.outer": "co2", "optim.co2.workers": 2}), 4)
    assert topology.workers == 2 and topology.worker_dp == 2 and topology.dp == 4
    assert validate(base, 4).workers == 1
