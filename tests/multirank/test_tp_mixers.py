"""Tensor-parallel GLA, ParaGRU and ParaLSTM token mixers against the one-process mixer.

Each mixer is built on meta with a TPContext over tp real gloo ranks (with and without sequence
parallelism), materialised from the seed of the reference, and run forward and backward on the
reference's input (under SP each rank gets its sequence chunk). Checked: every rank's init is its
exact slice of the one-process weights, outputs and input gradients equal the reference, gathered
parameter gradients equal the reference after the TP grad sync, replicas agree, the layer sends
exactly one collective each way (nothing inside the recurrence), and FLOPs describe the full layer.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist

from models.check import check
from models.config import GLAConfig, ModelConfig, ParaRNNConfig
from models.init import materialize
from models.layers.gla import GatedLinearAttention
from models.layers.pararnn import ParaGRUMixer, ParaLSTMMixer
from models.layers.tensor_parallel import TPContext
from models.parallel_context import ParallelContext
from optim.step import allreduce_tp_partial_grads
from parallel_state import ConfigError, ParallelConfig
from parallel_state.groups import AxisGroup, init
from parallel_state.params import param_meta, tp_partial_grad_params
from parallel_state.topology import Topology

pytestmark = pytest.mark.xdist_group("rank_pool")

SEED = 13
B, T, HIDDEN = 2, 16, 32
FP32 = 4
MIXERS = {"gla": GatedLinearAttention, "gru": ParaGRUMixer, "lstm": ParaLSTMMixer}
MIXER_NAMES = {"gla": "gla", "gru": "pararnn_gru", "lstm": "pararnn_lstm"}


def mixer_cfg(mode: str = "parallel", **overrides) -> ModelConfig:
    """4 GLA heads (1 per rank at tp 4); a ParaRNN state of 24 channels (not hidden; 6 per rank at tp 4).

    ParaRNN runs a fixed number of Newton updates, so a rank does exactly the reference's arithmetic
    on its channels (an adaptive tolerance would let ranks stop at different iterations).
    """
    gla = GLAConfig(num_heads=overrides.pop("gla_heads", 4))
    pararnn = ParaRNNConfig(state_size=overrides.pop("state_size", 24), newton_iterations=6, mode=mode)
    base = {"vocab_size": 32, "hidden_size": HIDDEN, "num_layers": 2, "num_heads": 4}
    return ModelConfig(**{**base, "gla": gla, "pararnn": pararnn, **overrides})


def mixer_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(17)
    return torch.randn(B, T, HIDDEN, generator=g), torch.randn(B, T, HIDDEN, generator=g)


def build(kind: str, mode: str, tp: TPContext | None) -> torch.nn.Module:
    with torch.device("meta"):
        mixer = MIXERS[kind](mixer_cfg(mode), ParallelContext(tp=tp or TPContext()))
    return materialize(mixer, SEED)


def run_mixer(mixer: torch.nn.Module, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_()
    out = mixer(x)
    out.backward(g)
    return out.detach(), x.grad


def mixer_on_rank(kind: str, sp: bool, mode: str) -> dict:
    """Init, forward, backward and TP grad sync of the TP mixer on this rank; what the test compares."""
    n = dist.get_world_size()
    ps = init(Topology(n, tp=n))
    stats = ps.stats  # the groups' own counters
    stats.reset()
    mixer = build(kind, mode, TPContext(ps.tp, sp))
    init_params = {name: p.detach().clone() for name, p in mixer.named_parameters()}
    x, g = mixer_inputs()
    if sp:
        x, g = x.chunk(n, 1)[ps.tp.rank], g.chunk(n, 1)[ps.tp.rank]
    x = x.requires_grad_()
    out = mixer(x)
    forward_bytes = dict(stats.bytes_sent)
    stats.reset()
    out.backward(g)
    backward_bytes = dict(stats.bytes_sent)
    allreduce_tp_partial_grads(mixer.parameters(), ps.tp)
    ps.destroy()
    return {"init": init_params, "out": out.detach(), "x_grad": x.grad,
            "grads": {name: p.grad.clone() for name, p in mixer.named_parameters()},
            "shards": {name: param_meta(p).shard for name, p in mixer.named_parameters()},
            "synced": [name for name, p in mixer.named_parameters() if tp_partial_grad_params([p])],
            "buffers": {name: b.clone() for name, b in mixer.named_buffers()},
            "forward": forward_bytes, "backward": backward_bytes, "flops": mixer.flops_per_token(T)}


def gather(results: list[dict], key: str, name: str) -> torch.Tensor:
    """The full tensor from every rank's slice, or rank 0's copy of a replicated one."""
    shard = results[0]["shards"][name]
    if shard is None:
        return results[0][key][name]
    dim = shard[0]
    assert [r["shards"][name] for r in results] == [(dim, i, len(results)) for i in range(len(results))], name
    return torch.cat([r[key][name] for r in results], dim)


CASES = [(kind, n, "parallel") for kind in MIXERS for n in (2, 4)]
CASES += [("gru", 2, "sequential"), ("lstm", 4, "sequential")]


@pytest.mark.parametrize("kind,n,mode", CASES, ids=[f"{k}-tp{n}-{m}" for k, n, m in CASES])
@pytest.mark.parametrize("sp", [False, True], ids=["nosp", "sp"])
def test_tp_mixer_matches_one_process(rank_pools, kind, n, mode, sp):
    results = rank_pools.get(n).run(mixer_on_rank, kind, sp, mode)
    ref = build(kind, mode, None)
    ref_init = {name: p.detach().clone() for name, p in ref.named_parameters()}
    x, g = mixer_inputs()
    ref_out, ref_x_grad = run_mixer(ref, x, g)
    ref_grads = {name: p.grad for name, p in ref.named_parameters()}

    assert set(results[0]["grads"]) == set(ref_grads)  # same names as the one-process mixer
    for name, ref_grad in ref_grads.items():
        torch.testing.assert_close(gather(results, "init", name), ref_init[name], rtol=0, atol=0, msg=name)
        torch.testing.assert_close(gather(results, "grads", name), ref_grad, rtol=1e-5, atol=1e-6,
                                   msg=f"grad of {name}")
        if results[0]["shards"][name] is None:  # replicas stay identical after the TP grad sync
            assert all(torch.equal(r["grads"][name], results[0]["grads"][name]) for r in results), name
    for name, ref_buffer in ref.named_buffers():  # ParaRNN's first-gate offset: this rank's channels
        shards = torch.cat([r["buffers"][name] for r in results])
        torch.testing.assert_close(shards, ref_buffer, rtol=0, atol=0, msg=name)

    outs = [r["out"] for r in results]
    x_grads = [r["x_grad"] for r in results]
    if sp:
        outs, x_grads = [torch.cat(outs, 1)], [torch.cat(x_grads, 1)]
    for out, x_grad in zip(outs, x_grads):
        torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(x_grad, ref_x_grad, rtol=1e-5, atol=1e-6)

    # One collective into the TP region and one out, each way: nothing inside the recurrence.
    full, ring = B * T * HIDDEN * FP32, (n - 1) / n
    if sp:
        expected = {("all_gather", "tp"): ring * full, ("reduce_scatter", "tp"): ring * full}
    else:
        expected = {("all_reduce", "tp"): 2 * ring * full}
    for r in results:
        assert r["forward"] == pytest.approx(expected)
        assert r["backward"] == pytest.approx(expected)
        # Only GLA's replicated low-rank gate input needs its grad summed over TP.
        assert r["synced"] == (["gk_proj.0.weight"] if kind == "gla" else [])
        assert r["flops"] == ref.flops_per_token(T)  # the full layer's, for MFU


# ---- single process: shapes of a rank's shard and the size errors ---------------------------------


def fake_tp(size: int, rank: int = 0) -> TPContext:
    """A TPContext of `size` ranks for building on meta without processes (never runs a collective)."""
    return TPContext(AxisGroup(name="tp", group=None, ranks=tuple(range(size)), rank=rank))


def test_shard_shapes_and_markers():
    with torch.device("meta"):
        gla = GatedLinearAttention(mixer_cfg(), ParallelContext(tp=fake_tp(4, 3)))
        lstm = ParaLSTMMixer(mixer_cfg(), ParallelContext(tp=fake_tp(4, 3)))
    assert (gla.num_heads, gla.heads_per_rank) == (4, 1)
    assert gla.q_proj.weight.shape == (4, HIDDEN) and gla.o_proj.weight.shape == (HIDDEN, 8)
    assert gla.g_norm_weight.shape == (1, 8) and param_meta(gla.g_norm_weight).shard == (0, 3, 4)
    assert gla.gk_proj[0].weight.shape == (16, HIDDEN) and param_meta(gla.gk_proj[0].weight).tp_partial_grad
    assert param_meta(gla.gk_proj[1].bias).shard == (0, 3, 4)
    assert (lstm.state_size, lstm.state_per_rank) == (24, 6)
    assert lstm.w_in.shape == (3, 6, HIDDEN) and param_meta(lstm.w_in).shard == (1, 3, 4)
    assert param_meta(lstm.peephole).shard == (1, 3, 4) and param_meta(lstm.w_out.weight).shard == (1, 3, 4)


@pytest.mark.parametrize("kind,overrides,match", [
    ("gla", {"gla_heads": 2}, r"^model\.gla\.num_heads=2: the number of GLA heads .*not divisible by parallel\.tp=4"),
    ("gru", {"state_size": 30}, r"^model\.pararnn\.state_size=30: the ParaRNN state width .*parallel\.tp=4"),
    ("gla", {"gla_heads": None, "num_heads": 2}, r"^model\.num_heads=2: .*not divisible by parallel\.tp=4"),
], ids=["gla-heads", "gru-state", "gla-model-heads"])
def test_indivisible_sizes_name_the_field(kind, overrides, match):
    """models.check refuses the sizes up front (the mixers trust a checked config)."""
    cfg = dataclasses.replace(mixer_cfg(**overrides), token_mixers=[MIXER_NAMES[kind]])
    with pytest.raises(ConfigError, match=match):
        check(cfg, ParallelConfig(tp=4), Topology(4, tp=4))
