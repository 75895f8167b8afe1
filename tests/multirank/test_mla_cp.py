"""Ring attention and Ulysses with values narrower than the keys (MLA's shapes) on 2 and 4 gloo ranks.

Every rank builds the same full q, k [.., D] and v [.., Dv] (Dv != D) and upstream gradient, keeps
its zigzag slice, runs the context-parallel attention forward and backward with an explicit scale,
and returns its output, gradients and the bytes it sent. The test reassembles the sequence and
compares with full causal attention in fp64 (1e-10; fp32 runs 1e-5 relative), and checks that K
and V travel at their exact sizes (no padding on the wire).
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from models.layers.context_parallel import fused_block_available, ring_attention, ulysses_attention
from parallel_state.groups import init
from parallel_state.topology import Topology
from trainer.data.context_split import zigzag_gather, zigzag_positions

pytestmark = pytest.mark.xdist_group("rank_pool")

B, D, CHUNK, SCALE = 2, 12, 2, 0.21
KERNELS = ["torch", "fused"] if fused_block_available() else ["torch"]
# (query heads, K/V heads, value width, dtype, kernel): MLA expands K/V per query head (hq == hkv).
RING_CASES = [(4, 4, dv, dtype, kernel) for dv in (6, 20) for dtype in (torch.float64, torch.float32)
              for kernel in KERNELS] + [(4, 2, 6, torch.float64, "torch")]
ULYSSES_CASES = [(4, 4, 6, torch.float64), (4, 4, 20, torch.float32), (4, 2, 6, torch.float64)]


def full_inputs(hq: int, hkv: int, dv: int, seq_len: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(hq, D), (hkv, D), (hkv, dv), (hq, dv)]
    return [torch.randn(B, h, seq_len, width, generator=g, dtype=torch.float64) for h, width in shapes]


def on_rank(seed: int) -> dict:
    world = dist.get_world_size()
    ps = init(Topology(world, cp=world))
    try:
        seq_len = 2 * CHUNK * world
        keep = zigzag_positions(seq_len, world, ps.cp.rank)
        results = {"cp_rank": ps.cp.rank}
        for kind, cases in (("ring", RING_CASES), ("ulysses", ULYSSES_CASES)):
            for i, (hq, hkv, dv, dtype, *kernel) in enumerate(cases):
                q, k, v, dout = (t.index_select(2, keep).to(dtype) for t in full_inputs(hq, hkv, dv, seq_len, seed + i))
                q, k, v = (t.requires_grad_() for t in (q, k, v))
                ps.stats.reset()
                if kind == "ring":
                    out = ring_attention(q, k, v, ps.cp, scale=SCALE, kernel=kernel[0])
                else:
                    out = ulysses_attention(q, k, v, ps.cp, keep.unsqueeze(0), scale=SCALE)
                forward_bytes = dict(ps.stats.bytes_sent)
                out.backward(dout)
                results[(kind, i)] = (out.detach(), q.grad, k.grad, v.grad, forward_bytes)
        return results
    finally:
        ps.destroy()


def reference(hq, hkv, dv, seq_len, seed):
    """fp64 (out, dq, dk, dv) of plain causal softmax attention over the whole sequence."""
    q, k, v, dout = full_inputs(hq, hkv, dv, seq_len, seed)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    groups = hq // hkv
    scores = q @ k.repeat_interleave(groups, 1).transpose(-1, -2) * SCALE
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    out = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1) @ v.repeat_interleave(groups, 1)
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize("cp", [2, 4])
def test_context_parallel_attention_with_a_narrow_or_wide_value(rank_pools, cp):
    seed = 7
    results = sorted(rank_pools.get(cp).run(on_rank, seed), key=lambda r: r["cp_rank"])
    seq_len = 2 * CHUNK * cp
    for kind, cases in (("ring", RING_CASES), ("ulysses", ULYSSES_CASES)):
        for i, (hq, hkv, dv, dtype, *_) in enumerate(cases):
            want = reference(hq, hkv, dv, seq_len, seed + i)
            for j, name in enumerate(("out", "dq", "dk", "dv")):
                got = zigzag_gather([r[(kind, i)][j] for r in results], dim=2)
                what = f"{kind} case {cases[i]} {name}"
                if dtype == torch.float64:
                    torch.testing.assert_close(got, want[j], rtol=0, atol=1e-10, msg=what)
                else:
                    rel = ((got.double() - want[j]).norm() / want[j].norm()).item()
                    assert rel <= 1e-5, f"{what}: relative error {rel:.2e}"
            if kind == "ring":  # (P-1) K/V blocks of exactly k + v elements each: nothing padded
                kv_bytes = B * hkv * 2 * CHUNK * (D + dv) * torch.finfo(dtype).bits // 8
                assert results[0][(kind, i)][4] == {("send", "cp"): (cp - 1) * kv_bytes}
