"""Context parallelism without processes: the zigzag data split, the ring's block plan, the block
kernels and the log-sum-exp merge, against plain full causal attention."""
from __future__ import annotations

import itertools

import pytest
import torch

from models.layers.context_parallel import (
    fused_block_attention,
    fused_block_available,
    merge_attention_partials,
    resolve_block_kernel,
    ring_attention,
    ring_block_plan,
    torch_block_attention,
    torch_block_attention_backward,
    ulysses_kv_replication,
)
from parallel_state.groups import AxisGroup
from trainer.data.context_split import zigzag_gather, zigzag_positions, zigzag_split
from trainer.data.pipeline import make_microbatch


def full_causal_reference(q, k, v, keep=None):
    """Softmax attention with repeated K/V heads and an explicit mask (causal by default): (out, lse)."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if keep is None:
        t = q.shape[2]
        keep = torch.ones(t, t, dtype=torch.bool).tril()
    scores = scores.masked_fill(~keep, float("-inf"))
    return torch.softmax(scores, -1) @ v, torch.logsumexp(scores, -1)


# ---- data split ---------------------------------------------------------------------------------


def test_zigzag_positions_example_from_the_issue():
    assert zigzag_positions(16, 4, 0).tolist() == [0, 1, 14, 15]
    assert zigzag_positions(16, 4, 1).tolist() == [2, 3, 12, 13]
    assert zigzag_positions(16, 4, 3).tolist() == [6, 7, 8, 9]
    assert zigzag_positions(8, 1, 0).tolist() == list(range(8))


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_split_then_gather_is_identity_and_keeps_original_positions(cp):
    g = torch.Generator().manual_seed(cp)
    windows = torch.randint(0, 100, (3, 8 * cp + 1), generator=g).numpy()
    mb = make_microbatch(windows)
    mb["loss_mask"] = (torch.rand(mb["loss_mask"].shape, generator=g) > 0.3).float()
    parts = [zigzag_split(mb, cp, r) for r in range(cp)]
    for r, part in enumerate(parts):
        assert part["position_ids"].tolist() == [zigzag_positions(8 * cp, cp, r).tolist()] * 3
        for name in mb:
            assert part[name].shape == (3, 8)
            # A token keeps its own label and position: input_ids[t] is windows[t], labels[t] windows[t+1].
            torch.testing.assert_close(part["labels"], torch.from_numpy(windows[:, 1:])[:, part["position_ids"][0]])
    for name in mb:
        torch.testing.assert_close(zigzag_gather([p[name] for p in parts]), mb[name], rtol=0, atol=0)
    # The loss contract's denominator is the same however the sequence is split.
    assert sum(p["loss_mask"].sum() for p in parts) == mb["loss_mask"].sum()


def test_split_adds_missing_position_ids():
    mb = {"input_ids": torch.arange(16).view(2, 8), "labels": torch.arange(16).view(2, 8)}
    part = zigzag_split(mb, 2, 1)
    assert part["position_ids"].tolist() == [[2, 3, 4, 5]] * 2
    assert part["input_ids"].tolist() == [[2, 3, 4, 5], [10, 11, 12, 13]]


def test_seq_len_not_divisible_names_the_field_value_and_fix():
    with pytest.raises(ValueError, match=r"data\.seq_len=18 .* 2 \* parallel\.cp = 8 .* multiple of 8, e\.g\. 16 or 24"):
        zigzag_split({"input_ids": torch.zeros(1, 18, dtype=torch.long)}, 4, 0)
    with pytest.raises(ValueError, match="expected"):
        zigzag_split({"input_ids": torch.zeros(1, 8), "labels": torch.zeros(1, 7)}, 2, 0)


# ---- the ring's block plan covers exactly the causal pairs ---------------------------------------


def covered_pairs(cp: int, seq_len: int, zigzag: bool) -> tuple[list[tuple[int, int]], list[int]]:
    """Every (query pos, key pos) pair the plan computes unmasked over all ranks and steps, and the
    per-rank count of pairs."""
    def positions(rank):
        if zigzag:
            return zigzag_positions(seq_len, cp, rank).tolist()
        n = seq_len // cp
        return list(range(rank * n, (rank + 1) * n))

    pairs, per_rank = [], []
    for rank in range(cp):
        mine, count = positions(rank), 0
        for step in range(cp):
            theirs = positions((rank - step) % cp)
            for rows, cols, causal in ring_block_plan(step, rank, cp, len(mine), zigzag):
                for i, j in itertools.product(range(len(mine))[rows], range(len(theirs))[cols]):
                    if not causal or j <= i:
                        pairs.append((mine[i], theirs[j]))
                        count += 1
        per_rank.append(count)
    return pairs, per_rank


@pytest.mark.parametrize("cp", [1, 2, 3, 4])
@pytest.mark.parametrize("zigzag", [True, False])
def test_ring_plan_computes_each_causal_pair_once(cp, zigzag):
    seq_len = 4 * cp
    pairs, per_rank = covered_pairs(cp, seq_len, zigzag)
    assert sorted(pairs) == [(i, j) for i in range(seq_len) for j in range(i + 1)]
    if zigzag:
        assert len(set(per_rank)) == 1  # balanced: every rank does the same work


def test_zigzag_steps_after_the_first_do_half_a_block():
    for rank, step in itertools.product(range(4), range(1, 4)):
        (rows, cols, causal), = ring_block_plan(step, rank, 4, 8)
        assert not causal and len(range(8)[rows]) * len(range(8)[cols]) == 32


# ---- block kernels, merge, fully masked rows ----------------------------------------------------


def qkv(hq=4, hkv=2, t=8, d=4, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, h, t, d, generator=g, dtype=dtype) for h in (hq, hkv, hkv)]


def test_merge_of_key_blocks_equals_full_attention_and_masked_rows_change_nothing():
    q, k, v = qkv(t=8)
    ref_out, ref_lse = full_causal_reference(q, k, v)
    scale = 4 ** -0.5
    # Keys split in two blocks; the second masked causally by hand (positions 4..7).
    o1, l1 = torch_block_attention(q, k[:, :, :4], v[:, :, :4], scale,
                                   mask=torch.ones(8, 4, dtype=torch.bool).tril())
    o2, l2 = torch_block_attention(q, k[:, :, 4:], v[:, :, 4:], scale,
                                   mask=torch.ones(8, 4, dtype=torch.bool).tril(-4))
    assert torch.isneginf(l2[:, :, :4]).all() and (o2[:, :, :4] == 0).all()  # fully masked rows
    out, lse = merge_attention_partials(o1, l1, o2, l2)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-12)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=1e-12)
    # Merging a fully masked block is the identity; merging two gives (0, -inf), no NaN.
    empty_o, empty_l = torch.zeros_like(out), torch.full_like(lse, float("-inf"))
    same_o, same_l = merge_attention_partials(out, lse, empty_o, empty_l)
    assert torch.equal(same_o, out) and torch.equal(same_l, lse)
    none_o, none_l = merge_attention_partials(empty_o, empty_l, empty_o, empty_l)
    assert (none_o == 0).all() and torch.isneginf(none_l).all()


def test_block_backward_with_final_lse_sums_to_full_gradients():
    q, k, v = (t.requires_grad_() for t in qkv(t=8, seed=1))
    ref_out, _ = full_causal_reference(q, k, v)
    dout = torch.randn_like(ref_out)
    ref_out.backward(dout)
    with torch.no_grad():
        out, lse = full_causal_reference(q, k, v)
        scale = 4 ** -0.5
        # Block (queries 4..7, keys 0..3) unmasked + block (4..7, 4..7) causal + (0..3, 0..3) causal.
        blocks = [(slice(4, 8), slice(0, 4), False), (slice(4, 8), slice(4, 8), True), (slice(0, 4), slice(0, 4), True)]
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for rows, cols, causal in blocks:
            a, b, c = torch_block_attention_backward(dout[:, :, rows], q[:, :, rows], k[:, :, cols], v[:, :, cols],
                                                     out[:, :, rows], lse[:, :, rows], scale, causal)
            dq[:, :, rows] += a
            dk[:, :, cols] += b
            dv[:, :, cols] += c
    for got, want in ((dq, q.grad), (dk, k.grad), (dv, v.grad)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@pytest.mark.skipif(not fused_block_available(), reason="no CPU flash-attention op in this torch")
def test_fused_block_matches_torch_block():
    q, k, v = qkv(dtype=torch.float32, seed=2)
    for causal in (True, False):
        fo, fl = fused_block_attention(q, k, v, 0.5, causal)
        to, tl = torch_block_attention(q, k, v, 0.5, causal)
        torch.testing.assert_close(fo, to, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fl, tl, rtol=1e-5, atol=1e-6)
    assert resolve_block_kernel("auto", torch.device("cpu")).name == "fused"
    assert resolve_block_kernel("torch", torch.device("cpu")).name == "torch"


@pytest.mark.parametrize("kernel", ["torch", "auto"])
def test_ring_attention_on_one_rank_is_causal_attention(kernel):
    q, k, v = (t.requires_grad_() for t in qkv(t=6, seed=3))
    out, lse = ring_attention(q, k, v, AxisGroup.single("cp"), kernel=kernel, return_lse=True)
    ref_out, ref_lse = full_causal_reference(q, k, v)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-12)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=1e-12)
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), dout)
    want = torch.autograd.grad(ref_out, (q, k, v), dout)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_ulysses_head_rules_name_the_fields():
    assert ulysses_kv_replication(8, 4, 2) == 1
    assert ulysses_kv_replication(8, 2, 4) == 2
    assert ulysses_kv_replication(4, 1, 4) == 4
    with pytest.raises(ValueError, match=r"6 query heads .*model\.num_heads / parallel\.tp.* parallel\.cp=4"):
        ulysses_kv_replication(6, 6, 4)
    with pytest.raises(ValueError, match=r"3 K/V heads .*model\.num_kv_heads / parallel\.tp.* parallel\.cp=4"):
        ulysses_kv_replication(12, 3, 4)
