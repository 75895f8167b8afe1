"""The pure rank layout: Megatron-Core's published layouts, properties over random configs, errors."""
from __future__ import annotations

import itertools
import random

import pytest

from parallel_state.config import ParallelConfig
from parallel_state.errors import ConfigError
from parallel_state.rng import STREAM_AXES, stream_seed
from parallel_state.topology import GROUP_NAMES, STANDARD_ORDERS, Topology, divisors


def blocks(start: int, stop: int, size: int) -> list[list[int]]:
    return [list(range(i, i + size)) for i in range(start, stop, size)]


# ---------------------------------------------------------------------------------------------
# Four reference layouts (docs/loss_and_layout.md, "Rank layout"), checked against Megatron-Core's
# RankGenerator by hand.

def test_world8_tp2_pp2():
    t = Topology(8, tp=2, pp=2)
    assert t.dp == 2
    assert t.groups("tp") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert t.groups("dp") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert t.groups("pp") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert t.groups("mp") == [[0, 1, 4, 5], [2, 3, 6, 7]]
    assert t.groups("embedding") == [[0, 4], [1, 5], [2, 6], [3, 7]]


def test_world16_tp2_cp2_pp2_ep4_etp1():
    t = Topology(16, tp=2, cp=2, pp=2, ep=4, etp=1)
    assert (t.dp, t.edp) == (2, 2)
    assert t.groups("tp") == blocks(0, 16, 2)
    assert t.groups("cp") == [[0, 2], [1, 3], [4, 6], [5, 7], [8, 10], [9, 11], [12, 14], [13, 15]]
    assert t.groups("dp") == [[0, 4], [1, 5], [2, 6], [3, 7], [8, 12], [9, 13], [10, 14], [11, 15]]
    assert t.groups("dp_cp") == [[0, 2, 4, 6], [1, 3, 5, 7], [8, 10, 12, 14], [9, 11, 13, 15]]
    assert t.groups("pp") == [[r, r + 8] for r in range(8)]
    assert t.groups("ep") == blocks(0, 16, 4)
    assert t.groups("etp") == [[r] for r in range(16)]
    assert t.groups("edp") == [[0, 4], [1, 5], [2, 6], [3, 7], [8, 12], [9, 13], [10, 14], [11, 15]]
    assert t.groups("tp_dp_cp") == blocks(0, 16, 8)
    assert t.groups("etp_ep_pp") == [[0, 1, 2, 3, 8, 9, 10, 11], [4, 5, 6, 7, 12, 13, 14, 15]]


def test_world8_expert_parallel_wider_than_dp():
    t = Topology(8, tp=2, ep=8, etp=1)
    assert (t.dp, t.edp) == (4, 1)
    assert t.groups("ep") == [list(range(8))]
    assert t.groups("edp") == [[r] for r in range(8)]
    assert t.groups("dp") == [[0, 2, 4, 6], [1, 3, 5, 7]]


def test_world8_tp2_pp2_pipeline_before_data():
    t = Topology(8, tp=2, pp=2, order="tp-cp-ep-pp-dp")
    assert t.groups("pp") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert t.groups("dp") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert t.groups("tp") == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_etp_defaults_to_tp_and_coords():
    t = Topology(16, tp=2, cp=2, pp=2, ep=4, etp=1)
    c = t.coords(13)  # dense: 13 = tp 1 + cp 0*2 + dp 1*4 + pp 1*8; expert: 13 = ep 1*1 + edp 1*4 + pp 1*8
    assert (c.tp, c.cp, c.dp, c.pp) == (1, 0, 1, 1)
    assert (c.etp, c.ep, c.edp) == (0, 1, 1)
    assert Topology(8, tp=4, ep=2).etp == 4


def test_from_config():
    t = Topology.from_config(ParallelConfig(tp=2, cp=2, pp=2, ep=4, etp=1), world_size=16)
    assert (t.tp, t.cp, t.dp, t.pp, t.ep, t.etp, t.edp) == (2, 2, 2, 2, 4, 1, 2)
    assert t == Topology(16, tp=2, cp=2, pp=2, ep=4, etp=1) != Topology(16, tp=2, cp=2, pp=2, ep=4)
    with pytest.raises(ConfigError, match="parallel.dp=3"):
        Topology.from_config(ParallelConfig(tp=2, dp=3), world_size=8)


