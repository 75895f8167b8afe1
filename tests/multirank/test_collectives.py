"""Differentiable collectives on 2 and 4 gloo ranks: forward and backward against single-process formulas.

Every rank builds the same list of per-rank inputs X_r and upstream gradients G_r (fp64, from a
seed), runs the collective on its own X_r and back-propagates its own G_r. The test process
computes what each rank must get from the whole list, with ordinary tensor ops, and compares
(rel 1e-12: fp64 sums differ only in order). The bytes each rank counts are checked against the
convention in parallel_state/comm_stats.py.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from parallel_state import collectives as C
from parallel_state.comm_stats import CommStats
from parallel_state.groups import init
from parallel_state.topology import Topology

pytestmark = pytest.mark.xdist_group("rank_pool")

B = 2  # batch of every test tensor
F64 = 8  # bytes per element


def per_rank(shape: tuple[int, ...], n: int, seed: int) -> list[torch.Tensor]:
    """n fp64 tensors of `shape`, the same on every process for a seed."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(n)]


def uneven_splits(n: int) -> list[list[int]]:
    """splits[i][j]: rows rank i sends to rank j (some zero, all different)."""
    return [[(i + 2 * j) % 3 for j in range(n)] for i in range(n)]


def cases(n: int) -> dict:
    """Case name -> (input shape on each rank, upstream-grad shape on each rank)."""
    T = 2 * n  # full sequence length
    return {
        "copy_to_tp_region": ((B, T, 3), (B, T, 3)),
        "reduce_from_tp_region": ((B, T, 3), (B, T, 3)),
        "scatter_to_tp_region": ((B, 3, 2 * n), (B, 3, 2)),
        "gather_from_tp_region": ((B, 3, 2), (B, 3, 2 * n)),
        "scatter_to_sequence_parallel_region": ((B, T, 3), (B, 2, 3)),
        "gather_seq_tp_output_grad": ((B, 2, 3), (B, T, 3)),
        "gather_seq_replicated_grad": ((B, 2, 3), (B, T, 3)),
        "reduce_scatter_to_sequence_parallel_region": ((B, T, 3), (B, 2, 3)),
        "all_to_all_even": ((2 * n, 3), (2 * n, 3)),
        "all_to_all_ulysses": ((B, 2, 2 * n, 3), (B, T, 2, 3)),
        "all_reduce_async": ((B, T, 3), (B, T, 3)),
    }


def run_case(name: str, x: torch.Tensor, group, stats: CommStats, rank: int, n: int) -> torch.Tensor:
    if name == "copy_to_tp_region":
        return C.copy_to_tp_region(x, group)
    if name == "reduce_from_tp_region":
        return C.reduce_from_tp_region(x, group)
    if name == "scatter_to_tp_region":
        return C.scatter_to_tp_region(x, group)
    if name == "gather_from_tp_region":
        return C.gather_from_tp_region(x, group)
    if name == "scatter_to_sequence_parallel_region":
        return C.scatter_to_sequence_parallel_region(x, group)
    if name == "gather_seq_tp_output_grad":
        return C.gather_from_sequence_parallel_region(x, group, tensor_parallel_output_grad=True)
    if name == "gather_seq_replicated_grad":
        return C.gather_from_sequence_parallel_region(x, group, tensor_parallel_output_grad=False)
    if name == "reduce_scatter_to_sequence_parallel_region":
        return C.reduce_scatter_to_sequence_parallel_region(x, group)
    if name == "all_to_all_even":
        return C.all_to_all(x, group)
    if name == "all_to_all_ulysses":
        return C.all_to_all_scatter_gather(x, group, scatter_dim=2, gather_dim=1)
    if name == "all_reduce_async":
        out, handle = C.all_reduce_async(x, group)
        handle.wait()
        return out
    raise KeyError(name)


