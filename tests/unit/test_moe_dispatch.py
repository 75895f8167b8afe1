"""Token dispatchers in one process: dispatch, then combine with identity experts, gives sum_j w_j x.

The dispatched rows must be expert-major (each expert's slots in token order, then choice order;
zero rows after them up to the block size when padded), `launch(...).wait()` must equal
`dispatch`, and `combine(rows)` must return, for every token, the weighted sum of its active slots
of the token itself: out[t] = sum_j active[t, j] * weight[t, j] * x[t].
"""
from __future__ import annotations

import pytest
import torch

from moe import MoEContext
from moe.dispatcher import make_dispatcher
from moe.router import Routing, apply_capacity, capacity_of

NUM_TOKENS, K, NUM_EXPERTS, HIDDEN = 24, 2, 4, 5


def make_routing(mode: str, seed: int = 0) -> tuple[Routing, int | None]:
    """A routing of NUM_TOKENS tokens and the padded block size (None when not padded).

    mode: "topk" (every slot active), "sparse" (some slots inactive, as BlockFFN makes them),
    "capacity" (over-capacity slots dropped), "padded" (dropped, and blocks padded to the capacity).
    """
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(NUM_TOKENS, NUM_EXPERTS, generator=g, dtype=torch.float64)
    weight, expert = scores.topk(K, dim=-1)
    active = torch.ones_like(expert, dtype=torch.bool)
    if mode == "sparse":
        active = torch.rand(expert.shape, generator=g) > 0.3
    block_rows = None
    if mode in ("capacity", "padded"):
        capacity = capacity_of(NUM_TOKENS, K, NUM_EXPERTS, 0.7)
        active = apply_capacity(expert, weight, active, NUM_EXPERTS, capacity, "probs")
        assert not active.all()  # the case really drops
        block_rows = capacity if mode == "padded" else None
    logits = scores.log()
    return Routing(expert=expert, weight=weight, active=active, logits=logits, aux_probs=scores), block_rows


def expected_rows(x: torch.Tensor, routing: Routing, block_rows: int | None) -> tuple[torch.Tensor, list[int]]:
    """Expert-major rows by a plain loop: each expert's active slots in (token, choice) order."""
    blocks, rows_per_expert = [], []
    for e in range(NUM_EXPERTS):
        mine = [x[t] for t in range(NUM_TOKENS) for j in range(K)
                if routing.active[t, j] and routing.expert[t, j] == e]
        if block_rows is not None:
            mine += [torch.zeros(HIDDEN, dtype=x.dtype)] * (block_rows - len(mine))
        blocks += mine
        rows_per_expert.append(len(mine))
    return torch.stack(blocks) if blocks else x.new_zeros((0, HIDDEN)), rows_per_expert


MODES = ["topk", "sparse", "capacity", "padded"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["alltoall", "allgather"])
def test_dispatch_is_expert_major_and_combine_of_identity_weights_the_tokens(kind, mode):
    routing, block_rows = make_routing(mode)
    dispatcher = make_dispatcher(kind, NUM_EXPERTS, MoEContext())
    x = torch.randn(NUM_TOKENS, HIDDEN, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    rows, meta = dispatcher.dispatch(x, routing, block_rows)
    want_rows, want_counts = expected_rows(x, routing, block_rows)
    assert meta.rows_per_expert == want_counts
    torch.testing.assert_close(rows, want_rows, rtol=0, atol=0)

    out = dispatcher.combine(rows, meta)  # identity experts
    want = ((routing.weight * routing.active).unsqueeze(-1) * x.unsqueeze(1)).sum(1)
    assert out.dtype == x.dtype
    torch.testing.assert_close(out, want, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("kind", ["alltoall", "allgather"])
def test_launch_then_wait_equals_dispatch(kind):
    routing, block_rows = make_routing("padded", seed=3)
    dispatcher = make_dispatcher(kind, NUM_EXPERTS, MoEContext())
    x = torch.randn(NUM_TOKENS, HIDDEN, dtype=torch.float64)
    rows, meta = dispatcher.dispatch(x, routing, block_rows)
    rows_later, meta_later = dispatcher.launch(x, routing, block_rows).wait()
    torch.testing.assert_close(rows_later, rows, rtol=0, atol=0)
    assert meta_later.rows_per_expert == meta.rows_per_expert


@pytest.mark.parametrize("kind", ["alltoall", "allgather"])
def test_gradients_flow_to_tokens_and_weights(kind):
    """d out / d x and d out / d weight of dispatch -> (2 * rows) -> combine, against the closed form."""
    routing, _ = make_routing("sparse", seed=5)
    routing.weight.requires_grad_()
    dispatcher = make_dispatcher(kind, NUM_EXPERTS, MoEContext())
    x = torch.randn(NUM_TOKENS, HIDDEN, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(NUM_TOKENS, HIDDEN, dtype=torch.float64)
    rows, meta = dispatcher.dispatch(x, routing)
    (dispatcher.combine(2 * rows, meta) * grad_out).sum().backward()
    masked = routing.weight.detach() * routing.active
    torch.testing.assert_close(x.grad, 2 * masked.sum(1, keepdim=True) * grad_out, rtol=1e-14, atol=1e-14)
    want_weight_grad = 2 * (grad_out * x.detach()).sum(-1, keepdim=True) * routing.active
    torch.testing.assert_close(routing.weight.grad, want_weight_grad, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("kind", ["alltoall", "allgather"])
def test_no_active_slot_and_no_token(kind):
    dispatcher = make_dispatcher(kind, NUM_EXPERTS, MoEContext())
    routing, _ = make_routing("topk")
    routing.active = torch.zeros_like(routing.active)
    x = torch.randn(NUM_TOKENS, HIDDEN, dtype=torch.float64)
    rows, meta = dispatcher.dispatch(x, routing)
    assert rows.shape == (0, HIDDEN) and meta.rows_per_expert == [0] * NUM_EXPERTS
    assert torch.equal(dispatcher.combine(rows, meta), torch.zeros_like(x))
    empty = Routing(expert=routing.expert[:0], weight=routing.weight[:0], active=routing.active[:0],
                    logits=routing.logits[:0], aux_probs=None)
    rows, meta = dispatcher.dispatch(x[:0], empty)
    assert dispatcher.combine(rows, meta).shape == (0, HIDDEN)
