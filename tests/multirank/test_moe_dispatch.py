"""The MoE layer on gloo ranks in several (tp, dp) x (etp, ep, edp) foldings equals the one-process layer.

Each rank builds its shard of the layer from the same seed, feeds its attention-layout tokens
(its DP rank's sequences; its 1/tp of each sequence under SP, all of it otherwise) and runs
forward and backward with aux losses on. Outputs and input gradients must equal the matching
slices of the one-process dropless layer; parameter gradients, reduced as the trainer will
(replicas summed: router over every rank, experts over EDP, shared experts over DP x CP) and
gathered over their shards, must equal its parameter gradients. The switch aux loss is per
forward call on the sequences routed together, so the reference routes each DP rank's
sequences in its own call (tests/unit/test_moe_layer.py checks that layer against a dense loop).
A second test checks the bytes each rank counts against the analytic volume of the routing
that happened.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from models.init import materialize
from moe import AuxLossScale, MoEConfig, MoEContext, MoELayer
from moe.dispatcher import make_dispatcher
from moe.layer import update_aux_free_biases
from moe.router import Routing, apply_capacity, capacity_of
from parallel_state.groups import init
from parallel_state.params import param_meta
from parallel_state.topology import Topology

pytestmark = pytest.mark.xdist_group("rank_pool")

HIDDEN, SEQ, BATCH_PER_DP, SEED, AUX_SCALE = 16, 8, 2, 7, 0.25
BASE = {"num_experts": 8, "topk": 2, "ffn_hidden_size": 8, "aux_loss_coeff": 0.1, "seq_aux_loss_coeff": 0.05,
        "z_loss_coeff": 0.01, "num_shared_experts": 1, "shared_ffn_hidden_size": 8}

# (world, topology kwargs): world = tp * dp = etp * ep * edp.
LAYOUTS = {
    "tp2-ep2": (2, {"tp": 2, "ep": 2, "etp": 1}),
    "dp4-ep4": (4, {"ep": 4, "etp": 1}),
    "tp2dp2-ep4": (4, {"tp": 2, "ep": 4, "etp": 1}),
    "tp2-etp2": (2, {"tp": 2, "ep": 1, "etp": 2}),
    "tp2dp2-ep2etp2": (4, {"tp": 2, "ep": 2, "etp": 2}),
    "cp2-ep2": (2, {"cp": 2, "ep": 2, "etp": 1}),  # CP ranks hold zigzag halves of the same sequences
}
CASES = [(layout, dispatcher, sp) for layout, (_, kw) in LAYOUTS.items() for dispatcher in ("alltoall", "allgather")
         for sp in ((False, True) if kw.get("tp", 1) > 1 else (False,))]


def build(cfg: MoEConfig, ctx: MoEContext | None) -> MoELayer:
    with torch.device("meta"):
        layer = MoELayer(cfg, HIDDEN, init_std=0.3, output_init_std=0.2, ctx=ctx)
    return materialize(layer, seed=SEED)


def inputs(dp: int, skew: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch [dp * B, T, H] and the gradient arriving at the layer output (with skew,
    feature 0 is >= 1 so that skew_router sends every token to experts 0 and 1)."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(dp * BATCH_PER_DP, SEQ, HIDDEN, generator=g)
    if skew:
        x[..., 0] = x[..., 0].abs() + 1.0
    return x, torch.randn(x.shape, generator=g)


def local_slice(t: torch.Tensor, topo: Topology, rank: int, sp: bool) -> torch.Tensor:
    """This rank's attention-layout part of a global [dp * B, T, ...] tensor: its DP rank's
    sequences, CP zigzag chunks r and 2cp-1-r, then its 1/tp under SP."""
    c = topo.coords(rank)
    t = t[c.dp * BATCH_PER_DP:(c.dp + 1) * BATCH_PER_DP]
    if topo.cp > 1:
        chunks = t.chunk(2 * topo.cp, dim=1)
        t = torch.cat([chunks[c.cp], chunks[2 * topo.cp - 1 - c.cp]], dim=1)
    return t.chunk(topo.tp, dim=1)[c.tp] if sp else t


def run_rank(topo_kwargs: dict, cfg_kwargs: dict, sp: bool, forward_only: bool = False, skew: bool = False) -> dict:
    """One rank: build its shard, run forward (and backward), return outputs, grads and bytes."""
    ps = init(Topology(dist.get_world_size(), **topo_kwargs))
    try:
        stats = ps.stats  # the groups' own counters
        stats.reset()
        ctx = MoEContext.from_parallel_state(ps, sequence_parallel=sp,
                                             aux_loss_scale=AuxLossScale(AUX_SCALE))
        layer = build(MoEConfig(**cfg_kwargs), ctx)
        if skew:
            skew_router(layer)
        x_full, g_full = inputs(ps.dp.size, skew)
        x = local_slice(x_full, ps.topology, ps.rank, sp).clone().requires_grad_()
        routed = {}
        hook = layer.router.register_forward_hook(lambda m, a, out: routed.update(expert=out.expert.clone()))
        y = layer(x)
        hook.remove()
        out = {"y": y.detach(), "bytes": dict(stats.bytes_sent), "expert": routed["expert"],
               "ep_ranks": ps.ep.ranks, "etp_ranks": ps.etp.ranks, "etp_ep_ranks": ps.etp_ep.ranks}
        if not forward_only:
            (y * local_slice(g_full, ps.topology, ps.rank, sp)).sum().backward()
            out["router_marked"] = all(param_meta(p).tp_partial_grad for p in layer.router.parameters())
            out["x_grad"] = x.grad
            out["grads"] = {n: (param_meta(p).shard, p.grad) for n, p in layer.named_parameters()}
        return out
    finally:
        ps.destroy()


def reference(cfg: MoEConfig, dp: int, skew: bool = False) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """One process: each DP rank's sequences routed in their own call; returns y, x grad, param grads."""
    layer = build(cfg, MoEContext(aux_loss_scale=AuxLossScale(AUX_SCALE)))
    if skew:
        skew_router(layer)
    x_full, g_full = inputs(dp, skew)
    x = x_full.clone().requires_grad_()
    chunks = [layer(c) for c in x.split(BATCH_PER_DP)]
    y = torch.cat(chunks)
    (y * g_full).sum().backward()
    return y.detach(), x.grad, {n: p.grad for n, p in layer.named_parameters()}


