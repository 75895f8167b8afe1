"""Tensor-parallel MLA against the one-process layer, on 2 and 4 gloo ranks, with and without SP.

The layer is built on meta with a TPContext over tp ranks, materialised from the reference's
seed and run forward and backward on the reference's input (under SP each rank gets its sequence
chunk). Checked: each rank's init is its exact slice of the one-process weights; outputs, input
gradients and the absorbed form equal the reference; the gathered parameter gradients equal the
reference after the TP grad sync, which covers exactly the replicated down-projections and latent
norms; the layer sends one collective each way; FLOPs describe the full layer.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from models.config import MLAConfig, ModelConfig
from models.init import materialize
from models.layers.mla import MultiHeadLatentAttention
from models.layers.tensor_parallel import TPContext
from models.parallel_context import ParallelContext
from optim.step import allreduce_tp_partial_grads
from parallel_state.groups import init
from parallel_state.params import param_meta, tp_partial_grad_params
from parallel_state.topology import Topology

pytestmark = pytest.mark.xdist_group("rank_pool")

SEED = 13
B, T, HIDDEN = 2, 16, 32
FP32 = 4
REPLICATED = {16: ["wq_down.weight", "q_norm.weight", "wkv_down.weight", "kv_norm.weight"],
              0: ["wkv_down.weight", "kv_norm.weight"]}


def mla_cfg(q_lora_rank: int) -> ModelConfig:
    mla = MLAConfig(q_lora_rank=q_lora_rank, kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6)
    return ModelConfig(vocab_size=32, hidden_size=HIDDEN, num_layers=2, num_heads=4, token_mixers=["mla"], mla=mla)


def build(q_lora_rank: int, tp: TPContext | None) -> MultiHeadLatentAttention:
    with torch.device("meta"):
        layer = MultiHeadLatentAttention(mla_cfg(q_lora_rank), ParallelContext(tp=tp or TPContext()))
    return materialize(layer, SEED)


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(17)
    return torch.randn(B, T, HIDDEN, generator=g), torch.randn(B, T, HIDDEN, generator=g)


def on_rank(q_lora_rank: int, sp: bool) -> dict:
    n = dist.get_world_size()
    ps = init(Topology(n, tp=n))
    stats = ps.stats
    layer = build(q_lora_rank, TPContext(ps.tp, sp))
    init_params = {name: p.detach().clone() for name, p in layer.named_parameters()}
    x, g = inputs()
    if sp:
        x, g = x.chunk(n, 1)[ps.tp.rank], g.chunk(n, 1)[ps.tp.rank]
    with torch.no_grad():
        absorbed = layer.absorbed(x)
    x = x.requires_grad_()
    stats.reset()
    out = layer(x)
    forward_bytes = dict(stats.bytes_sent)
    stats.reset()
    out.backward(g)
    backward_bytes = dict(stats.bytes_sent)
    allreduce_tp_partial_grads(layer.parameters(), ps.tp)
    ps.destroy()
    return {"init": init_params, "out": out.detach(), "absorbed": absorbed, "x_grad": x.grad,
            "grads": {name: p.grad.clone() for name, p in layer.named_parameters()},
            "shards": {name: param_meta(p).shard for name, p in layer.named_parameters()},
            "synced": [name for name, p in layer.named_parameters() if tp_partial_grad_params([p])],
            "forward": forward_bytes, "backward": backward_bytes, "flops": layer.flops_per_token(T)}


def gather(results: list[dict], key: str, name: str) -> torch.Tensor:
    shard = results[0]["shards"][name]
    if shard is None:
        return results[0][key][name]
    return torch.cat([r[key][name] for r in results], shard[0])


@pytest.mark.parametrize("q_lora_rank", [16, 0], ids=["q-latent", "q-direct"])
@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("sp", [False, True], ids=["nosp", "sp"])
def test_tp_mla_matches_one_process(rank_pools, q_lora_rank, n, sp):
    results = rank_pools.get(n).run(on_rank, q_lora_rank, sp)
    ref = build(q_lora_rank, None)
    x, g = inputs()
    x = x.requires_grad_()
    ref_out = ref(x)
    ref_out.backward(g)
    ref_params = dict(ref.named_parameters())

    assert set(results[0]["grads"]) == set(ref_params)
    for name, param in ref_params.items():
        torch.testing.assert_close(gather(results, "init", name), param.detach(), rtol=0, atol=0, msg=name)
        torch.testing.assert_close(gather(results, "grads", name), param.grad, rtol=1e-5, atol=1e-6,
                                   msg=f"grad of {name}")
        if results[0]["shards"][name] is None:  # replicas stay identical after the TP grad sync
            assert all(torch.equal(r["grads"][name], results[0]["grads"][name]) for r in results), name
    for key, want in (("out", ref_out.detach()), ("absorbed", ref_out.detach()), ("x_grad", x.grad)):
        got = [r[key] for r in results]
        for value in [torch.cat(got, 1)] if sp else got:
            torch.testing.assert_close(value, want, rtol=1e-5, atol=1e-6, msg=key)

    full, ring = B * T * HIDDEN * FP32, (n - 1) / n
    if sp:
        expected = {("all_gather", "tp"): ring * full, ("reduce_scatter", "tp"): ring * full}
    else:
        expected = {("all_reduce", "tp"): 2 * ring * full}
    for r in results:
        assert r["forward"] == pytest.approx(expected)
        assert r["backward"] == pytest.approx(expected)
        assert sorted(r["synced"]) == sorted(REPLICATED[q_lora_rank])
        assert r["flops"] == ref.flops_per_token(T)
