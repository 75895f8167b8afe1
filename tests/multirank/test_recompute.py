"""Activation recomputation in parallel layouts (docs/recompute.md): bit-identical to keeping everything.

The real Trainer runs three steps in a layout with model.recompute=none and again with selective or
full recompute; every rank's losses and the gradients it hands to the optimizer must be identical
bit for bit (fp32): the recompute repeats the forward's collectives, dropout masks (the TP-sharded
stream included) and MoE routing exactly. Layout parity of recompute runs against one process is
in test_parity.py's matrix.
"""
from __future__ import annotations

import pytest
import torch

from tests.conftest import tiny_overrides
from tests.multirank.test_parity import on_rank

pytestmark = pytest.mark.xdist_group("rank_pool")

MOE = ["model.channel_mixers=[moe]", "model.moe.num_experts=4", "model.moe.ffn_hidden_size=32",
       "model.moe.aux_loss_coeff=0.01", "model.moe.z_loss_coeff=0.001", "model.moe.num_shared_experts=1",
       "model.moe.score_function=sigmoid", "model.moe.aux_free_bias_rate=0.01", "parallel.ep=2", "parallel.etp=1"]
FULL_BLOCK = ["model.recompute=full", "model.recompute_method=block", "model.recompute_layers=1"]

# (layout overrides, recompute variants); every layout runs on 2 ranks.
CASES = {
    # Dropout on the residual stream and the attention probabilities: the sharded stream is replayed.
    "tp2-sp-dropout": (["parallel.tp=2", "parallel.sequence_parallel=true", "model.dropout=0.1",
                        "model.attention_dropout=0.1"],
                       [["model.recompute=selective"], ["model.recompute=full"]]),
    "pp2": (["parallel.pp=2", "model.num_layers=4", "data.micro_batch_size=1"],
            [FULL_BLOCK, ["model.recompute=full", "model.recompute_layers=2"]]),
    # The router's counts feed the aux-free bias step: counted once per forward, not again per recompute.
    "tp2-sp-moe-ep2": (["parallel.tp=2", "parallel.sequence_parallel=true", *MOE], [["model.recompute=full"]]),
    "cp2-ring": (["parallel.cp=2"], [["model.recompute=full"], ["model.recompute=selective"]]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_recompute_matches_keeping_activations_bit_for_bit(tmp_path, rank_pools, case):
    layout, variants = CASES[case]
    base = tiny_overrides(tmp_path, run_dir=tmp_path / "run", steps=10) + ["trainer.save_final=false", *layout]
    reference = rank_pools.get(2).run(on_rank, base)
    for variant in variants:
        results = rank_pools.get(2).run(on_rank, base + variant)
        for rank, (got, expected) in enumerate(zip(results, reference, strict=True)):
            assert got["losses"] == expected["losses"], (variant, rank)
            assert got["grad_norms"] == expected["grad_norms"], (variant, rank)
            for step, (grads, expected_grads) in enumerate(zip(got["grads"], expected["grads"], strict=True)):
                for name, grad in grads.items():
                    assert torch.equal(grad, expected_grads[name]), (variant, rank, step + 1, name)