def reduce_and_gather(results: list[dict], name: str) -> torch.Tensor:
    """Sum a parameter's grads over the ranks holding the same shard, then concatenate the shards."""
    by_index: dict[int, torch.Tensor] = {}
    dim = 0
    for r in results:
        if name not in r["grads"]:
            continue
        shard, grad = r["grads"][name]
        index = 0 if shard is None else shard[1]
        dim = 0 if shard is None else shard[0]
        by_index[index] = grad.clone() if index not in by_index else by_index[index] + grad
    return torch.cat([by_index[i] for i in sorted(by_index)], dim=dim)


@pytest.mark.parametrize("layout, dispatcher, sp", CASES,
                         ids=[f"{lay}-{d}-{'sp' if sp else 'nosp'}" for lay, d, sp in CASES])
def test_layer_matches_one_process(rank_pools, layout, dispatcher, sp):
    check_parity(rank_pools, layout, {**BASE, "dispatcher": dispatcher}, sp)


def test_grouped_mm_experts_in_a_folded_layout(rank_pools):
    """torch._grouped_mm on the local experts of an EP x ETP rank."""
    check_parity(rank_pools, "tp2dp2-ep2etp2", {**BASE, "grouped_gemm": "grouped_mm"}, True)


@pytest.mark.parametrize("grouped_gemm", ["loop", "grouped_mm"])
@pytest.mark.parametrize("dispatcher", ["alltoall", "allgather"])
def test_ranks_and_experts_without_tokens(rank_pools, dispatcher, grouped_gemm):
    """Every token picks experts 0 and 1: EP rank 1 and experts 2..7 receive zero rows."""
    check_parity(rank_pools, "tp2dp2-ep2etp2", {**BASE, "dispatcher": dispatcher, "grouped_gemm": grouped_gemm},
                 True, skew=True)


