"""Activation recomputation (models/recompute.py, docs/recompute.md) on one process.

Recomputing repeats the forward exactly, so the loss and every gradient must be bit-identical to the
run that keeps every activation, for every token mixer, with dropout on (the masks are drawn again
from the same random state) and with the MoE router's counts (changed only once per forward).
"""
from __future__ import annotations

import pytest
import torch

from models import ModelConfig, build_model
from models.layers.tensor_parallel import TPContext
from models.parallel_context import ParallelContext
from models.recompute import full_recompute_groups, recompute_contexts, recomputed
from moe.config import MoEConfig
from parallel_state.rng import RNGStreams
from parallel_state.topology import Topology
from trainer.config import compose
from trainer.validation import ConfigError, validate

VOCAB = 61


def config(**overrides) -> ModelConfig:
    fields = {"vocab_size": VOCAB, "hidden_size": 32, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2,
                  "ffn_hidden_size": 48, "max_position_embeddings": 64}
    fields.update(overrides)
    return ModelConfig(**fields)


def loss_and_grads(cfg: ModelConfig, position_ids: bool = False) -> tuple[torch.Tensor, dict, dict]:
    """Two forward/backward passes (dropout drawn from the global generator, seeded): loss, grads, buffers."""
    model = build_model(cfg, seed=7)
    model.train()
    tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
    positions = torch.arange(16).expand(2, 16) if position_ids else None
    torch.manual_seed(11)
    losses = []
    for _ in range(2):  # gradients accumulate over two microbatches, as in a step
        loss = model.token_losses(tokens[:, :-1], tokens[:, 1:], None if positions is None else positions[:, :-1]).sum()
        loss.backward()
        losses.append(loss.detach())
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    return torch.stack(losses), grads, buffers


MOE = {"channel_mixers": ["moe"], "moe": MoEConfig(num_experts=4, topk=2, ffn_hidden_size=16, aux_loss_coeff=0.01,
                                                  z_loss_coeff=0.001, num_shared_experts=1)}
MIXERS = {
    "attention-dropout": {"dropout": 0.1, "attention_dropout": 0.1},
    "attention-positions": {},
    "mla": {"token_mixers": ["mla"]},
    "gla+attention": {"token_mixers": ["gla", "attention"]},
    "pararnn_gru": {"token_mixers": ["pararnn_gru"]},
    "moe": MOE,
}
# Selective where the mixer has a part to recompute; full in groups of two layers (both layers of
# the 2-layer model in one checkpoint) for every mixer, one by one and the first layer only (block).
CASES = ([("selective", "uniform", 1, m) for m in ("attention-dropout", "attention-positions", "mla", "gla+attention")]
         + [("full", "uniform", 2, m) for m in MIXERS]
         + [("full", "uniform", 1, "attention-dropout"), ("full", "block", 1, "attention-dropout"),
            ("full", "block", 1, "moe")])


@pytest.mark.parametrize("recompute,method,layers,mixer", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_recompute_gives_bit_identical_losses_and_gradients(mixer, recompute, method, layers):
    kwargs = {"num_layers": 2, **MIXERS[mixer]}
    positions = mixer == "attention-positions"
    base_loss, base_grads, base_buffers = loss_and_grads(config(**kwargs), positions)
    loss, grads, buffers = loss_and_grads(
        config(**kwargs, recompute=recompute, recompute_method=method, recompute_layers=layers), positions)
    assert torch.equal(loss, base_loss)
    assert grads.keys() == base_grads.keys()
    for name in grads:
        assert torch.equal(grads[name], base_grads[name]), name
    for name in buffers:  # e.g. the router's tokens_per_expert: counted once per forward, not per recompute
        assert torch.equal(buffers[name], base_buffers[name]), name


def test_recompute_actually_frees_activations():
    """The saved-tensor bytes fall with each mode (a recompute that kept everything would pass the test above)."""
    def saved_bytes(cfg: ModelConfig) -> int:
        model = build_model(cfg, seed=7)
        tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor):
            seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.token_losses(tokens[:, :-1], tokens[:, 1:]).sum()
        return sum(seen.values())

    none = saved_bytes(config())
    selective = saved_bytes(config(recompute="selective"))
    full = saved_bytes(config(recompute="full"))
    block = saved_bytes(config(recompute="full", recompute_method="block", recompute_layers=2))
    assert full < block < none and selective < none


