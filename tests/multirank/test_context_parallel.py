"""Ring attention (zigzag and contiguous) and Ulysses on 2 and 4 gloo ranks against full causal attention.

Every rank builds the same full q, k, v and upstream gradient (from a seed), keeps its CP slice of
the sequence, runs the context-parallel attention forward and backward, and returns its output,
lse, gradients and the bytes it counted. The test process reassembles the sequence (the inverse
of the split) and compares with plain softmax attention over the whole sequence, differentiated
by autograd in fp64: fp64 runs to 1e-10 absolute, fp32 runs to 1e-5 relative (norm of the error
over norm of the reference). Byte counts are checked against the analytic volume.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from models.layers.context_parallel import fused_block_available, ring_attention, ulysses_attention
from parallel_state.groups import init
from parallel_state.topology import Topology
from tests.unit.test_context_split import full_causal_reference
from trainer.data.context_split import zigzag_gather, zigzag_positions

pytestmark = pytest.mark.xdist_group("rank_pool")

B, D, CHUNK = 2, 8, 2  # batch, head dim, tokens per zigzag chunk (T_local = 2 * CHUNK)
KERNELS = ["torch", "fused"] if fused_block_available() else ["torch"]


def ring_cases(cp: int) -> list[tuple]:
    """(query heads, K/V heads, dtype, kernel, zigzag) for a CP group of `cp` ranks."""
    cases = [(hq, hkv, dtype, kernel, True) for hq, hkv in ((4, 2), (4, 4))
             for dtype in (torch.float64, torch.float32) for kernel in KERNELS]
    return cases + [(4, 2, torch.float64, "torch", False)]


def ulysses_cases(cp: int) -> list[tuple]:
    """(query heads, K/V heads, dtype): split K/V heads, MHA, and replicated K/V heads (kv < cp)."""
    heads = [(4, 2), (4, 4), (4, 1)] if cp == 2 else [(4, 4), (8, 4), (4, 2)]
    return [(hq, hkv, dtype) for hq, hkv in heads for dtype in (torch.float64, torch.float32)]


def full_inputs(hq: int, hkv: int, seq_len: int, seed: int) -> list[torch.Tensor]:
    """Full-sequence fp64 q, k, v and upstream gradient, identical on every process for a seed."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, seq_len, D, generator=g, dtype=torch.float64) for h in (hq, hkv, hkv, hq)]


def local_positions(seq_len: int, cp: int, rank: int, zigzag: bool) -> torch.Tensor:
    if zigzag:
        return zigzag_positions(seq_len, cp, rank)
    n = seq_len // cp
    return torch.arange(rank * n, (rank + 1) * n)


def run_cases(ps, seed: int) -> dict:
    """Every ring and Ulysses case on this rank's CP group."""
    cp, rank = ps.cp.size, ps.cp.rank
    seq_len = 2 * CHUNK * cp
    results = {"cp_rank": rank}
    for i, (hq, hkv, dtype, kernel, zigzag) in enumerate(ring_cases(cp)):
        keep = local_positions(seq_len, cp, rank, zigzag)
        q, k, v, dout = (t.index_select(2, keep).to(dtype) for t in full_inputs(hq, hkv, seq_len, seed + i))
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        stats = ps.stats  # the groups' own counters
        stats.reset()
        out, lse = ring_attention(q, k, v, ps.cp, zigzag=zigzag, kernel=kernel, return_lse=True)
        out.backward(dout)
        results[("ring", i)] = (out.detach(), lse, q.grad, k.grad, v.grad, dict(stats.bytes_sent))
    for i, (hq, hkv, dtype) in enumerate(ulysses_cases(cp)):
        keep = zigzag_positions(seq_len, cp, rank)
        q, k, v, dout = (t.index_select(2, keep).to(dtype) for t in full_inputs(hq, hkv, seq_len, seed + 50 + i))
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        stats = ps.stats  # the groups' own counters
        stats.reset()
        out = ulysses_attention(q, k, v, ps.cp, keep.unsqueeze(0))
        out.backward(dout)
        results[("ulysses", i)] = (out.detach(), None, q.grad, k.grad, v.grad, dict(stats.bytes_sent))
    return results


