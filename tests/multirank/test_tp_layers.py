"""Tensor-parallel layers against the one-process model: init, outputs, gradients and bytes sent.

The TP decoder layer below (attention with heads split over TP, GQA with kv_heads < tp by K/V
replication, SwiGLU MLP, with and without sequence parallelism) is built only from the library
pieces (ColumnParallelLinear, RowParallelLinear, collectives); it uses the parameter names of
models.block.DecoderBlock, so models.init.materialize gives it slices of the same full weights.
It is the blueprint for wiring TP into models/layers/attention.py and mlp.py.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from models.config import ModelConfig
from models.init import materialize, normal_init
from models.layers.attention import repeat_kv_heads
from models.layers.norm import RMSNorm
from models.layers.rope import RotaryEmbedding, apply_rotary
from models.layers.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    TPContext,
    divide_exactly,
)
from models.layers.vocab_parallel import (
    IGNORE_INDEX,
    VocabParallelEmbedding,
    VocabParallelLMHead,
    padded_vocab_size,
    vocab_parallel_cross_entropy,
    vocab_range,
)
from optim.step import allreduce_tp_partial_grads
from parallel_state.collectives import (
    gather_from_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)
from parallel_state.comm_stats import CommStats
from parallel_state.groups import AxisGroup, init
from parallel_state.params import is_tp_duplicate, param_meta, set_param_meta, tp_partial_grad_params
from parallel_state.topology import Topology

pytestmark = pytest.mark.xdist_group("rank_pool")

ONE_RANK = AxisGroup.single("tp")  # no tensor parallelism

SEED = 7
B, T = 2, 8
FP32 = 4


def tiny_cfg(num_kv_heads: int = 2) -> ModelConfig:
    return ModelConfig(vocab_size=32, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=num_kv_heads,
                       ffn_hidden_size=64, max_position_embeddings=64)


# ---- the TP decoder layer (test blueprint) -------------------------------------------------------


class TPAttention(nn.Module):
    """Query heads split over TP; K/V heads split too when tp divides kv_heads, else replicated."""

    def __init__(self, cfg: ModelConfig, tp, sp: bool):
        super().__init__()
        n, r = tp.size, tp.rank
        self.head_dim = cfg.head_dim
        self.heads_per_rank = divide_exactly(cfg.num_heads, n, "model.num_heads")
        std, out_std = cfg.init_std, cfg.init_std / math.sqrt(2 * cfg.num_layers)
        hidden, kv_width = cfg.hidden_size, cfg.kv_heads * cfg.head_dim
        self.wq = ColumnParallelLinear(hidden, cfg.num_heads * cfg.head_dim, tp, init=normal_init(std),
                                       sequence_parallel=sp)
        if cfg.kv_heads % n == 0:
            kv_tp, self.kv_select = tp, None
        elif n % cfg.kv_heads == 0:
            # Every rank holds all K/V heads and reads the one its query heads share.
            kv_tp, self.kv_select = AxisGroup.single("tp"), r * cfg.kv_heads // n
        else:
            raise ValueError(f"model.num_kv_heads={cfg.kv_heads} and parallel.tp={n}: one must divide the other")
        self.wk = ColumnParallelLinear(hidden, kv_width, kv_tp, init=normal_init(std))
        self.wv = ColumnParallelLinear(hidden, kv_width, kv_tp, init=normal_init(std))
        if self.kv_select is not None:
            for weight in (self.wk.weight, self.wv.weight):
                set_param_meta(weight, tp_partial_grad=True)
        self.wo = RowParallelLinear(cfg.num_heads * cfg.head_dim, hidden, tp, init=normal_init(out_std),
                                    sequence_parallel=sp)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)

    def init_specs(self):
        return {}  # the projections declare their own

    def forward(self, x):
        x = self.wq.prepare_input(x)  # one input collective for q, k and v
        batch, seq_len, _ = x.shape
        q = self.wq(x, input_prepared=True).view(batch, seq_len, -1, self.head_dim).transpose(1, 2)
        k = self.wk(x, input_prepared=True).view(batch, seq_len, -1, self.head_dim).transpose(1, 2)
        v = self.wv(x, input_prepared=True).view(batch, seq_len, -1, self.head_dim).transpose(1, 2)
        if self.kv_select is not None:
            k, v = k[:, self.kv_select:self.kv_select + 1], v[:, self.kv_select:self.kv_select + 1]
        cos, sin = self.rope(torch.arange(seq_len).unsqueeze(0))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        groups = q.shape[1] // k.shape[1]
        out = F.scaled_dot_product_attention(q, repeat_kv_heads(k, groups), repeat_kv_heads(v, groups),
                                             is_causal=True)
        return self.wo(out.transpose(1, 2).reshape(batch, seq_len, -1))


class TPMLP(nn.Module):
    """SwiGLU with gate/up column-parallel and down row-parallel (Llama names w1, w3, w2)."""

    def __init__(self, cfg: ModelConfig, ctx: TPContext):
        super().__init__()
        ffn, std = cfg.resolved_ffn_hidden_size(), cfg.init_std
        out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
        self.w1 = ctx.column(cfg.hidden_size, ffn, normal_init(std))
        self.w3 = ctx.column(cfg.hidden_size, ffn, normal_init(std))
        self.w2 = ctx.row(ffn, cfg.hidden_size, normal_init(out_std))

    def forward(self, x):
        x = self.w1.prepare_input(x)
        return self.w2(F.silu(self.w1(x, input_prepared=True)) * self.w3(x, input_prepared=True))


class TPBlock(nn.Module):
    """Pre-norm block; under SP its input, norms and residuals are this rank's sequence chunk."""

    def __init__(self, cfg: ModelConfig, tp, sp: bool):
        super().__init__()
        self.token_mixer_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.attention = TPAttention(cfg, tp, sp)
        self.channel_mixer_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        ctx = TPContext(tp, sp)
        self.mlp = TPMLP(cfg, ctx)
        ctx.mark_sequence_parallel(self.token_mixer_norm.weight, self.channel_mixer_norm.weight)

    def forward(self, x):
        h = x + self.attention(self.token_mixer_norm(x))
        return h + self.mlp(self.channel_mixer_norm(h))


