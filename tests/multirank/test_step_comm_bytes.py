"""Per-step communication bytes: every collective of a training step is counted (the loss-token and
loss-sum all-reduces and the grad-norm sum too), and evaluation traffic never lands in a step."""
from __future__ import annotations

import json

import pytest
import torch.distributed as dist

from parallel_state.comm_stats import ring_bytes_sent
from tests.conftest import tiny_overrides
from trainer.config import compose
from trainer.distributed import RuntimeEnv
from trainer.trainer import Trainer

pytestmark = pytest.mark.xdist_group("rank_pool")

FP32, FP64 = 4, 8


def train_dp2(overrides: list[str]) -> dict:
    world = dist.get_world_size()
    env = RuntimeEnv(rank=dist.get_rank(), world_size=world, local_rank=dist.get_rank(), local_world_size=world)
    trainer = Trainer(compose(overrides), env=env)
    trainer.train()
    grad_bytes = sum(p.numel() * p.element_size() for p in trainer.model.parameters())
    return {"run_dir": trainer.run_dir, "grad_bytes": grad_bytes}


def test_step_bytes_count_every_collective_and_no_evaluation(tmp_path, rank_pools):
    overrides = tiny_overrides(tmp_path, steps=4) + ["trainer.eval_interval=2", "trainer.save_final=false"]
    results = rank_pools.get(2).run(train_dp2, overrides)
    with open(f"{results[0]['run_dir']}/metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    steps = {row["step"]: {k: v for k, v in row.items() if k.startswith("comm/") and not k.endswith("_all_ranks")}
             for row in rows if "loss" in row}
    assert sorted(steps) == [1, 2, 3, 4]
    # dp=2: the gradient buckets, then the loss-token count and the loss sum (fp32 scalars) over DP x CP,
    # and the squared grad norm (fp64) over every rank.
    expected = {
        "comm/dp_cp/all_reduce_bytes": ring_bytes_sent("all_reduce", results[0]["grad_bytes"] + 2 * FP32, 2),
        "comm/world/all_reduce_bytes": ring_bytes_sent("all_reduce", FP64, 2),
    }
    expected["comm/total_bytes"] = sum(expected.values())
    for step, comm in steps.items():
        # Step 3 follows an evaluation (eval_interval=2): its bytes must not include it.
        assert comm == pytest.approx(expected), f"step {step}"
    # Summed over the ranks (gathered once per log window; both ranks send the same here).
    for row in (r for r in rows if "loss" in r):
        assert row["comm/dp_cp/all_reduce_bytes_all_ranks"] == pytest.approx(2 * expected["comm/dp_cp/all_reduce_bytes"])
        assert row["comm/total_bytes_all_ranks"] == pytest.approx(2 * expected["comm/total_bytes"])
