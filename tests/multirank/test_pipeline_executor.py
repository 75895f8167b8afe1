"""The pipeline executor on 2 and 4 gloo ranks against the one-process sequential run.

Toy model: an embedding-like first step taking a microbatch dict, 8 layers (even ones residual
h + tanh(W h + b), odd ones plain tanh(W h + b), so a chunk may end in an op that does or does not
save its output), a linear head and a summed cross-entropy with a token mask. Every process
builds the same full model from a seed; each pp rank runs the layers of its virtual stages
(split_layers). The test process runs all microbatches through the full model sequentially under
the same loss contract and compares the loss and every layer's gradient (fp32, rel 1e-5), and
checks the bytes each rank counted against 2 sends per microbatch per stage boundary.
"""
from __future__ import annotations

import pytest
import torch

from parallel_state.comm_stats import CommStats
from parallel_state.groups import AxisGroup, init
from parallel_state.topology import Topology
from trainer.pipeline.executor import forward_backward_pipelining
from trainer.pipeline.orders import pipeline_orders, split_layers

pytestmark = pytest.mark.xdist_group("rank_pool")

LAYERS, HIDDEN, VOCAB, SEQ, MBS = 8, 8, 11, 3, 2
REL = 1e-5


class ToyModel(torch.nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embed = torch.nn.Parameter(torch.randn(VOCAB, HIDDEN, generator=g))
        self.weights = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(HIDDEN, HIDDEN, generator=g) / HIDDEN ** 0.5)
                                              for _ in range(LAYERS))
        self.biases = torch.nn.ParameterList(torch.nn.Parameter(0.1 * torch.randn(HIDDEN, generator=g))
                                             for _ in range(LAYERS))
        self.head = torch.nn.Parameter(torch.randn(VOCAB, HIDDEN, generator=g) / HIDDEN ** 0.5)

    def layer(self, i: int, h: torch.Tensor) -> torch.Tensor:
        y = torch.tanh(h @ self.weights[i].T + self.biases[i])
        return h + y if i % 2 == 0 else y

    def chunk_fn(self, layer_ids: list[int], first: bool, last: bool):
        def run(x, mb):
            h = self.embed[mb["tokens"]] if first else x
            for i in layer_ids:
                h = self.layer(i, h)
            return h @ self.head.T if last else h
        return run


def loss_sum(logits: torch.Tensor, mb: dict) -> torch.Tensor:
    losses = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), mb["labels"].reshape(-1), reduction="none")
    return (losses * mb["mask"].reshape(-1)).sum()


def make_microbatches(num: int, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"tokens": torch.randint(0, VOCAB, (MBS, SEQ), generator=g),
             "labels": torch.randint(0, VOCAB, (MBS, SEQ), generator=g),
             "mask": (torch.rand(MBS, SEQ, generator=g) > 0.3).float()} for _ in range(num)]


def grads_of(model: ToyModel, layer_ids: list[int], first: bool, last: bool) -> dict[str, torch.Tensor]:
    out = {}
    for i in layer_ids:
        out[f"w{i}"], out[f"b{i}"] = model.weights[i].grad.clone(), model.biases[i].grad.clone()
    if first:
        out["embed"] = model.embed.grad.clone()
    if last:
        out["head"] = model.head.grad.clone()
    return out


def run_pipeline(pp: AxisGroup, vpp: int, num_mb: int, forward_only: bool = False):
    """One step on this rank; returns (loss sum, its grads by name, bytes it sent)."""
    P, r = pp.size, pp.rank
    model = ToyModel()
    stages = split_layers(LAYERS, P, vpp)
    last = P * vpp - 1
    mine = [c * P + r for c in range(vpp)]
    chunks = [model.chunk_fn(stages[s], s == 0, s == last) for s in mine]
    microbatches = make_microbatches(num_mb)
    num_tokens = sum(mb["mask"].sum() for mb in microbatches)
    stats = pp.stats or CommStats()  # the groups' own counters
    stats.reset()
    total = forward_backward_pipelining(pipeline_orders(P, vpp, num_mb), chunks, microbatches, loss_sum,
                                        num_tokens, pp, vpp, (MBS, SEQ, HIDDEN), torch.float32, "cpu", forward_only=forward_only)
    grads = {}
    if not forward_only:
        for s in mine:
            grads.update(grads_of(model, stages[s], s == 0, s == last))
    else:
        assert all(p.grad is None for p in model.parameters())
    return float(total), grads, stats.total(op="send", group="pp"), stats.calls.get(("send", "pp"), 0)


def reference(num_mb: int):
    model = ToyModel()
    microbatches = make_microbatches(num_mb)
    num_tokens = sum(mb["mask"].sum() for mb in microbatches)
    full = model.chunk_fn(list(range(LAYERS)), True, True)
    total = 0.0
    for mb in microbatches:
        loss = loss_sum(full(mb, mb), mb)
        (loss / num_tokens).backward()
        total += float(loss.detach())
    return total, grads_of(model, list(range(LAYERS)), True, True)