def reference_block(cfg: ModelConfig) -> nn.Module:
    from models.block import DecoderBlock
    from models.spec import LayerSpec

    with torch.device("meta"):
        block = DecoderBlock(cfg, LayerSpec("attention", "mlp", "standard"))
    return materialize(block, SEED)


def block_inputs(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return (torch.randn(B, T, cfg.hidden_size, generator=g), torch.randn(B, T, cfg.hidden_size, generator=g))


def block_on_rank(num_kv_heads: int, sp: bool) -> dict:
    """Init, forward, backward, grad sync of the TP block; bytes per phase; params and grads."""
    n = dist.get_world_size()
    ps = init(Topology(n, tp=n))
    cfg = tiny_cfg(num_kv_heads)
    stats = ps.stats  # the groups' own counters
    stats.reset()
    with torch.device("meta"):
        block = TPBlock(cfg, ps.tp, sp)
    materialize(block, SEED)
    init_params = {name: p.detach().clone() for name, p in block.named_parameters()}
    x, g = block_inputs(cfg)
    if sp:
        x, g = x.chunk(n, 1)[ps.tp.rank], g.chunk(n, 1)[ps.tp.rank]
    x.requires_grad_()
    out = block(x)
    forward_bytes = dict(stats.bytes_sent)
    stats.reset()
    out.backward(g)
    backward_bytes = dict(stats.bytes_sent)
    stats.reset()
    allreduce_tp_partial_grads(block.parameters(), ps.tp)
    sync_bytes = dict(stats.bytes_sent)
    synced_numel = sum(p.numel() for p in tp_partial_grad_params(block.parameters()))
    grads = {name: p.grad.clone() for name, p in block.named_parameters()}
    shards = {name: param_meta(p).shard for name, p in block.named_parameters()}
    duplicates = [name for name, p in block.named_parameters() if is_tp_duplicate(p, ps.tp.rank)]
    # Global grad norm: each rank sums the squares of what it owns, one all-reduce over TP.
    owned_sq = sum(p.grad.double().square().sum() for p in block.parameters() if not is_tp_duplicate(p, ps.tp.rank))
    dist.all_reduce(owned_sq, group=ps.tp.group)
    ps.destroy()
    return {"init": init_params, "out": out.detach(), "x_grad": x.grad, "grads": grads, "shards": shards,
            "forward": forward_bytes, "backward": backward_bytes, "sync": sync_bytes,
            "synced_numel": synced_numel, "duplicates": duplicates, "grad_norm": owned_sq.sqrt().item()}


def gather_param(results: list[dict], key: str, name: str) -> torch.Tensor:
    """The full tensor from every rank's slice (or rank 0's copy of a replicated one)."""
    shard = results[0]["shards"][name]
    if shard is None:
        return results[0][key][name]
    dim = shard[0]
    assert [r["shards"][name] for r in results] == [(dim, i, len(results)) for i in range(len(results))]
    return torch.cat([r[key][name] for r in results], dim)


def analytic_block_bytes(cfg: ModelConfig, n: int, sp: bool) -> tuple[dict, dict]:
    """Bytes one rank sends per layer (ring convention) in forward and in backward.

    A = B*T*hidden*4 (the full activation). No SP: one all-reduce per Row output forward and per
    Column input backward, 2 (n-1)/n A each. SP: the all-reduce splits into an all-gather and a
    reduce-scatter, (n-1)/n A each, in both directions: the same total.
    """
    full = B * T * cfg.hidden_size * FP32
    ring = (n - 1) / n
    if not sp:
        per_pass = {("all_reduce", "tp"): 2 * (2 * ring * full)}
        return per_pass, dict(per_pass)
    per_pass = {("all_gather", "tp"): 2 * ring * full, ("reduce_scatter", "tp"): 2 * ring * full}
    return per_pass, dict(per_pass)


@pytest.mark.parametrize("n,num_kv_heads", [(2, 2), (4, 2), (4, 4)], ids=["tp2-kv2", "tp4-kv2-replicated", "tp4-kv4"])
@pytest.mark.parametrize("sp", [False, True], ids=["nosp", "sp"])
def test_tp_block_matches_one_process(rank_pools, n, num_kv_heads, sp):
    cfg = tiny_cfg(num_kv_heads)
    results = rank_pools.get(n).run(block_on_rank, num_kv_heads, sp)
    ref = reference_block(cfg)
    ref_init = {name: p.detach().clone() for name, p in ref.named_parameters()}
    x, g = block_inputs(cfg)
    x.requires_grad_()
    ref_out = ref(x, None)
    ref_out.backward(g)
    ref_grads = {name: p.grad for name, p in ref.named_parameters()}

    assert set(results[0]["grads"]) == set(ref_grads)
    for name, ref_grad in ref_grads.items():
        # Init: every rank holds exactly its slice of the one-process weights.
        torch.testing.assert_close(gather_param(results, "init", name), ref_init[name], rtol=0, atol=0, msg=name)
        torch.testing.assert_close(gather_param(results, "grads", name), ref_grad, rtol=1e-5, atol=1e-7,
                                   msg=f"grad of {name}")
        if results[0]["shards"][name] is None:  # replicas stay identical (after the TP grad sync)
            assert all(torch.equal(r["grads"][name], results[0]["grads"][name]) for r in results), name
    assert_outputs_match(results, ref_out, x.grad, sp, x_grad_atol=1e-7)

    # Communication accounting: the analytic TP(+SP) volume per layer, forward and backward.
    forward, backward = analytic_block_bytes(cfg, n, sp)
    replicated_kv = num_kv_heads % n != 0
    for r in results:
        assert r["forward"] == pytest.approx(forward)
        assert r["backward"] == pytest.approx(backward)
        synced = (2 * cfg.hidden_size if sp else 0) + (2 * cfg.kv_heads * cfg.head_dim * cfg.hidden_size
                                                       if replicated_kv else 0)
        assert r["synced_numel"] == synced
        assert r["sync"] == pytest.approx({("all_reduce", "tp"): 2 * (n - 1) / n * synced * FP32} if synced else {})
    # Grad norm bookkeeping: replicated params are counted on TP rank 0 only.
    ref_norm = torch.sqrt(sum(g.double().square().sum() for g in ref_grads.values())).item()
    assert [r["grad_norm"] for r in results] == pytest.approx([ref_norm] * n, rel=1e-6)
    assert results[0]["duplicates"] == []
    assert set(results[1]["duplicates"]) == {name for name in ref_grads if results[0]["shards"][name] is None}


# ---- a Column -> Row MLP with biases ----------------------------------------------------------------


class TPBiasMLP(nn.Module):
    """fc1 (column, bias) -> GELU -> fc2 (row, bias); `gathered` routes the full hidden through instead."""

    def __init__(self, tp, sp: bool, gathered: bool):
        super().__init__()
        self.fc1 = ColumnParallelLinear(8, 16, tp, init=normal_init(0.5), bias=True, gather_output=gathered,
                                        sequence_parallel=sp)
        self.fc2 = RowParallelLinear(16, 8, tp, init=normal_init(0.5), bias=True, input_is_parallel=not gathered,
                                     sequence_parallel=sp)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


def reference_bias_mlp() -> nn.Module:
    with torch.device("meta"):
        model = TPBiasMLP(ONE_RANK, False, False)
    return materialize(model, SEED)


def assert_outputs_match(results: list[dict], ref_out: torch.Tensor, ref_x_grad: torch.Tensor, sp: bool,
                         x_grad_atol: float) -> None:
    """Every rank's output and input gradient equal the reference (under SP: concatenated along the
    sequence, each rank holding its chunk)."""
    outs = [r["out"] for r in results]
    x_grads = [r["x_grad"] for r in results]
    if sp:
        outs, x_grads = [torch.cat(outs, 1)], [torch.cat(x_grads, 1)]
    for out, x_grad in zip(outs, x_grads):
        torch.testing.assert_close(out, ref_out.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(x_grad, ref_x_grad, rtol=1e-5, atol=x_grad_atol)


def mlp_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(B, T, 8, generator=g), torch.randn(B, T, 8, generator=g)


def bias_mlp_on_rank(sp: bool, gathered: bool) -> dict:
    n = dist.get_world_size()
    ps = init(Topology(n, tp=n))
    with torch.device("meta"):
        model = TPBiasMLP(ps.tp, sp, gathered)
    materialize(model, SEED)
    x, g = mlp_inputs()
    if sp:
        x, g = x.chunk(n, 1)[ps.tp.rank], g.chunk(n, 1)[ps.tp.rank]
    x.requires_grad_()
    out = model(x)
    out.backward(g)
    allreduce_tp_partial_grads(model.parameters(), ps.tp)
    ps.destroy()
    return {"out": out.detach(), "x_grad": x.grad, "grads": {k: p.grad for k, p in model.named_parameters()},
            "shards": {k: param_meta(p).shard for k, p in model.named_parameters()},
            "sp_marked": [k for k, p in model.named_parameters() if param_meta(p).tp_partial_grad]}


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("sp,gathered", [(False, False), (True, False), (False, True)],
                         ids=["nosp", "sp", "gather_output"])
def test_column_row_mlp_with_bias_matches_one_process(rank_pools, n, sp, gathered):
    results = rank_pools.get(n).run(bias_mlp_on_rank, sp, gathered)
    ref = reference_bias_mlp()
    x, g = mlp_inputs()
    x.requires_grad_()
    ref_out = ref(x)
    ref_out.backward(g)
    assert_outputs_match(results, ref_out, x.grad, sp, x_grad_atol=1e-6)
    for name, p in ref.named_parameters():
        torch.testing.assert_close(gather_param(results, "grads", name), p.grad, rtol=1e-5, atol=1e-6, msg=name)
    assert results[0]["shards"]["fc1.bias"] == (0, 0, n) and results[0]["shards"]["fc2.bias"] is None
    assert results[0]["sp_marked"] == (["fc2.bias"] if sp else [])


# ---- vocabulary-parallel embedding, head and loss ------------------------------------------------


HIDDEN = 8


def vocab_inputs(vocab: int, seq: int) -> dict:
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, vocab, (B, seq), generator=g)
    labels = torch.randint(0, vocab, (B, seq), generator=g)
    labels[0, :2] = IGNORE_INDEX
    labels[1, -1] = vocab - 1  # a label in the last (possibly padded) shard
    weights = torch.randn(B, seq, generator=g)  # d loss / d token loss
    return {"ids": ids, "labels": labels, "weights": weights}


class VocabModel(nn.Module):
    """Embedding -> tanh -> LM head, TP-sharded; names match the reference below."""

    def __init__(self, vocab: int, tp, sp: bool, multiple: int = 1):
        super().__init__()
        self.embedding = VocabParallelEmbedding(vocab, HIDDEN, tp, init=normal_init(1.0), multiple=multiple,
                                                sequence_parallel=sp)
        self.output = VocabParallelLMHead(vocab, HIDDEN, tp, init=normal_init(1.0), multiple=multiple,
                                          sequence_parallel=sp)
        self.tp, self.vocab = tp, vocab

    def forward(self, ids, labels):
        return vocab_parallel_cross_entropy(self.output(torch.tanh(self.embedding(ids))), labels, self.tp,
                                            self.vocab)


class ReferenceVocabModel(nn.Module):
    def __init__(self, vocab: int):
        super().__init__()
        self.embedding = nn.Module()
        self.embedding.weight = nn.Parameter(torch.empty(vocab, HIDDEN))
        self.output = nn.Module()
        self.output.weight = nn.Parameter(torch.empty(vocab, HIDDEN))

    def init_specs(self):
        return {"embedding.weight": normal_init(1.0), "output.weight": normal_init(1.0)}

    def forward(self, ids, labels):
        logits = F.linear(torch.tanh(F.embedding(ids, self.embedding.weight)), self.output.weight)
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                               reduction="none").view(labels.shape)