def test_full_recompute_groups_follow_megatron():
    assert full_recompute_groups(4, "uniform", 1) == [range(1), range(1, 2), range(2, 3), range(3, 4)]
    assert full_recompute_groups(5, "uniform", 2) == [range(2), range(2, 4), range(4, 5)]
    assert full_recompute_groups(4, "uniform", 4) == [range(4)]
    assert full_recompute_groups(4, "block", 2) == [range(1), range(1, 2)]
    assert full_recompute_groups(4, "block", 4) == [range(i, i + 1) for i in range(4)]
    with pytest.raises(ValueError, match="recompute_method"):
        full_recompute_groups(4, "blocks", 1)


def test_recompute_replays_named_stream_and_restores_it():
    """Dropout drawn from a named stream (the TP-sharded one) gets the same mask in the recompute, and
    the stream continues afterwards where the forward left it."""
    streams = RNGStreams(5, Topology(1).coords(0))
    x = torch.randn(64, requires_grad=True)

    def dropped(t: torch.Tensor) -> torch.Tensor:
        with streams.fork("tp-sharded"):
            return torch.nn.functional.dropout(t, 0.5) * t
    expected_grad = torch.autograd.grad(dropped(x).sum(), x)[0]
    streams.load_state_dict(RNGStreams(5, streams.coords).state_dict())
    y = recomputed(dropped, x, rng=streams)
    after_forward = streams.state_dict()["tp-sharded"].clone()
    (grad,) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(grad, expected_grad)
    assert torch.equal(streams.state_dict()["tp-sharded"], after_forward)
    assert recompute_contexts(None, [])[0] is not None


def test_model_rejects_full_recompute_of_ladder_layers():
    with pytest.raises(ValueError, match="ladder"):
        build_model(config(residual="ladder", recompute="full"), seed=0)


def test_tp_context_is_what_the_model_reads_streams_from():
    par = ParallelContext(tp=TPContext(rng=RNGStreams(1, Topology(1).coords(0))))
    model = build_model(config(recompute="full"), seed=0, par=par)
    assert model._rng is par.tp.rng


# --- validation (item 5 of the issue: bad input fails before anything is built) -----------------

BAD_RECOMPUTE = [
    (["model.recompute=partial"], 1, "model.recompute", "must be one of"),
    (["model.recompute=full", "model.recompute_method=blocks"], 1, "model.recompute_method", "must be one of"),
    (["model.recompute=full", "model.recompute_layers=0"], 1, "model.recompute_layers", "must be >= 1"),
    (["model.recompute=full", "model.recompute_layers=5", "model.num_layers=4"], 1, "model.recompute_layers",
     "exceeds the model's 4 layers"),
    # pp2 x vpp2 over 8 layers: 2 layers per virtual stage.
    (["model.recompute=full", "model.recompute_method=block", "model.recompute_layers=3", "model.num_layers=8",
      "parallel.pp=2", "parallel.vpp=2", "data.global_batch_size=16"], 2, "model.recompute_layers",
     "the smallest of the 4 (virtual) pipeline stages, which holds 2 layers"),
    (["model.recompute=full", "model.recompute_layers=2", "model.num_layers=4", "parallel.pp=2",
      "parallel.pipeline_layers=[1,3]"], 2, "model.recompute_layers", "which holds 1 layers"),
    (["model.recompute=full", "model.residual=ladder"], 1, "model.recompute", "ladder"),
]


@pytest.mark.parametrize("overrides,world,field,problem", BAD_RECOMPUTE)
def test_bad_recompute_settings_name_the_field_and_fix(overrides, world, field, problem):
    with pytest.raises(ConfigError) as error:
        validate(compose(["+experiment=quickstart", *overrides]), world_size=world)
    assert error.value.field == field
    assert problem in error.value.problem
    assert error.value.fix


def test_good_recompute_settings_pass_validation():
    validate(compose(["+experiment=quickstart", "model.recompute=full", "model.recompute_method=block",
                      "model.recompute_layers=2", "model.num_layers=4", "parallel.pp=2"]), world_size=2)
    validate(compose(["+experiment=quickstart", "model.recompute=selective", "model.residual=ladder"]))
