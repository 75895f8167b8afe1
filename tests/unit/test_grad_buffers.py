"""Bucket assignment (pure) and the reducer's bookkeeping in one process (a group of size 1).

The multi-rank reduction itself is tested in tests/multirank/test_grad_buffers.py.
"""
from __future__ import annotations

import pytest
import torch

from models import ModelConfig, build_model
from optim.grad_buffers import BucketedGradReducer, assign_buckets
from parallel_state.groups import AxisGroup
from parallel_state.params import set_param_meta


def test_assign_buckets_fills_in_order_and_closes_at_capacity():
    assert assign_buckets([3, 3, 3, 3], bucket_numel=6) == [[0, 1], [2, 3]]
    assert assign_buckets([3, 3, 3], bucket_numel=5) == [[0, 1], [2]]
    # A tensor larger than the capacity gets a bucket of its own; the rest keeps filling.
    assert assign_buckets([1, 100, 1, 1], bucket_numel=10) == [[0, 1], [2, 3]]
    assert assign_buckets([100, 1, 1], bucket_numel=10) == [[0], [1, 2]]
    assert assign_buckets([], bucket_numel=10) == []


def test_assign_buckets_splits_on_key_change():
    keys = ["f32", "f32", "bf16", "bf16", "f32"]
    assert assign_buckets([1] * 5, bucket_numel=100, keys=keys) == [[0, 1], [2, 3], [4]]


@pytest.mark.parametrize("numels,cap", [([5, 1, 7, 2, 2, 9, 1], 4), ([1] * 20, 3), ([50, 40, 30], 1000)])
def test_assign_buckets_is_a_partition_in_order(numels, cap):
    buckets = assign_buckets(numels, cap)
    assert [i for b in buckets for i in b] == list(range(len(numels)))
    for b in buckets[:-1]:  # every bucket but the last reached the capacity, none by more than its last tensor
        size = sum(numels[i] for i in b)
        assert size >= cap and size - numels[b[-1]] < cap


def test_assign_buckets_rejects_bad_capacity():
    with pytest.raises(ValueError, match="bucket_size_mb"):
        assign_buckets([1], bucket_numel=0)


def tiny_model(tied: bool = False):
    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, tie_embeddings=tied)
    return build_model(cfg, seed=0)


def batch(seed: int) -> torch.Tensor:
    return torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(seed))


def backward(model, tokens, scale: float = 1.0) -> None:
    (model.token_losses(tokens[:, :-1], tokens[:, 1:]).sum() * scale).backward()


def test_grads_are_bucket_views_and_accumulate_like_plain_autograd():
    model, reference = tiny_model(), tiny_model()
    reducer = BucketedGradReducer(model.parameters(), group=AxisGroup.single("dp_cp"), bucket_size_mb=0.01)
    assert reducer.num_buckets > 2
    for seed in (1, 2):  # two steps, each two microbatches
        with reducer.no_sync():
            backward(model, batch(10 * seed))
        backward(model, batch(10 * seed + 1))
        reducer.finish()
        reference.zero_grad(set_to_none=True)
        backward(reference, batch(10 * seed))
        backward(reference, batch(10 * seed + 1))
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-8, msg=name)
        assert reducer.last_launch_order == list(range(reducer.num_buckets))
        reducer.zero_grad()
    storages = {b.buffer.untyped_storage().data_ptr() for b in reducer.buckets}
    assert all(p.grad.untyped_storage().data_ptr() in storages for p in model.parameters())
    assert all(float(p.grad.abs().sum()) == 0.0 for p in model.parameters())


def test_buckets_hold_each_trainable_dense_param_once_in_backward_order():
    model = tiny_model(tied=True)
    params = list(model.parameters())
    model.norm.weight.requires_grad_(False)
    set_param_meta(params[1], expert=True)  # the first block's first parameter, as if it were an expert weight
    reducer = BucketedGradReducer(params + [model.output.weight], group=AxisGroup.single("dp_cp"), bucket_size_mb=0.01)
    held = [p for b in reducer.buckets for p in b.params]
    expected = [p for p in params if p.requires_grad and p is not params[1]][::-1]
    assert [id(p) for p in held] == [id(p) for p in expected]
    assert reducer.excluded == [params[1]]
    assert sum(b.buffer.numel() for b in reducer.buckets) == sum(p.numel() for p in expected)
    assert model.output.weight is model.embedding.weight  # tied: one parameter, one bucket slot


def test_set_to_none_between_steps_is_reported_with_the_fix():
    model = tiny_model()
    BucketedGradReducer(model.parameters(), group=AxisGroup.single("dp_cp"), bucket_size_mb=0.01)  # its hooks keep it alive
    model.zero_grad(set_to_none=True)
    with pytest.raises(RuntimeError, match=r"reducer.zero_grad\(\)"):
        backward(model, batch(0))


def test_bad_bucket_size_names_the_argument():
    with pytest.raises(ValueError, match="bucket_size_mb=0"):
        BucketedGradReducer(tiny_model().parameters(), group=AxisGroup.single("dp_cp"), bucket_size_mb=0)