def reference_vocab(vocab: int, seq: int) -> dict:
    with torch.device("meta"):
        model = ReferenceVocabModel(vocab)
    materialize(model, SEED)
    inputs = vocab_inputs(vocab, seq)
    init_w = {name: p.detach().clone() for name, p in model.named_parameters()}
    losses = model(inputs["ids"], inputs["labels"])
    (losses * inputs["weights"]).sum().backward()
    return {"init": init_w, "losses": losses.detach(), "grads": {n: p.grad for n, p in model.named_parameters()}}


def vocab_on_rank(vocab: int, sp: bool, multiple: int) -> dict:
    n = dist.get_world_size()
    ps = init(Topology(n, tp=n))
    stats = ps.stats  # the groups' own counters
    stats.reset()
    with torch.device("meta"):
        model = VocabModel(vocab, ps.tp, sp, multiple)
    materialize(model, SEED)
    seq = 2 * n
    inputs = vocab_inputs(vocab, seq)
    init_w = {name: p.detach().clone() for name, p in model.named_parameters()}
    losses = model(inputs["ids"], inputs["labels"])
    (losses * inputs["weights"]).sum().backward()
    ps.destroy()
    return {"init": init_w, "losses": losses.detach(), "grads": {k: p.grad for k, p in model.named_parameters()},
            "bytes": dict(stats.bytes_sent), "padded": model.embedding.padded_vocab_size}


