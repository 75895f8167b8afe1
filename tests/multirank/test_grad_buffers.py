"""The bucketed DP gradient reducer on 2 and 4 gloo ranks, against the plain flat all-reduce and one process.

Each rank trains the same tiny model on its own data, 2 microbatches per step, loss normalised by
the global token count (the loss contract). The reduced gradients must equal (fp32, rel 1e-6)
the plain post-backward flat all-reduce of optim/grad_sync.py on the same rank and the sum the
test process computes by running every rank's microbatches itself. Also checked: every bucket
launched once per step in order, nothing sent during the non-last microbatch, the first buckets
launched before backward reaches the embedding (overlap), a layer used on rank 0 only still
reduced, the tied embedding held once, and the bytes counted per bucket.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from models import ModelConfig, build_model
from optim.grad_buffers import BucketedGradReducer
from optim.grad_sync import allreduce_gradients
from parallel_state.groups import init
from parallel_state.topology import Topology

pytestmark = pytest.mark.xdist_group("rank_pool")

MICROBATCHES = 2
BATCH, SEQ = 2, 8
BUCKET_MB = 0.02  # ~5k fp32 elements: the tiny model splits into several buckets
STEPS = 2


def tiny_model(tied: bool):
    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, tie_embeddings=tied)
    return build_model(cfg, seed=0)


def microbatch(step: int, rank: int, index: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * step + 10 * rank + index)
    return torch.randint(0, 64, (BATCH, SEQ + 1), generator=g)


def loss_sum(model, tokens: torch.Tensor, skip_layer1: bool) -> torch.Tensor:
    """Summed token losses; `skip_layer1` runs the model without its second block (unused params)."""
    if not skip_layer1:
        return model.token_losses(tokens[:, :-1], tokens[:, 1:]).sum()
    hidden = model.layers["0"](model.embedding(tokens[:, :-1]))
    logits = model.output(model.norm(hidden))
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), reduction="sum")


def global_tokens(world: int) -> float:
    return float(world * MICROBATCHES * BATCH * SEQ)


def flat_grads(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters()]).clone()


def on_rank(tied: bool, layer1_on_rank0_only: bool) -> dict:
    n, rank = dist.get_world_size(), dist.get_rank()
    ps = init(Topology(n))
    skip = layer1_on_rank0_only and rank != 0
    model, plain = tiny_model(tied), tiny_model(tied)
    stats = ps.stats  # the groups' own counters
    stats.reset()
    reducer = BucketedGradReducer(list(model.parameters()) + [model.output.weight], ps.dp_cp,
                                  bucket_size_mb=BUCKET_MB)
    # Overlap marker: how many buckets were launched when backward reaches the embedding output.
    launched_at_embedding: list[int] = []

    def mark_embedding_output(module, args, output) -> None:
        output.register_hook(lambda grad: launched_at_embedding.append(len(reducer.launch_order)))

    model.embedding.register_forward_hook(mark_embedding_output)

    out = {"steps": [], "bucket_bytes": [b.nbytes for b in reducer.buckets], "num_buckets": reducer.num_buckets,
           "held_numel": sum(b.buffer.numel() for b in reducer.buckets), "model_numel": model.num_parameters()}
    for step in range(STEPS):
        stats.reset()
        launched_at_embedding.clear()
        plain.zero_grad(set_to_none=True)
        sent_before_last = None
        for index in range(MICROBATCHES):
            tokens = microbatch(step, rank, index)
            last = index == MICROBATCHES - 1
            reducer.sync_enabled = last
            (loss_sum(model, tokens, skip) / global_tokens(n)).backward()
            (loss_sum(plain, tokens, skip) / global_tokens(n)).backward()
            if not last:
                sent_before_last = (dict(stats.calls), list(reducer.launch_order))
        launched_in_backward = len(reducer.launch_order)
        reducer.finish()
        with stats.paused():  # the reference's all-reduce is not the reducer's traffic
            allreduce_gradients(plain.parameters(), ps.dp_cp)
        out["steps"].append({
            "grads": flat_grads(model), "plain": flat_grads(plain), "sent_before_last": sent_before_last,
            "launch_order": reducer.last_launch_order, "launched_in_backward": launched_in_backward,
            "launched_at_embedding": list(launched_at_embedding),
            "calls": dict(stats.calls), "bytes": dict(stats.bytes_sent)})
        reducer.zero_grad()
    ps.destroy()
    return out


def one_process_sums(world: int, tied: bool, layer1_on_rank0_only: bool) -> list[torch.Tensor]:
    """Per step, the flat gradient of every rank's microbatches summed by this process alone."""
    model = tiny_model(tied)
    sums = []
    for step in range(STEPS):
        model.zero_grad(set_to_none=True)
        for rank in range(world):
            for index in range(MICROBATCHES):
                skip = layer1_on_rank0_only and rank != 0
                (loss_sum(model, microbatch(step, rank, index), skip) / global_tokens(world)).backward()
        sums.append(flat_grads(model))
    return sums


def assert_close_fp32(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    # rel 1e-6 elementwise, with an absolute floor at 1e-6 of the largest entry for near-zero sums.
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6 * float(expected.abs().max()), msg=what)


@pytest.mark.parametrize("world,tied,layer1_on_rank0_only",
                         [(2, False, False), (2, True, True), (4, True, False), (4, False, True)])
def test_bucketed_reduction_matches_flat_allreduce_and_one_process(rank_pools, world, tied, layer1_on_rank0_only):
    results = rank_pools.get(world).run(on_rank, tied, layer1_on_rank0_only)
    references = one_process_sums(world, tied, layer1_on_rank0_only)
    ring = 2 * (world - 1) / world
    for rank, r in enumerate(results):
        num_buckets = r["num_buckets"]
        assert num_buckets >= 3
        assert r["held_numel"] == r["model_numel"]  # a tied matrix is held (and reduced) once
        for step, s in enumerate(r["steps"]):
            where = f"rank {rank} step {step}"
            assert_close_fp32(s["grads"], s["plain"], f"bucketed vs flat all-reduce, {where}")
            assert_close_fp32(s["grads"], references[step], f"bucketed vs one process, {where}")
            assert s["sent_before_last"] == ({}, []), f"communication in a non-last microbatch, {where}"
            assert s["launch_order"] == list(range(num_buckets)), where  # each bucket once, in order
            assert s["calls"] == {("all_reduce", "dp_cp"): num_buckets}, where
            assert s["bytes"] == {("all_reduce", "dp_cp"): pytest.approx(ring * sum(r["bucket_bytes"]))}, where
            skipped = layer1_on_rank0_only and rank != 0
            if not skipped:
                # Overlap: buckets went out during backward, before it reached the embedding.
                assert s["launched_at_embedding"] and s["launched_at_embedding"][-1] >= 1, where
                assert s["launched_in_backward"] == num_buckets, where
            else:
                # Unused params block the strictly ordered hook launches; finish() sends the rest.
                assert s["launched_in_backward"] < num_buckets, where
    for r in results[1:]:  # replicas hold bit-identical gradients
        assert all(torch.equal(a["grads"], b["grads"]) for a, b in zip(r["steps"], results[0]["steps"]))
