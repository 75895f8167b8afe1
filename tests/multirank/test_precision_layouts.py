"""bf16 and fp16 weights train the same in every parallel layout as on one process.

The parity matrix runs in fp32 (to 1e-5); here the low-precision paths that a layout changes are
checked: bf16/fp16 activations sent between pipeline stages, SP/CP collectives on bf16 tensors,
the fp32 main-gradient buckets reduced over DP/EDP, the fp32 masters and fp16's loss scale (its
overflow decision is global, so every rank skips the same steps). The tolerance is bf16's: a
layout sums the same products in another order, and the rounding of bf16 activations (2^-8
relative) propagates through the steps.
"""
from __future__ import annotations

import pytest
import torch.distributed as dist

from tests.conftest import tiny_overrides
from tests.multirank.test_parity import MOE
from trainer.config import compose
from trainer.distributed import RuntimeEnv
from trainer.trainer import Trainer

pytestmark = pytest.mark.xdist_group("rank_pool")

STEPS = 4
REL = 1e-2


def train(overrides: list[str], env: RuntimeEnv | None = None) -> dict:
    trainer = Trainer(compose(overrides), env=env)
    metrics = [trainer.train_step() for _ in range(STEPS)]
    return {"losses": [m["loss"] for m in metrics], "scales": [m.get("loss_scale") for m in metrics],
            "overflows": [m.get("overflow") for m in metrics]}


def on_rank(overrides: list[str]) -> dict:
    world = dist.get_world_size()
    return train(overrides, RuntimeEnv(rank=dist.get_rank(), world_size=world, local_rank=dist.get_rank(),
                                       local_world_size=world))


LAYOUTS = {
    "pp2": ["parallel.pp=2", "data.micro_batch_size=1"],
    "tp2-sp": ["parallel.tp=2", "parallel.sequence_parallel=true"],
    "cp2": ["parallel.cp=2"],
    "dp2-distributed": ["data.micro_batch_size=1", "optim.distributed=true"],
    "moe-ep2": [*MOE, "parallel.ep=2", "data.micro_batch_size=1"],
}
# fp16 with a scale that never overflows here, and with one that overflows for sure (near the
# border, a different summation order may flip a step's overflow legitimately).
LOSS_SCALES = {"fp16": ["optim.initial_loss_scale=1024"],
               "fp16-overflow": ["optim.initial_loss_scale=1e12", "optim.loss_scale_window=2"]}
CASES = ([("bf16", name) for name in LAYOUTS]
         + [(fp16, name) for fp16 in LOSS_SCALES for name in ("pp2", "dp2-distributed")])


@pytest.mark.parametrize("precision,name", CASES, ids=[f"{p}-{n}" for p, n in CASES])
def test_low_precision_layout_matches_one_process(tmp_path, rank_pools, precision, name):
    layout = LAYOUTS[name]
    model = [o for o in layout if o.startswith(("model.", "data."))]
    base = tiny_overrides(tmp_path, steps=10) + ["model.dropout=0.0", "trainer.save_final=false",
                                                 f"trainer.precision={precision.split('-')[0]}",
                                                 *LOSS_SCALES.get(precision, [])]
    reference = train(base + model + [f"trainer.run_dir={tmp_path / 'one'}"])
    results = rank_pools.get(2).run(on_rank, base + layout + [f"trainer.run_dir={tmp_path / 'layout'}"])
    for r in results:
        assert r["overflows"] == reference["overflows"] and r["scales"] == reference["scales"]
        assert r["losses"] == pytest.approx(reference["losses"], rel=REL)
    if precision == "fp16":
        assert reference["overflows"] == [0.0] * STEPS
    if precision == "fp16-overflow":  # every step skipped on every rank, the scale halving each time
        assert reference["overflows"] == [1.0] * STEPS and reference["scales"] == [1e12 / 2**i for i in range(STEPS)]
