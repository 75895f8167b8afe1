"""Layout parity of data parallelism: dp=2 and dp=4 give the one-process losses and gradients.

Three training steps from the same seed and data; gradients are compared after the DP reduction
(and clipping), i.e. exactly what the optimizer sees, fp32, relative tolerance 1e-5.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.conftest import tiny_overrides
from trainer.config import compose
from trainer.distributed import RuntimeEnv
from trainer.trainer import Trainer

pytestmark = pytest.mark.xdist_group("rank_pool")

STEPS = 3


def train_and_capture(overrides: list[str], env: RuntimeEnv | None = None) -> dict:
    """Run STEPS steps; return each step's loss and the flat gradient handed to the optimizer."""
    trainer = Trainer(compose(overrides), env=env)
    grads: list[torch.Tensor] = []
    optimizer_step = trainer.optimizer.step

    def capturing_step(*args, **kwargs):
        grads.append(torch.cat([p.grad.flatten() for p in trainer.model.parameters()]).clone())
        return optimizer_step(*args, **kwargs)

    trainer.optimizer.step = capturing_step
    losses = [trainer.train_step()["loss"] for _ in range(STEPS)]
    return {"losses": losses, "grads": grads, "dp": (trainer.dp_rank, trainer.dp_size)}


def on_rank(overrides: list[str]) -> dict:
    world = dist.get_world_size()
    env = RuntimeEnv(rank=dist.get_rank(), world_size=world, local_rank=dist.get_rank(), local_world_size=world)
    return train_and_capture(overrides, env)


@pytest.mark.parametrize("world,micro", [(2, 2), (2, 1), (4, 1)])
def test_data_parallel_matches_one_process(tmp_path, rank_pools, world, micro):
    overrides = tiny_overrides(tmp_path, steps=10) + ["model.dropout=0.0", "trainer.save_final=false"]
    reference = train_and_capture(overrides + [f"trainer.run_dir={tmp_path / 'one'}"])
    results = rank_pools.get(world).run(
        on_rank, overrides + [f"trainer.run_dir={tmp_path / f'dp{world}'}", f"data.micro_batch_size={micro}"])
    assert [r["dp"] for r in results] == [(rank, world) for rank in range(world)]
    for r in results:
        assert r["losses"] == pytest.approx(reference["losses"], rel=1e-5)
        for step in range(STEPS):
            torch.testing.assert_close(r["grads"][step], reference["grads"][step], rtol=1e-5, atol=1e-8)
    for r in results[1:]:  # replicas hold bit-identical gradients, so they never drift apart
        assert all(torch.equal(a, b) for a, b in zip(r["grads"], results[0]["grads"]))