def on_rank(seed: int, tp: int) -> dict:
    """All cases on a CP group of world/tp ranks (with tp=2 the CP groups are strided: {0,2}, {1,3})."""
    ps = init(Topology(dist.get_world_size(), tp=tp, cp=dist.get_world_size() // tp))
    try:
        return run_cases(ps, seed)
    finally:
        ps.destroy()


def reference(hq, hkv, seq_len, seed):
    """fp64 (out, lse, dq, dk, dv) of full causal attention over the whole sequence."""
    q, k, v, dout = full_inputs(hq, hkv, seq_len, seed)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, lse = full_causal_reference(q, k, v)
    out.backward(dout)
    return out.detach(), lse.detach(), q.grad, k.grad, v.grad


def assert_matches(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    if dtype == torch.float64:
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10, msg=what)
    else:
        rel = ((got.double() - want).norm() / want.norm()).item()
        assert rel <= 1e-5, f"{what}: relative error {rel:.2e} > 1e-5"


def check(results: list[dict], seed: int) -> None:
    """Compare the ranks of each CP group (equal inputs in every group) with the full reference."""
    cp = len({r["cp_rank"] for r in results})
    seq_len, t_local = 2 * CHUNK * cp, 2 * CHUNK
    by_cp_rank = {}
    for r in results:  # one representative per CP rank (other groups must agree bit for bit)
        first = by_cp_rank.setdefault(r["cp_rank"], r)
        for key in r:
            if key != "cp_rank":
                for a, b in zip(first[key][:5], r[key][:5], strict=True):
                    assert (a is None and b is None) or torch.equal(a, b), key
    ranks = [by_cp_rank[c] for c in range(cp)]
    for i, (hq, hkv, dtype, kernel, zigzag) in enumerate(ring_cases(cp)):
        want = reference(hq, hkv, seq_len, seed + i)
        gather = (lambda parts: zigzag_gather(parts, dim=2)) if zigzag else (lambda parts: torch.cat(parts, 2))
        for j, name in enumerate(("out", "lse", "dq", "dk", "dv")):
            got = gather([r[("ring", i)][j] for r in ranks])
            assert_matches(got, want[j], dtype, f"ring cp={cp} {hq}/{hkv} {dtype} {kernel} zigzag={zigzag}: {name}")
        elt = torch.finfo(dtype).bits // 8
        block = 2 * B * hkv * t_local * D * elt  # K and V of one rank, one hop
        expected = {("send", "cp"): (cp - 1) * block + (cp - 1) * block + cp * block}  # fwd KV, bwd KV, bwd dKV
        for r in ranks:
            assert r[("ring", i)][5] == pytest.approx(expected)
    for i, (hq, hkv, dtype) in enumerate(ulysses_cases(cp)):
        want = reference(hq, hkv, seq_len, seed + 50 + i)
        for j, name in ((0, "out"), (2, "dq"), (3, "dk"), (4, "dv")):
            got = zigzag_gather([r[("ulysses", i)][j] for r in ranks], dim=2)
            assert_matches(got, want[j], dtype, f"ulysses cp={cp} {hq}/{hkv} {dtype}: {name}")
        elt = torch.finfo(dtype).bits // 8
        kv_sent = max(hkv, cp)  # K/V heads after replication
        per_token = (2 * hq + 2 * kv_sent) * D * elt * B  # q, out, k, v; the same again backward
        expected = {("all_to_all", "cp"): 2 * (cp - 1) / cp * per_token * t_local,
                    ("all_gather", "cp"): (cp - 1) / cp * B * seq_len * 8}  # int64 positions
        for r in ranks:
            assert r[("ulysses", i)][5] == pytest.approx(expected)


@pytest.mark.parametrize("world, tp", [(2, 1), (4, 1), (4, 2)])
def test_ring_and_ulysses_equal_full_causal_attention(rank_pools, world, tp):
    seed = 4321
    results = rank_pools.get(world).run(on_rank, seed, tp)
    check(results, seed)