def cases(P: int) -> list[tuple[int, int]]:
    return [(vpp, m) for vpp in (1, 2) for m in (P, 2 * P, 3 * P)]


def rank_main(world: int, P: int):
    """Every (vpp, M) case for pp = P on a world of `world` ranks (dp = world / P)."""
    ps = init(Topology(world, pp=P))
    try:
        results = {case: run_pipeline(ps.pp, *case) for case in cases(P)}
        results["forward_only"] = run_pipeline(ps.pp, 2, 2 * P, forward_only=True)
        return ps.pp.rank, results
    finally:
        ps.destroy()


def check(per_rank, P: int) -> None:
    act_bytes = MBS * SEQ * HIDDEN * 4
    for case in cases(P):
        vpp, num_mb = case
        want_loss, want_grads = reference(num_mb)
        got_grads: dict[str, torch.Tensor] = {}
        losses = []
        for pp_rank, results in per_rank:
            loss, grads, sent, calls = results[case]
            losses.append(loss)
            got_grads.update(grads)
            # Rank r sends an activation from each of its stages but the last virtual one and a
            # gradient from each but virtual stage 0, once per microbatch.
            owned = [c * P + pp_rank for c in range(vpp)]
            boundaries = sum(s < P * vpp - 1 for s in owned) + sum(s > 0 for s in owned)
            assert sent == boundaries * num_mb * act_bytes, (case, pp_rank, sent)
            assert calls == boundaries * num_mb, (case, pp_rank, calls)
        last_ranks = [i for i, (pp_rank, _) in enumerate(per_rank) if pp_rank == P - 1]
        for i, loss in enumerate(losses):
            assert loss == pytest.approx(want_loss if i in last_ranks else 0.0, rel=REL), (case, i)
        assert set(got_grads) == set(want_grads)
        for name, g in want_grads.items():
            torch.testing.assert_close(got_grads[name], g, rtol=REL, atol=REL * g.abs().max().item(),
                                       msg=lambda m, n=name, c=case: f"{c} {n}: {m}")
    want_loss, _ = reference(2 * P)
    for pp_rank, results in per_rank:
        loss, _, sent, _ = results["forward_only"]
        assert loss == pytest.approx(want_loss if pp_rank == P - 1 else 0.0, rel=REL)
        owned = [c * P + pp_rank for c in range(2)]  # forward only: activations, no gradients
        assert sent == sum(s < 2 * P - 1 for s in owned) * 2 * P * act_bytes


@pytest.mark.parametrize("world,P", [(2, 2), (4, 4), (4, 2)])
def test_pipeline_matches_sequential(rank_pools, world, P):
    check(rank_pools.get(world).run(rank_main, world, P), P)


def test_single_rank_interleaved_hands_over_locally():
    """P = 1 with two chunks: stage 0 -> 1 stays in the process (no torch.distributed needed)."""
    pp = AxisGroup(name="pp", group=None, ranks=(0,), rank=0)
    loss, grads, sent, _ = run_pipeline(pp, 2, 3)
    want_loss, want_grads = reference(3)
    assert loss == pytest.approx(want_loss, rel=REL)
    assert sent == 0
    for name, g in want_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=REL, atol=REL * g.abs().max().item())


def test_split_layers():
    assert split_layers(8, 2, 2) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert split_layers(5, 2, 1, explicit=[3, 2]) == [[0, 1, 2], [3, 4]]
    with pytest.raises(ValueError, match="num_layers=6 does not split evenly over pp=2 x vpp=2"):
        split_layers(6, 2, 2)
    with pytest.raises(ValueError, match="4 non-negative entries summing to num_layers=6"):
        split_layers(6, 2, 2, explicit=[2, 2, 2])


def test_sent_output_storage_is_released():
    """After its send, a chunk's output keeps only its graph (a one-element placeholder tensor)."""
    pp = AxisGroup(name="pp", group=None, ranks=(0,), rank=0)
    linear = torch.nn.Linear(4, 4)
    outputs, seen = [], []

    def first(mb, _):
        out = mb["x"] + torch.tanh(linear(mb["x"]))  # an add does not keep its own result
        outputs.append(out)
        return out

    def second(x, _):
        seen.append(outputs[-1].numel())
        return torch.tanh(linear(x))

    microbatches = [{"x": torch.randn(2, 4)} for _ in range(2)]
    forward_backward_pipelining(pipeline_orders(1, 2, 2), [first, second], microbatches,
                                lambda out, mb: out.sum(), 1.0, pp, 2, (2, 4), torch.float32, "cpu")
    assert seen == [1, 1]
    assert linear.weight.grad is not None