def unpad(full: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    return full[:vocab], full[vocab:]


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("vocab,multiple", [(16, 1), (13, 1), (9, 4)], ids=["v16", "v13", "v9-mult4"])
@pytest.mark.parametrize("sp", [False, True], ids=["nosp", "sp"])
def test_vocab_parallel_embedding_and_loss_match_one_process(rank_pools, n, vocab, multiple, sp):
    results = rank_pools.get(n).run(vocab_on_rank, vocab, sp, multiple)
    ref = reference_vocab(vocab, 2 * n)
    padded = padded_vocab_size(vocab, n, multiple)
    for r in results:
        assert r["padded"] == padded
        # Every TP rank returns the full per-token losses, equal to F.cross_entropy's.
        torch.testing.assert_close(r["losses"], ref["losses"], rtol=1e-5, atol=1e-6)
        assert (r["losses"][0, :2] == 0).all()
        # Two all-reduces over TP (max, then sum-exp with the target logit) per token, never the logits.
        ce = 2 * (n - 1) / n * (B * 2 * n) * FP32 * (1 + 2)
        assert r["bytes"].get(("all_reduce", "tp"), 0) >= ce
        assert ("all_gather", "tp") not in r["bytes"] or sp
    for name in ("embedding.weight", "output.weight"):
        init_full = torch.cat([r["init"][name] for r in results])
        grad_full = torch.cat([r["grads"][name] for r in results])
        real, pad = unpad(init_full, vocab)
        torch.testing.assert_close(real, ref["init"][name], rtol=0, atol=0)  # same init as one process
        assert (pad == 0).all()
        real, pad = unpad(grad_full, vocab)
        torch.testing.assert_close(real, ref["grads"][name], rtol=1e-5, atol=1e-6, msg=name)
        assert (pad == 0).all(), f"padding rows of {name} got gradient"


# ---- single process (no ranks): tp = 1 is the plain layer ----------------------------------------


def test_pure_vocab_helpers():
    assert padded_vocab_size(13, 4) == 16
    assert padded_vocab_size(16, 4) == 16
    assert padded_vocab_size(50257, 2, 64) == 50304
    assert padded_vocab_size(13, 1) == 13
    assert vocab_range(16, 3, 4) == (12, 16)
    with pytest.raises(ValueError, match="tp=0"):
        padded_vocab_size(13, 0)


def test_one_rank_layers_are_plain_and_padding_is_masked():
    """A group of one rank: no communication; padded logit columns change nothing."""
    vocab, multiple = 13, 8  # padded to 16 even without TP
    stats = CommStats()
    with torch.device("meta"):
        model = VocabModel(vocab, ONE_RANK, False, multiple)
    materialize(model, SEED)
    assert model.embedding.weight.shape == (16, HIDDEN)
    inputs = vocab_inputs(vocab, 4)
    losses = model(inputs["ids"], inputs["labels"])
    (losses * inputs["weights"]).sum().backward()
    ref = reference_vocab(vocab, 4)
    torch.testing.assert_close(losses, ref["losses"], rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach()[:vocab], ref["init"][name], rtol=0, atol=0)
        torch.testing.assert_close(p.grad[:vocab], ref["grads"][name], rtol=1e-5, atol=1e-6)
        assert (p.grad[vocab:] == 0).all() and (p.detach()[vocab:] == 0).all()
    assert not stats.bytes_sent

    column = ColumnParallelLinear(6, 4, ONE_RANK, init=normal_init(1.0), bias=True, gather_output=True)
    row = RowParallelLinear(4, 6, ONE_RANK, init=normal_init(1.0), bias=True, input_is_parallel=False)
    for layer in (column, row):
        materialize(layer, SEED)
        assert param_meta(layer.weight).shard is None
        x = torch.randn(2, 3, layer.in_features)
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
    assert not stats.bytes_sent
    y = torch.randn(2, 4, 3)
    assert scatter_to_sequence_parallel_region(y, ONE_RANK) is y
    assert gather_from_sequence_parallel_region(y, ONE_RANK) is y


def test_bad_layer_configs_name_the_problem():
    with pytest.raises(ValueError, match="gather_output=True with sequence_parallel=True"):
        ColumnParallelLinear(4, 4, ONE_RANK, init=normal_init(1.0), gather_output=True, sequence_parallel=True)
    with pytest.raises(ValueError, match="needs input_is_parallel=True"):
        RowParallelLinear(4, 4, ONE_RANK, init=normal_init(1.0), input_is_parallel=False, sequence_parallel=True)
    with pytest.raises(ValueError, match="labels"):
        vocab_parallel_cross_entropy(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long), ONE_RANK, 5)