def skew_router(layer: MoELayer) -> None:
    """Make experts 0 and 1 every token's choice (a large logit from a constant-sign feature)."""
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, 0], layer.router.weight[1, 0] = 50.0, 49.0


def check_parity(rank_pools, layout: str, cfg_kwargs: dict, sp: bool, skew: bool = False) -> None:
    world, topo_kwargs = LAYOUTS[layout]
    results = rank_pools.get(world).run(run_rank, topo_kwargs, cfg_kwargs, sp, False, skew)
    topo = Topology(world, **topo_kwargs)
    if skew:
        assert all(set(r["expert"].unique().tolist()) == {0, 1} for r in results)
    y_ref, x_grad_ref, grads_ref = reference(MoEConfig(**cfg_kwargs), topo.dp, skew)
    tol = {"rtol": 1e-5, "atol": 1e-6}
    for rank, r in enumerate(results):
        torch.testing.assert_close(r["y"], local_slice(y_ref, topo, rank, sp), **tol)
        torch.testing.assert_close(r["x_grad"], local_slice(x_grad_ref, topo, rank, sp), **tol)
        # The router is replicated but each TP rank routes other tokens: the trainer must sum over TP.
        assert r["router_marked"] == (topo.tp > 1)
    for name, g_ref in grads_ref.items():
        got = reduce_and_gather(results, name)
        torch.testing.assert_close(got, g_ref, **tol, msg=lambda m, n=name: f"{n}: {m}")


def expected_bytes(results: list[dict], cfg: MoEConfig, rank: int) -> dict:
    """Analytic forward bytes of one rank (alltoall or allgather) from every rank's routing."""
    f32, i64 = 4, 8
    r = results[rank]
    num_local = cfg.num_experts // len(r["ep_ranks"])

    def slots_to(q: int, ep_rank: int) -> int:
        e = results[q]["expert"]
        return int(((e >= ep_rank * num_local) & (e < (ep_rank + 1) * num_local)).sum())

    out = {}
    if cfg.dispatcher == "allgather":
        n, k = r["expert"].shape
        group = len(r["etp_ep_ranks"])
        if group > 1:
            out[("all_gather", "etp_ep")] = (group - 1) * n * (HIDDEN * f32 + k * f32 + k * i64 + k * 1)
            out[("reduce_scatter", "etp_ep")] = (group - 1) * n * HIDDEN * f32
        return out
    ep, etp = len(r["ep_ranks"]), len(r["etp_ranks"])

    def received(q: int) -> int:  # rows rank q holds after the EP all-to-all
        p = results[q]["ep_ranks"].index(q)
        return sum(slots_to(s, p) for s in results[q]["ep_ranks"])

    p = r["ep_ranks"].index(rank)
    if ep > 1:
        own = slots_to(rank, p)
        sent_others = r["expert"].numel() - own
        out[("all_to_all", "ep")] = (sent_others + received(rank) - own) * HIDDEN * f32 + (ep - 1) * num_local * i64
    if etp > 1:
        out[("all_gather", "etp")] = (etp - 1) * (ep * num_local * i64 + received(rank) * HIDDEN * f32)
        total = sum(received(q) for q in r["etp_ranks"])
        out[("reduce_scatter", "etp")] = (total - received(rank)) * HIDDEN * f32
    return out


