"""Sharded checkpoints of a TP x DP run: one file per TP rank, bit-exact resume, and a clear error
when the layout changes (resharding on load is not implemented)."""
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
    return losses


def resume_with(overrides: list[str]) -> str:
    try:
        Trainer(compose(overrides), env=_env())
    except ConfigError as e:
        return str(e)
    return ""


@pytest.mark.parametrize("layout,files", [
    (["parallel.tp=2", "parallel.sequence_parallel=true"], ["state_tp00_pp00.pt", "state_tp01_pp00.pt"]),
    (["parallel.tp=2", "parallel.pp=2", "model.tie_embeddings=true"],
     ["state_tp00_pp00.pt", "state_tp00_pp01.pt", "state_tp01_pp00.pt", "state_tp01_pp01.pt"]),
], ids=["tp2-sp-dp2", "tp2-pp2-tied"])
def test_sharded_checkpoint_resumes_bit_exactly(tmp_path, rank_pools, layout, files):
    base = tiny_overrides(tmp_path, steps=8) + ["model.dropout=0.1", "trainer.save_interval=4", *layout]
    pool = rank_pools.get(4)
    straight = pool.run(train_losses, base + [f"trainer.run_dir={tmp_path / 'straight'}"])
    split_dir = tmp_path / "split"
    first = pool.run(train_losses, base + [f"trainer.run_dir={split_dir}"], 4)
    assert sorted(os.listdir(split_dir / "checkpoints" / "step_000004")) == ["meta.json", *files]
    second = pool.run(train_losses, base + [f"trainer.run_dir={split_dir}", "trainer.resume=auto"])
    for rank in range(4):
        assert first[rank] + second[rank] == straight[rank]  # exact, dropout streams included

    # Another TP degree cannot load these shards: a clear error, nothing overwritten.
    errors = rank_pools.get(2).run(resume_with, tiny_overrides(tmp_path, steps=8) + [
        f"trainer.run_dir={split_dir}", "trainer.resume=auto"])
    assert all(e.startswith("trainer.resume=") and "saved with parallel.tp=2" in e and "this run has tp=1 pp=1" in e
               and "Fix:" in e for e in errors), errors
    assert sorted(os.listdir(split_dir / "checkpoints")) == ["step_000004", "step_000008"]


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


def test_resume_with_another_vpp_or_layer_split_is_refused(tmp_path, rank_pools):
    """pp=2 files of the same names hold other layers under another vpp or pipeline_layers: a
    one-line error naming the checkpoint's values, not a state_dict key mismatch."""
    run_dir = tmp_path / "run"
    base = tiny_overrides(tmp_path, steps=4) + ["parallel.pp=2", "model.num_layers=4",
                                                f"trainer.run_dir={run_dir}"]
    pool = rank_pools.get(2)
    pool.run(train_losses, base + ["parallel.vpp=2", "trainer.save_interval=4"])
    resume = base + ["trainer.resume=auto"]
    for error in pool.run(resume_with, resume):  # vpp=1: the same two files, other layers in them
        assert error.startswith("trainer.resume='auto': checkpoint ") and "saved with parallel.vpp=2" in error
        assert "this run has parallel.vpp=1 parallel.pipeline_layers=[2,2]" in error
        assert "Fix: run with the checkpoint's parallel.vpp=2 parallel.pipeline_layers=[1,1,1,1]" in error
    for error in pool.run(resume_with, resume + ["parallel.vpp=2", "parallel.pipeline_layers=[2,1,0,1]"]):
        assert "this run has parallel.vpp=2 parallel.pipeline_layers=[2,1,0,1]" in error, error
    assert pool.run(resume_with, resume + ["parallel.vpp=2"]) == ["", ""]