def on_rank(seed: int) -> dict:
    """Every case forward + backward on this rank, plus uneven all-to-all and the async buffers."""
    n = dist.get_world_size()
    rank = dist.get_rank()
    ps = init(Topology(n, tp=n))
    results = {}
    for i, (name, (x_shape, g_shape)) in enumerate(cases(n).items()):
        x = per_rank(x_shape, n, seed + i)[rank].requires_grad_()
        g = per_rank(g_shape, n, seed + 100 + i)[rank]
        if name == "gather_seq_replicated_grad":
            g = per_rank(g_shape, 1, seed + 100 + i)[0]  # replicated consumer: the same grad everywhere
        stats = ps.stats  # the groups' own counters
        stats.reset()
        out = run_case(name, x, ps.tp, stats, rank, n)
        out.backward(g)
        results[name] = (out.detach(), x.grad, dict(stats.bytes_sent))

    splits = uneven_splits(n)
    x = per_rank((sum(splits[rank]), 3), n, seed + 50)[rank].requires_grad_()
    out_rows = [splits[i][rank] for i in range(n)]
    g = per_rank((sum(out_rows), 3), 1, seed + 150 + rank)[0]
    stats = ps.stats  # the groups' own counters
    stats.reset()
    out = C.all_to_all(x, ps.tp, output_split_sizes=out_rows, input_split_sizes=splits[rank])
    out.backward(g)
    results["all_to_all_uneven"] = (out.detach(), x.grad, dict(stats.bytes_sent))

    buf = per_rank((2 * n, 3), n, seed + 60)[rank]
    stats = ps.stats  # the groups' own counters
    stats.reset()
    gathered, h1 = C.all_gather_async(buf, ps.tp)
    scattered, h2 = C.reduce_scatter_async(buf, ps.tp)
    summed = buf.clone()
    h3 = C.all_reduce_inplace(summed, ps.tp, async_op=True)
    for h in (h1, h2, h3):
        h.wait()
    results["async_buffers"] = (gathered, scattered, summed, dict(stats.bytes_sent))

    # A size-1 group inside a multi-rank job (dp=n, tp=1): identity, nothing sent or counted.
    ps1 = init(Topology(n))
    stats = ps1.stats
    y = per_rank((B, 4, 4), n, seed)[rank].requires_grad_()
    outs = [C.copy_to_tp_region(y, ps1.tp), C.reduce_from_tp_region(y, ps1.tp),
            C.gather_from_sequence_parallel_region(y, ps1.tp),
            C.reduce_scatter_to_sequence_parallel_region(y, ps1.tp), C.all_to_all(y, ps1.tp),
            C.all_reduce_async(y, ps1.tp)[0]]
    results["size1_identity"] = all(o is y for o in outs) and not stats.bytes_sent
    ps1.destroy()
    ps.destroy()
    return results


def expected(name: str, xs: list[torch.Tensor], gs: list[torch.Tensor], n: int):
    """(outs, grads) every rank must get, from the whole list of inputs and upstream grads."""
    total_x, total_g = sum(xs), sum(gs)
    if name == "copy_to_tp_region":
        return xs, [total_g] * n
    if name in ("reduce_from_tp_region", "all_reduce_async"):
        return [total_x] * n, gs
    if name == "scatter_to_tp_region":
        return [x.chunk(n, -1)[r] for r, x in enumerate(xs)], [torch.cat(gs, -1)] * n
    if name == "gather_from_tp_region":
        return [torch.cat(xs, -1)] * n, [g.chunk(n, -1)[r] for r, g in enumerate(gs)]
    if name == "scatter_to_sequence_parallel_region":
        return [x.chunk(n, 1)[r] for r, x in enumerate(xs)], [torch.cat(gs, 1)] * n
    if name == "gather_seq_tp_output_grad":
        return [torch.cat(xs, 1)] * n, list(total_g.chunk(n, 1))
    if name == "gather_seq_replicated_grad":
        return [torch.cat(xs, 1)] * n, list(gs[0].chunk(n, 1))
    if name == "reduce_scatter_to_sequence_parallel_region":
        return list(total_x.chunk(n, 1)), [torch.cat(gs, 1)] * n
    if name == "all_to_all_even":
        # Block j of rank i goes to rank j at block position i; gradients retrace the route.
        outs = [torch.cat([xs[i].chunk(n, 0)[r] for i in range(n)]) for r in range(n)]
        grads = [torch.cat([gs[j].chunk(n, 0)[r] for j in range(n)]) for r in range(n)]
        return outs, grads
    if name == "all_to_all_ulysses":
        # [B, T/n, H, D] -> [B, T, H/n, D]: rank r gets head chunk r of every rank's sequence chunk.
        outs = [torch.cat([xs[i].chunk(n, 2)[r] for i in range(n)], 1) for r in range(n)]
        grads = [torch.cat([gs[j].chunk(n, 1)[r] for j in range(n)], 2) for r in range(n)]
        return outs, grads
    raise KeyError(name)