@pytest.mark.parametrize("dispatcher", ["alltoall", "allgather"])
@pytest.mark.parametrize("layout", ["dp4-ep4", "tp2dp2-ep2etp2"])
def test_bytes_match_the_routing(rank_pools, layout, dispatcher):
    world, topo_kwargs = LAYOUTS[layout]
    # No aux losses, no shared experts, SP on: the only traffic is the dispatch itself.
    cfg_kwargs = {"num_experts": 8, "topk": 2, "ffn_hidden_size": 8, "dispatcher": dispatcher}
    results = rank_pools.get(world).run(run_rank, topo_kwargs, cfg_kwargs, True, True)
    for rank, r in enumerate(results):
        assert r["bytes"] == pytest.approx(expected_bytes(results, MoEConfig(**cfg_kwargs), rank)), rank


def run_capacity_rank(topo_kwargs: dict, cfg_kwargs: dict) -> dict:
    """Capacity mode: each rank drops by its own tokens' capacity; return its input and output."""
    ps = init(Topology(dist.get_world_size(), **topo_kwargs))
    try:
        layer = build(MoEConfig(**cfg_kwargs), MoEContext.from_parallel_state(ps, sequence_parallel=True))
        x_full, _ = inputs(ps.dp.size)
        x = local_slice(x_full, ps.topology, ps.rank, True)
        return {"x": x, "y": layer(x).detach(), "dropped": layer.last_dropped_slots}
    finally:
        ps.destroy()


@pytest.mark.parametrize("dispatcher", ["alltoall", "allgather"])
def test_capacity_is_per_rank(rank_pools, dispatcher):
    """With a capacity factor each rank's output equals the one-process layer on that rank's tokens."""
    world, topo_kwargs = LAYOUTS["tp2dp2-ep2etp2"]
    cfg_kwargs = {"num_experts": 8, "topk": 2, "ffn_hidden_size": 8, "dispatcher": dispatcher,
                  "capacity_factor": 0.5, "pad_to_capacity": dispatcher == "alltoall"}
    results = rank_pools.get(world).run(run_capacity_rank, topo_kwargs, cfg_kwargs)
    single = build(MoEConfig(**cfg_kwargs), None)
    assert sum(r["dropped"] for r in results) > 0
    for r in results:
        torch.testing.assert_close(r["y"], single(r["x"]), rtol=1e-5, atol=1e-6)


def run_bias_rank(topo_kwargs: dict, cfg_kwargs: dict) -> dict:
    """Two training forwards (microbatches), then the once-per-step aux-free bias update."""
    ps = init(Topology(dist.get_world_size(), **topo_kwargs))
    try:
        layers = [build(MoEConfig(**cfg_kwargs), MoEContext.from_parallel_state(ps, sequence_parallel=False))
                  for _ in range(2)]
        x_full, _ = inputs(ps.dp.size)
        x = local_slice(x_full, ps.topology, ps.rank, False)
        for layer in layers:
            for microbatch in x.split(1):
                layer(microbatch)
        local = [layer.router.tokens_per_expert.clone() for layer in layers]
        imbalance = update_aux_free_biases(layers, ps.tp_dp_cp)
        return {"local": local, "bias": [layer.router.expert_bias.clone() for layer in layers],
                "imbalance": imbalance, "left": [layer.router.tokens_per_expert.sum().item() for layer in layers]}
    finally:
        ps.destroy()


def test_aux_free_bias_update_uses_counts_summed_over_ranks(rank_pools):
    rate = 0.01
    cfg_kwargs = {"num_experts": 8, "topk": 2, "ffn_hidden_size": 8, "score_function": "sigmoid",
                  "aux_free_bias_rate": rate}
    results = rank_pools.get(2).run(run_bias_rank, {"ep": 2, "etp": 1}, cfg_kwargs)
    for layer in range(2):
        total = sum(r["local"][layer] for r in results)
        assert total.sum() == 2 * BATCH_PER_DP * SEQ * 2  # both ranks' tokens, k = 2
        expected = (rate * torch.sign(total.mean() - total)).float()
        for r in results:
            torch.testing.assert_close(r["bias"][layer], expected)
            assert r["imbalance"][layer] == pytest.approx((total.max() / total.mean()).item())
            assert r["left"][layer] == 0


DISPATCH_TOKENS, DISPATCH_K = 12, 2


