"""A checkpoint saved at one layout resumes at another (docs/checkpoints.md).

Dense: saved at tp2 pp2 dp2 with the distributed optimizer, resumed at tp1 pp4, at tp4 and at one
process with the all-reduce step. MoE: saved at ep4, resumed at ep2 with the distributed optimizer
and at one process. Dropout is 0 (random streams depend on rank coordinates and carry over only
in the same layout). The loaded weights equal the saved ones, and the next steps' losses equal an
uninterrupted one-process run's.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.conftest import tiny_overrides
from tests.multirank.test_parity import MOE, ODD_VOCAB
from trainer.checkpointer import model_entries
from trainer.config import compose
from trainer.distributed import RuntimeEnv
from trainer.trainer import Trainer

pytestmark = pytest.mark.xdist_group("rank_pool")

SAVE_AT, STEPS = 3, 6
DENSE = ["model.num_layers=4", "data.micro_batch_size=1", *ODD_VOCAB]


def _env() -> RuntimeEnv:
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    return RuntimeEnv(rank=rank, world_size=world, local_rank=rank, local_world_size=world)


def _boxes(trainer: Trainer) -> dict[str, tuple[tuple[int, ...], list]]:
    """This rank's parts of every global weight: key -> (global shape, [(offsets, tensor)])."""
    trainer.optim_step.finish_param_sync()
    return {e.key: (e.shape, [(b.offsets, b.tensor.detach().float().clone()) for b in e.boxes])
            for e in model_entries(trainer.model)}


def assemble(per_rank: list[dict]) -> dict[str, torch.Tensor]:
    """The global weights from every rank's boxes (replicas must agree bit for bit)."""
    full: dict[str, torch.Tensor] = {}
    for boxes in per_rank:
        for key, (shape, parts) in boxes.items():
            target = full.setdefault(key, torch.full(shape, float("nan")))
            for offsets, tensor in parts:
                region = target
                for dim, (o, n) in enumerate(zip(offsets, tensor.shape)):
                    region = region.narrow(dim, o, n)
                assert region.isnan().all() or torch.equal(region, tensor), f"replicas of {key} differ"
                region.copy_(tensor)
    assert not any(t.isnan().any() for t in full.values()), "some part of a weight is on no rank"
    return full


def train(overrides: list[str], steps: int, save: bool = False) -> dict:
    """Build (resuming if the overrides say so), note the weights, train `steps` steps, maybe save."""
    trainer = Trainer(compose(overrides), env=_env())
    start, loaded = trainer.step, _boxes(trainer)
    losses = [trainer.train_step()["loss"] for _ in range(steps)]
    if save:
        trainer.save()
    return {"start": start, "loaded": loaded, "losses": losses, "final": _boxes(trainer)}


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def check_resumed(resumed: list[dict], saved: dict[str, torch.Tensor], straight: dict) -> None:
    assert all(r["start"] == SAVE_AT for r in resumed)
    loaded = assemble([r["loaded"] for r in resumed])
    assert loaded.keys() == saved.keys()
    for key, tensor in saved.items():
        assert rel_error(loaded[key], tensor) <= 1e-6, key  # the stored global tensors, bit for bit in practice
    losses = resumed[-1]["losses"]  # the last rank holds the last pipeline stage: every rank logs the global loss
    assert losses == pytest.approx(straight["losses"][SAVE_AT:], rel=1e-5)
    final = assemble([r["final"] for r in resumed])
    worst = max(rel_error(final[k], straight["final"][k]) for k in final)
    assert worst <= 1e-5, worst


def _straight(overrides: list[str]) -> dict:
    result = train(overrides, STEPS)
    result["final"] = assemble([result["final"]])
    return result


@pytest.mark.parametrize("case", ["dense", "moe"])
def test_checkpoint_resumes_at_other_layouts(tmp_path, rank_pools, case):
    base = tiny_overrides(tmp_path, steps=STEPS) + ["model.dropout=0.0", "trainer.save_final=false",
                                                    *(DENSE if case == "dense" else [*MOE, "data.micro_batch_size=1"])]
    straight = _straight(base + [f"trainer.run_dir={tmp_path / 'straight'}"])
    if case == "dense":
        saver, save_layout = 8, ["parallel.tp=2", "parallel.pp=2", "optim.distributed=true"]
        loaders = [(4, ["parallel.pp=4"]), (4, ["parallel.tp=4"]), (1, [])]
    else:
        saver, save_layout = 4, ["parallel.ep=4"]
        loaders = [(2, ["parallel.ep=2", "optim.distributed=true"]), (1, [])]
    saved_run = train_on(rank_pools, saver, base + save_layout + [f"trainer.run_dir={tmp_path / 'saved'}"],
                         SAVE_AT, save=True)
    assert [r["losses"] for r in saved_run][-1] == pytest.approx(straight["losses"][:SAVE_AT], rel=1e-5)
    saved = assemble([r["final"] for r in saved_run])
    path = tmp_path / "saved" / "checkpoints" / f"step_{SAVE_AT:06d}"
    for index, (world, layout) in enumerate(loaders):
        resume = base + layout + [f"trainer.run_dir={tmp_path / f'resumed{index}'}", f"trainer.resume={path}"]
        check_resumed(train_on(rank_pools, world, resume, STEPS - SAVE_AT), saved, straight)


def train_on(rank_pools, world: int, overrides: list[str], steps: int, save: bool = False) -> list[dict]:
    if world == 1:
        return [train(overrides, steps, save)]
    return rank_pools.get(world).run(train, overrides, steps, save, timeout_s=300)