def expected_bytes(name: str, x_shape: tuple, g_shape: tuple, n: int) -> dict:
    numel = lambda shape: int(torch.Size(shape).numel())
    ring = (n - 1) / n
    x_bytes, g_bytes = numel(x_shape) * F64, numel(g_shape) * F64
    return {
        "copy_to_tp_region": {("all_reduce", "tp"): 2 * ring * g_bytes},
        "reduce_from_tp_region": {("all_reduce", "tp"): 2 * ring * x_bytes},
        "all_reduce_async": {("all_reduce", "tp"): 2 * ring * x_bytes},
        "scatter_to_tp_region": {("all_gather", "tp"): ring * x_bytes},
        "gather_from_tp_region": {("all_gather", "tp"): ring * g_bytes},
        "scatter_to_sequence_parallel_region": {("all_gather", "tp"): ring * x_bytes},
        "gather_seq_tp_output_grad": {("all_gather", "tp"): ring * g_bytes,
                                      ("reduce_scatter", "tp"): ring * g_bytes},
        "gather_seq_replicated_grad": {("all_gather", "tp"): ring * g_bytes},
        "reduce_scatter_to_sequence_parallel_region": {("reduce_scatter", "tp"): ring * x_bytes,
                                                       ("all_gather", "tp"): ring * x_bytes},
        "all_to_all_even": {("all_to_all", "tp"): 2 * ring * x_bytes},
        "all_to_all_ulysses": {("all_to_all", "tp"): ring * (x_bytes + g_bytes)},
    }[name]


@pytest.mark.parametrize("n", [2, 4])
def test_collectives_forward_and_backward_match_one_process(rank_pools, n):
    seed = 1234
    results = rank_pools.get(n).run(on_rank, seed)
    for i, (name, (x_shape, g_shape)) in enumerate(cases(n).items()):
        xs = per_rank(x_shape, n, seed + i)
        gs = per_rank(g_shape, n, seed + 100 + i)
        if name == "gather_seq_replicated_grad":
            gs = per_rank(g_shape, 1, seed + 100 + i) * n
        outs, grads = expected(name, xs, gs, n)
        for r in range(n):
            out, grad, sent = results[r][name]
            torch.testing.assert_close(out, outs[r], rtol=1e-12, atol=1e-12, msg=f"{name} forward, rank {r}")
            torch.testing.assert_close(grad, grads[r], rtol=1e-12, atol=1e-12, msg=f"{name} backward, rank {r}")
            assert sent == pytest.approx(expected_bytes(name, x_shape, g_shape, n)), (name, r)

    splits = uneven_splits(n)
    xs = [per_rank((sum(splits[r]), 3), n, seed + 50)[r] for r in range(n)]
    gs = [per_rank((sum(splits[i][r] for i in range(n)), 3), 1, seed + 150 + r)[0] for r in range(n)]
    for r in range(n):
        out, grad, sent = results[r]["all_to_all_uneven"]
        # Rank r receives, in rank order, the rows every rank i addressed to it ...
        want_out = torch.cat([xs[i].split(splits[i])[r] for i in range(n)])
        # ... and its input rows for rank j get back rank j's gradient rows from block r.
        want_grad = torch.cat([gs[j].split([splits[i][j] for i in range(n)])[r] for j in range(n)])
        torch.testing.assert_close(out, want_out, rtol=0, atol=0)
        torch.testing.assert_close(grad, want_grad, rtol=0, atol=0)
        rows_sent = sum(splits[r]) - splits[r][r] + sum(splits[i][r] for i in range(n)) - splits[r][r]
        assert sent == {("all_to_all", "tp"): rows_sent * 3 * F64}

    bufs = per_rank((2 * n, 3), n, seed + 60)
    for r in range(n):
        gathered, scattered, summed, sent = results[r]["async_buffers"]
        torch.testing.assert_close(gathered, torch.cat(bufs), rtol=0, atol=0)
        torch.testing.assert_close(scattered, sum(bufs).chunk(n)[r], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(summed, sum(bufs), rtol=1e-12, atol=1e-12)
        full = 2 * n * 3 * F64
        assert sent == pytest.approx({("all_gather", "tp"): (n - 1) / n * (n * full),  # S = the output
                                      ("reduce_scatter", "tp"): (n - 1) / n * full,
                                      ("all_reduce", "tp"): 2 * (n - 1) / n * full})
        assert results[r]["size1_identity"]
