"""The activation-memory formula (trainer/memory_model.py) against what the layers really save.

The bytes a decoder layer saves for backward are measured with saved-tensor hooks
(models/activation_probe.py) on the real block, for recompute none / selective / full, fp32 and
bf16, GQA and MHA, without TP and on the `fake` backend as rank 0 of tp 2 and 4 with and without
sequence parallelism (collectives move no data there, but every tensor has its real shape). The
issue asks for 10%; the derivation accounts for every saved tensor, so the bound here is 1%. The
real-gloo tp2 check is in tests/multirank/test_recompute_memory.py.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist

from models.activation_probe import layer_saved_bytes, saved_bytes
from models.config import ModelConfig
from models.layers.tensor_parallel import TPContext
from models.parallel_context import ParallelContext
from optim.memory import StateBytes, measured_state_bytes
from parallel_state.groups import AxisGroup
from tests.multirank.harness import fake_world
from trainer.config import compose
from trainer.memory_estimate import estimate
from trainer.memory_model import (
    LayerShape,
    in_flight_microbatches,
    layer_activation_bytes,
    stage_activation_bytes,
)
from trainer.trainer import Trainer

SEQ, MICRO = 64, 2


def config(recompute: str, kv_heads: int) -> ModelConfig:
    return ModelConfig(vocab_size=64, hidden_size=128, num_layers=4, num_heads=8, num_kv_heads=kv_heads,
                       ffn_hidden_size=256, recompute=recompute)


def measured_and_derived(tp: int, sp: bool, dtype: torch.dtype, recompute: str, kv_heads: int) -> tuple[int, int]:
    cfg = config(recompute, kv_heads)
    par = None
    if tp > 1:
        par = ParallelContext(tp=TPContext(AxisGroup("tp", dist.group.WORLD, tuple(range(tp)), 0), sp))
    measured = layer_saved_bytes(cfg, 0, MICRO, SEQ, par=par, dtype=dtype)
    derived = layer_activation_bytes(LayerShape.of(cfg, SEQ, MICRO, tp, sp, dtype.itemsize), recompute)
    return measured, derived


@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_layer_formula_matches_saved_tensors_without_tp(recompute, dtype):
    for kv_heads in (2, 8):
        measured, derived = measured_and_derived(1, False, dtype, recompute, kv_heads)
        assert measured == pytest.approx(derived, rel=0.01), (kv_heads, measured, derived)


@pytest.mark.parametrize("tp,sp", [(2, False), (2, True), (4, True)])
def test_layer_formula_matches_saved_tensors_with_tp_and_sp(tp, sp):
    with fake_world(0, tp):
        for recompute in ("none", "selective", "full"):
            for kv_heads in (2, 8):  # kv 2 < tp 4: K/V replicated, one head selected
                measured, derived = measured_and_derived(tp, sp, torch.float32, recompute, kv_heads)
                assert measured == pytest.approx(derived, rel=0.01), (recompute, kv_heads, measured, derived)


def test_recompute_modes_order_and_sp_divides_the_stream():
    shape = LayerShape.of(config("none", 2), 4096, 1)
    none, selective, full = (layer_activation_bytes(shape, r) for r in ("none", "selective", "full"))
    assert full < selective < none
    sp = LayerShape.of(config("none", 2), 4096, 1, tp=4, sequence_parallel=True)
    assert layer_activation_bytes(sp, "full") * 4 == full


def test_stage_bytes_follow_the_recompute_method():
    shape = LayerShape.of(config("full", 2), 64, 2)
    none, full = layer_activation_bytes(shape, "none"), layer_activation_bytes(shape, "full")
    assert stage_activation_bytes(shape, 4, "full", "uniform", 1) == 4 * full
    assert stage_activation_bytes(shape, 4, "full", "uniform", 2) == 2 * full
    assert stage_activation_bytes(shape, 4, "full", "uniform", 3) == 2 * full
    assert stage_activation_bytes(shape, 4, "full", "block", 1) == full + 3 * none
    assert stage_activation_bytes(shape, 4, "none") == 4 * none


def test_in_flight_microbatches_of_1f1b_and_interleaving():
    assert in_flight_microbatches(1, 0, 1, 8) == 1
    assert [in_flight_microbatches(4, r, 1, 8) for r in range(4)] == [4, 3, 2, 1]
    assert in_flight_microbatches(4, 0, 1, 2) == 2  # fewer microbatches than stages
    # Interleaved, pp 4, vpp 2: rank 0 runs (4-1)*2 + 4 + 1 = 11 chunk forwards before its first backward.
    assert in_flight_microbatches(4, 0, 2, 8) == 11 / 2


# --- the estimator (trainer/memory_estimate.py) against a real one-process run ---------------------


def real_run_bytes(overrides: list[str]) -> tuple[StateBytes, int]:
    """A real Trainer after one step: its optimizer step's held bytes, and the bytes one microbatch's
    forward saves for backward (the model on this process)."""
    trainer = Trainer(compose(overrides))
    trainer.train_step()
    mb = trainer.data.train_microbatches(0)[0]
    model = trainer.model
    activations = saved_bytes(lambda: model.token_losses(mb["input_ids"], mb["labels"]), exclude=model.parameters())
    return measured_state_bytes(trainer.optim_step), activations


@pytest.mark.parametrize("extra", [[], ["trainer.precision=bf16", "model.recompute=selective"],
                                   ["model.recompute=full", "model.recompute_method=block",
                                    "model.recompute_layers=1", "model.num_layers=3"]],
                         ids=["fp32", "bf16-selective", "full-block"])
def test_estimate_matches_a_real_run(tiny, extra):
    overrides = tiny(steps=3) + ["trainer.save_final=false", "model.hidden_size=64", "data.seq_len=64",
                                 "model.max_position_embeddings=64", *extra]
    (rank,) = estimate(compose(overrides), 1)
    state, activations = real_run_bytes(overrides)
    assert dataclasses.astuple(rank.state) == dataclasses.astuple(state)  # weights, grads, moments, masters exact
    assert rank.in_flight == 1
    assert rank.activations == pytest.approx(activations, rel=0.10)


def test_launch_memory_prints_every_pipeline_rank_and_rejects_bad_layouts(capsys):
    import importlib.util
    import os

    from tests.conftest import REPO_ROOT

    spec = importlib.util.spec_from_file_location("launch_memory", os.path.join(REPO_ROOT, "launch", "memory.py"))
    launch_memory = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launch_memory)
    assert launch_memory.main(["--world", "4", "+experiment=quickstart", "parallel.pp=2", "parallel.tp=2",
                               "model.recompute=selective"]) == 0
    out = capsys.readouterr().out
    assert "per-rank memory estimate: tp=2 pp=2" in out and "\n      0 " in out and "\n      1 " in out
    assert launch_memory.main(["--world", "4", "+experiment=quickstart", "parallel.pp=2",
                               "model.recompute=full", "model.recompute_method=block",
                               "model.recompute_layers=9"]) == 2
    assert "model.recompute_layers=9" in capsys.readouterr().err
