"""The optimizer step is a seam: a second implementation plugs into the unchanged Trainer.

`FlatReferenceStep` is the obviously-correct version of the default bucketed step: plain `.grad`
tensors, one flat all-reduce per group after the last backward, then the same replica syncs,
clipping and AdamW. Swapped in through `Trainer(optimizer_step=...)`, it trains exactly like the
default on layouts that exercise DP, pipeline-tied embeddings and TP-partial gradients.
"""
from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch.distributed as dist

from optim.grad_sync import allreduce_gradients
from optim.step import AdamWStep, StepInputs, clip_by_global_norm, sync_replicated_grads
from parallel_state.params import param_meta
from tests.conftest import tiny_overrides
from trainer.config import compose
from trainer.distributed import RuntimeEnv
from trainer.trainer import Trainer

pytestmark = pytest.mark.xdist_group("rank_pool")

STEPS = 3


class FlatReferenceStep(AdamWStep):
    """Reduce after backward in one flat all-reduce per group; no buckets, no hooks."""

    def __init__(self, inputs: StepInputs):
        super().__init__(inputs)
        self.reductions = 0

    def no_sync(self):
        return nullcontext()

    def reduce_and_clip(self, unscale: float = 1.0) -> float:
        ps = self.inputs.ps
        allreduce_gradients([p for p in self.params if param_meta(p).grad_group == "dp_cp"], ps.dp_cp)
        allreduce_gradients([p for p in self.params if param_meta(p).grad_group == "edp"], ps.edp)
        sync_replicated_grads(ps, self.inputs.tied_weight, self.params)
        self.reductions += 1
        return clip_by_global_norm(self.inputs, self.params)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)


def train(overrides: list[str], reference: bool) -> dict:
    world = dist.get_world_size()
    env = RuntimeEnv(rank=dist.get_rank(), world_size=world, local_rank=dist.get_rank(), local_world_size=world)
    kwargs = {"optimizer_step": FlatReferenceStep} if reference else {}
    trainer = Trainer(compose(overrides), env=env, **kwargs)
    metrics = [trainer.train_step() for _ in range(STEPS)]
    return {"losses": [m["loss"] for m in metrics], "grad_norms": [m["grad_norm"] for m in metrics],
            "reductions": getattr(trainer.optim_step, "reductions", None)}


@pytest.mark.parametrize("layout", [
    ["data.micro_batch_size=1"],  # dp2, two microbatches: accumulation
    ["parallel.pp=2", "model.tie_embeddings=true"],  # the tied embedding summed over the stages
    ["parallel.tp=2", "parallel.sequence_parallel=true"],  # TP-partial norm gains
], ids=["dp2", "pp2-tied", "tp2-sp"])
def test_a_second_optimizer_step_trains_like_the_default(tmp_path, rank_pools, layout):
    base = tiny_overrides(tmp_path, steps=10) + ["trainer.save_final=false", *layout]
    default = rank_pools.get(2).run(train, base + [f"trainer.run_dir={tmp_path / 'default'}"], False)
    swapped = rank_pools.get(2).run(train, base + [f"trainer.run_dir={tmp_path / 'reference'}"], True)
    assert all(r["reductions"] == STEPS for r in swapped)  # the trainer really drove the swapped step
    for d, s in zip(default, swapped):
        assert s["losses"] == pytest.approx(d["losses"], rel=1e-5)
        assert s["grad_norms"] == pytest.approx(d["grad_norms"], rel=1e-5)