def rank_routing(rank: int, num_experts: int, padded: bool) -> tuple[torch.Tensor, Routing, int | None]:
    """This rank's tokens [DISPATCH_TOKENS, HIDDEN] (float64) and a top-k routing of them (with
    over-capacity slots dropped and blocks padded to the capacity when `padded`)."""
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(DISPATCH_TOKENS, HIDDEN, generator=g, dtype=torch.float64)
    scores = torch.rand(DISPATCH_TOKENS, num_experts, generator=g, dtype=torch.float64)
    weight, expert = scores.topk(DISPATCH_K, dim=-1)
    active = torch.ones_like(expert, dtype=torch.bool)
    block_rows = None
    if padded:
        block_rows = capacity_of(DISPATCH_TOKENS, DISPATCH_K, num_experts, 0.5)
        active = apply_capacity(expert, weight, active, num_experts, block_rows, "probs")
    return x, Routing(expert=expert, weight=weight, active=active, logits=scores, aux_probs=None), block_rows


def run_dispatch_combine_rank(topo_kwargs: dict, num_experts: int) -> list[dict]:
    """dispatch, identity experts (each ETP rank returns 1/etp of its rows: the partial sums add up
    to the rows), combine, for both dispatchers with and without capacity padding."""
    ps = init(Topology(dist.get_world_size(), **topo_kwargs))
    try:
        ctx = MoEContext.from_parallel_state(ps, sequence_parallel=True)
        out = []
        for kind in ("alltoall", "allgather"):
            for padded in (False, True):
                x, routing, block_rows = rank_routing(ps.rank, num_experts, padded)
                dispatcher = make_dispatcher(kind, num_experts, ctx)
                rows, meta = dispatcher.dispatch(x, routing, block_rows)
                combined = dispatcher.combine(rows / ps.etp.size, meta)
                out.append({"kind": kind, "padded": padded, "x": x, "routing": routing, "block_rows": block_rows,
                            "rows": rows, "rows_per_expert": meta.rows_per_expert, "out": combined,
                            "group": ps.etp_ep.ranks, "first": ps.ep.rank * (num_experts // ps.ep.size)})
        return out
    finally:
        ps.destroy()


@pytest.mark.parametrize("layout", ["dp4-ep4", "tp2-etp2", "tp2dp2-ep2etp2"])
def test_dispatch_then_combine_of_identity_experts_weights_the_tokens(rank_pools, layout):
    """On every rank, for both dispatchers, dropless and padded: each local expert's block holds
    the slots routed to it by the ranks of its etp x ep group (padded: C rows per source rank), and
    combine returns out[t] = sum_j active[t, j] * weight[t, j] * x[t]."""
    world, topo_kwargs = LAYOUTS[layout]
    num_experts = 8
    results = rank_pools.get(world).run(run_dispatch_combine_rank, topo_kwargs, num_experts)
    for case in range(4):
        for rank, r in enumerate(result[case] for result in results):
            routing = r["routing"]
            want = ((routing.weight * routing.active).unsqueeze(-1) * r["x"].unsqueeze(1)).sum(1)
            torch.testing.assert_close(r["out"], want, rtol=1e-13, atol=1e-13, msg=f"rank {rank}, {r['kind']}, padded={r['padded']}")
            sources = [results[q][case] for q in r["group"]]
            start = 0
            for i, rows in enumerate(r["rows_per_expert"]):
                e = r["first"] + i
                mine = [(s["routing"].expert == e) & s["routing"].active for s in sources]
                assert rows == (r["block_rows"] * len(sources) if r["padded"] else sum(int(m.sum()) for m in mine))
                block_sum = sum(((m.unsqueeze(-1) * s["x"].unsqueeze(1)).sum((0, 1)) for m, s in zip(mine, sources)))
                torch.testing.assert_close(r["rows"][start:start + rows].sum(0), block_sum, rtol=1e-13, atol=1e-13)
                start += rows
            assert start == r["rows"].shape[0]