def test_experts_of():
    t = Topology(8, tp=2, ep=4, etp=1)
    # ep rank = (rank // 1) % 4 with etp 1 fastest: ranks 0..3 hold expert blocks 0..3.
    assert [list(t.experts_of(r, 8)) for r in range(4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert list(t.experts_of(5, 8)) == [2, 3]
    with pytest.raises(ConfigError, match="num_experts"):
        t.experts_of(0, 6)


# ---------------------------------------------------------------------------------------------
# Properties over random valid configs, against an independent reference: enumerate every
# coordinate tuple, compute the rank by the formula of docs/loss_and_layout.md and group by the other axes.

def reference_layout(world, tp, cp, pp, ep, etp, order):
    """rank -> dense coords and rank -> expert coords from rank = sum coord_i * prod_{j<i} size_j."""
    dp, edp = world // (tp * cp * pp), world // (etp * ep * pp)
    sizes = {"dense": {"tp": tp, "cp": cp, "ep": 1, "dp": dp, "pp": pp},
             "expert": {"tp": etp, "cp": 1, "ep": ep, "dp": edp, "pp": pp}}
    axes = order.split("-")
    layouts = {}
    for grid, size in sizes.items():
        table = {}
        for combo in itertools.product(*[range(size[a]) for a in axes]):
            rank, stride = 0, 1
            for a, c in zip(axes, combo):
                rank += c * stride
                stride *= size[a]
            table[rank] = dict(zip(axes, combo))
        layouts[grid] = table
    return layouts


REFERENCE_AXES = {  # group name -> (grid, reference axis names it spans)
    "tp": ("dense", {"tp"}), "cp": ("dense", {"cp"}), "dp": ("dense", {"dp"}), "pp": ("dense", {"pp"}),
    "dp_cp": ("dense", {"dp", "cp"}), "tp_cp": ("dense", {"tp", "cp"}),
    "tp_dp_cp": ("dense", {"tp", "dp", "cp"}), "mp": ("dense", {"tp", "pp"}),
    "ep": ("expert", {"ep"}), "etp": ("expert", {"tp"}), "edp": ("expert", {"dp"}),
    "etp_ep": ("expert", {"tp", "ep"}), "etp_ep_pp": ("expert", {"tp", "ep", "pp"}),
}


def random_configs(n: int, seed: int = 0):
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        world = rng.choice([1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64])
        pp = rng.choice(divisors(world))
        cp = rng.choice(divisors(world // pp))
        tp = rng.choice(divisors(world // (pp * cp)))
        etp = rng.choice(divisors(world // pp))
        ep = rng.choice(divisors(world // (pp * etp)))
        order = rng.choice(STANDARD_ORDERS)
        if order == "tp-cp-ep-pp-dp" and tp * cp != etp * ep and pp > 1:
            continue  # expert PP groups would differ; covered by test_errors
        out.append((world, tp, cp, pp, ep, etp, order))
    return out


@pytest.mark.parametrize("config", random_configs(60))
def test_groups_match_reference(config):
    world, tp, cp, pp, ep, etp, order = config
    t = Topology(world, tp=tp, cp=cp, pp=pp, ep=ep, etp=etp, order=order)
    ref = reference_layout(*config)
    for name, (grid, spanned) in REFERENCE_AXES.items():
        groups = t.groups(name)
        # Every rank in exactly one group.
        assert sorted(r for g in groups for r in g) == list(range(world)), name
        # The same partition as the reference: ranks agreeing on every axis outside the group.
        by_key = {}
        for r, c in ref[grid].items():
            by_key.setdefault(tuple(v for a, v in sorted(c.items()) if a not in spanned), set()).add(r)
        assert sorted(map(sorted, by_key.values())) == sorted(groups), name
        sizes = {"tp": tp, "cp": cp, "dp": t.dp, "pp": pp} if grid == "dense" else \
            {"tp": etp, "ep": ep, "dp": t.edp, "pp": pp}
        expected_size = 1
        for a in spanned:
            expected_size *= sizes[a]
        assert {len(g) for g in groups} == {expected_size}, name
    assert t.groups("pp") == t.expert.groups(("pp",))
    for r in range(world):
        c = t.coords(r)
        d, e = ref["dense"][r], ref["expert"][r]
        assert (c.tp, c.cp, c.dp, c.pp) == (d["tp"], d["cp"], d["dp"], d["pp"])
        assert (c.etp, c.ep, c.edp, c.pp) == (e["tp"], e["ep"], e["dp"], e["pp"])
        assert t.dense_rank(tp=c.tp, cp=c.cp, dp=c.dp, pp=c.pp) == r
        assert t.expert_rank(etp=c.etp, ep=c.ep, edp=c.edp, pp=c.pp) == r
        emb = t.group_of("embedding", r)
        on_end_stage = c.pp in (0, pp - 1)
        assert (emb is not None) == on_end_stage
        if emb is not None:
            assert r in emb and len(emb) == (1 if pp == 1 else 2)


def test_every_group_name_answers():
    t = Topology(16, tp=2, cp=2, pp=2, ep=4, etp=1)
    for name in GROUP_NAMES:
        assert t.groups(name)
    with pytest.raises(KeyError, match="unknown group"):
        t.groups("xp")


# ---------------------------------------------------------------------------------------------
# Errors before anything starts: the field, the sizes and valid values.

@pytest.mark.parametrize("kwargs, field, mentions", [
    ({"world_size": 8, "tp": 3}, "parallel.tp=3", ["[1, 2, 4, 8]"]),
    ({"world_size": 12, "pp": 5}, "parallel.pp=5", ["12", "[1, 2, 3, 4, 6, 12]"]),
    ({"world_size": 8, "cp": 3}, "parallel.cp=3", ["[1, 2, 4, 8]"]),
    ({"world_size": 8, "tp": 2, "ep": 8}, "parallel.ep=8", ["ep * etp = 8 * 2", "[1, 2, 4]"]),
    ({"world_size": 8, "tp": 2, "pp": 2, "ep": 3, "etp": 1}, "parallel.ep=3", ["[1, 2, 4]"]),
    ({"world_size": 8, "etp": 3}, "parallel.etp=3", ["[1, 2, 4, 8]"]),
    ({"world_size": 8, "tp": 0}, "parallel.tp=0", ["positive"]),
    ({"world_size": 8, "order": "tp-cp-xp-dp-pp"}, "parallel.order", ["'xp'", "tp-cp-ep-dp-pp"]),
    ({"world_size": 8, "order": "tp-cp-tp-dp-pp"}, "parallel.order", ["'tp' appears more than once"]),
    ({"world_size": 8, "order": "tp-cp-ep-dp"}, "parallel.order", ["'pp' is missing"]),
    ({"world_size": 8, "tp": 2, "pp": 2, "ep": 4, "etp": 1, "order": "tp-cp-ep-pp-dp"}, "parallel.order",
     ["pipeline groups", "[0, 4]", "[0, 2]", "etp * ep = 4", "tp * cp = 2"]),
])
def test_errors(kwargs, field, mentions):
    with pytest.raises(ConfigError) as info:
        Topology(**kwargs)
    message = str(info.value)
    assert message.startswith(field), message
    assert "Fix:" in message
    for m in mentions:
        assert m in message, (m, message)


def test_suggested_values_are_valid():
    with pytest.raises(ConfigError) as info:
        Topology(24, tp=5, cp=2)
    suggested = [int(v) for v in str(info.value).split("use one of [")[1].split("]")[0].split(",")]
    for tp in suggested:
        Topology(24, tp=tp, cp=2)


# ---------------------------------------------------------------------------------------------
# Random streams as a pure function of coordinates: shared where the weights are replicated.

@pytest.mark.parametrize("config", random_configs(12, seed=1))
def test_stream_seeds_follow_replication(config):
    world, tp, cp, pp, ep, etp, order = config
    t = Topology(world, tp=tp, cp=cp, pp=pp, ep=ep, etp=etp, order=order)
    seeds = {name: [stream_seed(1234, name, t.coords(r)) for r in range(world)] for name in STREAM_AXES}

    def shares_stream_exactly_within(name, replica_groups):
        group_index = {r: i for i, g in enumerate(t.groups(replica_groups)) for r in g}
        for a in range(world):
            for b in range(world):
                assert (seeds[name][a] == seeds[name][b]) == (group_index[a] == group_index[b]), (name, a, b)

    shares_stream_exactly_within("tp-replicated", "tp_dp_cp")  # one stream per pipeline stage
    shares_stream_exactly_within("tp-sharded", "dp_cp")  # a TP shard's replicas are its DP x CP group
    shares_stream_exactly_within("expert", "edp")  # an expert shard's replicas are its EDP group
    assert stream_seed(1234, "tp-sharded", t.coords(0)) != stream_seed(1235, "tp-sharded", t.coords(0))


# ---------------------------------------------------------------------------------------------
# The printer (launch/topology.py is a script, not a package: load it from its path).

def load_printer():
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "..", "launch", "topology.py")
    spec = importlib.util.spec_from_file_location("foldtron_topology_printer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_printer_shows_coords_experts_and_groups(capsys):
    printer = load_printer()
    assert printer.main(["--world", "16", "--tp", "2", "--cp", "2", "--pp", "2", "--ep", "4", "--etp", "1",
                         "--num-experts", "8"]) == 0
    out = capsys.readouterr().out
    # rank 13: dense (tp 1, cp 0, dp 1, pp 1), expert (etp 0, ep 1, edp 1), experts 2-3
    assert "   13 |   1   0   1   1 |   0   1   1 | 2-3" in out
    assert "[0, 1, 2, 3] [4, 5, 6, 7] [8, 9, 10, 11] [12, 13, 14, 15]" in out  # EP
    assert "[0, 4] [1, 5] [2, 6] [3, 7] [8, 12] [9, 13] [10, 14] [11, 15]" in out  # DP and EDP
    assert printer.main(["--world", "8", "--tp", "3"]) == 2
    assert "parallel.tp=3" in capsys.readouterr().err


def test_printer_reads_a_training_config(capsys):
    printer = load_printer()
    assert printer.main(["--world", "4", "+experiment=quickstart", "parallel.tp=2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Topology(world_size=4, tp=2, cp=1, dp=2, pp=1, ep=1, etp=2, edp=2")
