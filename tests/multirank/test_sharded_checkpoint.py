"""Checkpoints of model-parallel runs: bit-exact resume in the same layout (dropout streams included),
and a resume at another layout or pipeline split loads (tests/multirank/test_reshard.py checks its
numbers)."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from parallel_state.params import param_meta
from tests.conftest import tiny_overrides
from trainer.config import compose
from trainer.distributed import RuntimeEnv
from trainer.trainer import Trainer
from trainer.validation import ConfigError

pytestmark = pytest.mark.xdist_group("rank_pool")


def _env() -> RuntimeEnv:
    world = dist.get_world_size()
    return RuntimeEnv(rank=dist.get_rank(), world_size=world, local_rank=dist.get_rank(), local_world_size=world)


def train_losses(overrides: list[str], stop_at: int | None = None) -> list[float]:
    trainer = Trainer(compose(overrides), env=_env())
    if stop_at is not None:
        trainer.cfg.trainer.max_steps = stop_at  # stop early as a killed job would, after a save
    losses = []
    while trainer.step < trainer.cfg.trainer.max_steps:
        losses.append(trainer.train_step()["loss"])
        if trainer.step % trainer.cfg.trainer.save_interval == 0:
            trainer.save()
    trainer.checkpointer.wait()  # as Trainer.train() does: a background save completes before the end
    return losses


def resume_with(overrides: list[str]) -> str:
    try:
        Trainer(compose(overrides), env=_env())
    except ConfigError as e:
        return str(e)
    return ""


@pytest.mark.parametrize("layout", [
    ["parallel.tp=2", "parallel.sequence_parallel=true"],
    ["parallel.tp=2", "parallel.pp=2", "model.tie_embeddings=true"],
], ids=["tp2-sp-dp2", "tp2-pp2-tied"])
def test_sharded_checkpoint_resumes_bit_exactly(tmp_path, rank_pools, layout):
    base = tiny_overrides(tmp_path, steps=8) + ["model.dropout=0.1", "trainer.save_interval=4", *layout]
    pool = rank_pools.get(4)
    straight = pool.run(train_losses, base + [f"trainer.run_dir={tmp_path / 'straight'}"])
    split_dir = tmp_path / "split"
    first = pool.run(train_losses, base + [f"trainer.run_dir={split_dir}"], 4)
    # DCP's index and data files, the run's config, and the marker.
    names = sorted(os.listdir(split_dir / "checkpoints" / "step_000004"))
    assert {".metadata", "config.yaml", "meta.json"} <= set(names) and any(n.endswith(".distcp") for n in names)
    second = pool.run(train_losses, base + [f"trainer.run_dir={split_dir}", "trainer.resume=auto"])
    for rank in range(4):
        assert first[rank] + second[rank] == straight[rank]  # exact, dropout streams included

    # Another TP degree loads the same checkpoint (global tensors).
    assert rank_pools.get(2).run(resume_with, tiny_overrides(tmp_path, steps=8) + [
        f"trainer.run_dir={split_dir}", "trainer.resume=auto"]) == ["", ""]


def replicated_params_after_training(overrides: list[str]) -> dict:
    trainer = Trainer(compose(overrides), env=_env())
    for _ in range(3):
        trainer.train_step()
    return {name: p.detach().clone() for name, p in trainer.model.named_parameters()
            if param_meta(p).shard is None}


@pytest.mark.parametrize("sp", [False, True], ids=["nosp", "sp"])
def test_tp_replicas_do_not_drift_with_dropout(tmp_path, rank_pools, sp):
    """Dropout on TP-replicated activations must draw the same mask on every TP rank (and on
    sequence-parallel chunks a different one); otherwise the replicated norm gains would diverge."""
    overrides = tiny_overrides(tmp_path, steps=8) + [
        "model.dropout=0.2", "model.attention_dropout=0.2", "parallel.tp=2",
        f"parallel.sequence_parallel={str(sp).lower()}", f"trainer.run_dir={tmp_path / 'run'}"]
    a, b = rank_pools.get(2).run(replicated_params_after_training, overrides)
    assert a.keys() == b.keys() and any("norm" in name for name in a)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_resume_with_another_vpp_or_layer_split_loads(tmp_path, rank_pools):
    """pp=2 at vpp=2 saved; vpp=1, another explicit split and the same vpp all load it (layers are
    stored by global index, whichever stage held them)."""
    run_dir = tmp_path / "run"
    base = tiny_overrides(tmp_path, steps=4) + ["parallel.pp=2", "model.num_layers=4",
                                                f"trainer.run_dir={run_dir}"]
    pool = rank_pools.get(2)
    pool.run(train_losses, base + ["parallel.vpp=2", "trainer.save_interval=4"])
    resume = base + ["trainer.resume=auto"]
    assert pool.run(resume_with, resume) == ["", ""]
    assert pool.run(resume_with, resume + ["parallel.vpp=2", "parallel.pipeline_layers=[2,1,0,1]"]) == ["", ""]
    assert pool.run(resume_with, resume + ["parallel.vpp=2"]) == ["", ""]


def test_a_checkpoint_that_fits_only_some_stages_fails_on_every_rank(tmp_path, rank_pools):
    """Saved with 2 layers, resumed with 4 at pp2: only the second stage's layers are missing, and
    both ranks raise that one error (none waits in the load's collectives)."""
    saved = tmp_path / "saved"
    Trainer(compose(tiny_overrides(tmp_path, run_dir=saved, steps=3))).train()
    path = saved / "checkpoints" / "step_000003"
    errors = rank_pools.get(2).run(resume_with, tiny_overrides(tmp_path, steps=3) + [
        "parallel.pp=2", "model.num_layers=4", f"trainer.run_dir={tmp_path / 'run'}", f"trainer.resume={path}"])
    for error in errors:
        assert error.startswith(f"trainer.resume='{path}': the checkpoint has no 'model/layers.2."), error
        assert "Fix: load a checkpoint of this model" in error


def test_async_saves_on_several_ranks_resume_bit_exactly(tmp_path, rank_pools):
    """trainer.async_save: the background writes run DCP over a group of their own while the ranks
    train on; the checkpoints resume exactly like synchronous ones."""
    base = tiny_overrides(tmp_path, steps=6) + ["model.dropout=0.1", "trainer.save_interval=2", "parallel.tp=2",
                                                "trainer.async_save=true"]
    pool = rank_pools.get(2)
    straight = pool.run(train_losses, base + [f"trainer.run_dir={tmp_path / 'straight'}"])
    first = pool.run(train_losses, base + [f"trainer.run_dir={tmp_path / 'split'}"], 4)
    second = pool.run(train_losses, base + [f"trainer.run_dir={tmp_path / 'split'}", "trainer.resume=auto"])
    for s, a, b in zip(straight, first, second):
        assert a + b == s
