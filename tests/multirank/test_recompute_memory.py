"""Activation and model-state bytes on real gloo ranks against trainer/memory_model.py and the
estimator of launch/memory.py (trainer/memory_estimate.py; docs/memory.md).

- Each TP rank's saved activations of one layer (tp2, with and without SP; none, selective, full
  recompute) equal the derived formula.
- The estimate, computed here without any process group, equals what a real Trainer's ranks hold
  after a step: weights, fp32 main gradients, Adam moments, fp32 masters and bucket padding exactly
  (distributed optimizer over dp2 with tp2 SP in bf16; a pp2 x dp2 pipeline with tied embeddings),
  and the activations of one microbatch within 10% (pp1).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch.distributed as dist

from models.activation_probe import layer_saved_bytes, saved_bytes
from models.config import ModelConfig
from models.layers.tensor_parallel import TPContext
from models.parallel_context import ParallelContext
from optim.memory import measured_state_bytes
from parallel_state.groups import AxisGroup
from tests.conftest import tiny_overrides
from trainer.config import compose
from trainer.distributed import RuntimeEnv
from trainer.memory_estimate import estimate
from trainer.memory_model import LayerShape, layer_activation_bytes
from trainer.trainer import Trainer

pytestmark = pytest.mark.xdist_group("rank_pool")


def saved_bytes_on_rank(sp: bool, recompute: str) -> int:
    world = dist.get_world_size()
    tp = AxisGroup("tp", dist.group.WORLD, tuple(range(world)), dist.get_rank())
    cfg = ModelConfig(vocab_size=64, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      ffn_hidden_size=128, recompute=recompute)
    return layer_saved_bytes(cfg, 0, 2, 32, par=ParallelContext(tp=TPContext(tp, sp)))


@pytest.mark.parametrize("sp", [False, True], ids=["tp2", "tp2-sp"])
def test_saved_activation_bytes_per_tp_rank_match_the_formula(rank_pools, sp):
    cfg = ModelConfig(vocab_size=64, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=128)
    for recompute in ("none", "selective", "full"):
        measured = rank_pools.get(2).run(saved_bytes_on_rank, sp, recompute)
        derived = layer_activation_bytes(LayerShape.of(cfg, 32, 2, tp=2, sequence_parallel=sp), recompute)
        assert measured[0] == measured[1] == pytest.approx(derived, rel=0.01), (recompute, measured, derived)


def held_on_rank(overrides: list[str]) -> dict:
    world, rank = dist.get_world_size(), dist.get_rank()
    trainer = Trainer(compose(overrides), env=RuntimeEnv(rank=rank, world_size=world, local_rank=rank,
                                                         local_world_size=world))
    trainer.train_step()
    activations = None
    if not trainer.pipelined:
        mb = trainer._local(trainer.data.train_microbatches(0))[0]
        model = trainer.model
        activations = saved_bytes(lambda: model.token_losses(mb["input_ids"], mb["labels"]),
                                  exclude=model.parameters())
    return {"state": dataclasses.astuple(measured_state_bytes(trainer.optim_step)), "activations": activations,
            "coords": trainer.ps.coords.as_dict()}


LAYOUTS = {
    "tp2-sp-dp2-distributed-bf16": ["parallel.tp=2", "parallel.sequence_parallel=true", "optim.distributed=true",
                                    "trainer.precision=bf16", "model.recompute=selective"],
    "pp2-dp2-tied": ["parallel.pp=2", "model.num_layers=4", "model.tie_embeddings=true", "optim.distributed=true",
                     "data.micro_batch_size=1", "model.recompute=full", "model.recompute_method=block"],
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_estimate_matches_every_rank_of_a_real_run(tmp_path, rank_pools, layout):
    overrides = tiny_overrides(tmp_path, run_dir=tmp_path / "run", steps=3) + [
        "trainer.save_final=false", "model.vocab_size=4099", *LAYOUTS[layout]]
    estimates = {r.pp_rank: r for r in estimate(compose(overrides), 4)}
    results = rank_pools.get(4).run(held_on_rank, overrides)
    for result in results:
        c = result["coords"]
        if c["tp"] != 0 or c["dp"] != 0:
            continue  # the estimate describes tp, cp and dp rank 0 of each stage
        expected = estimates[c["pp"]]
        assert result["state"] == dataclasses.astuple(expected.state), c
        if result["activations"] is not None:
            assert expected.activations_per_microbatch == pytest.approx(result["activations"], rel=0.10)
