"""DeepSpeed's engine as foldtron's optimizer step (optim.backend=deepspeed; docs/deepspeed.md).

On 2 data-parallel gloo ranks, 10 steps of the tiny model with 2 microbatches per rank: the losses
of ZeRO stages 1 and 2 equal the native all-reduce step's (fp32, rel 1e-5), stage 3 within 1e-4
(grad norms and learning rates too); a run saved in DeepSpeed's format after 3 steps and resumed
(trainer.resume=auto) gives exactly the losses of the uninterrupted run (stages 2 and 3).

The engine JIT-builds a small shared-memory communication op on first use (about a minute on 2
cores); TORCH_EXTENSIONS_DIR points at .cache/torch_extensions in the repository so the build is
reused by later runs (and CI caches that directory).
"""
from __future__ import annotations

import os

import pytest

from tests.conftest import REPO_ROOT, tiny_overrides
from tests.multirank.test_parity import on_rank

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.xdist_group("rank_pool")

EXTENSIONS_DIR = os.path.join(REPO_ROOT, ".cache", "torch_extensions")
STEPS = 10


def deepspeed_on_rank(overrides: list[str]) -> dict:
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", EXTENSIONS_DIR)
    return on_rank(overrides)


def losses_on_rank(overrides: list[str], steps: int) -> dict[str, list[float]]:
    import torch.distributed as dist

    from trainer.config import compose
    from trainer.distributed import RuntimeEnv
    from trainer.trainer import Trainer

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", EXTENSIONS_DIR)
    world, rank = dist.get_world_size(), dist.get_rank()
    trainer = Trainer(compose(overrides), env=RuntimeEnv(rank=rank, world_size=world, local_rank=rank,
                                                         local_world_size=world))
    metrics = [trainer.train_step() for _ in range(steps)]
    return {"losses": [m["loss"] for m in metrics], "grad_norms": [m["grad_norm"] for m in metrics],
            "lrs": [m["lr"] for m in metrics]}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("deepspeed")
    return tiny_overrides(root, run_dir=root / "run", steps=STEPS) + [
        "trainer.save_final=false", "data.micro_batch_size=1", "trainer.eval_interval=1000"]


@pytest.fixture(scope="module")
def native(rank_pools, base):
    return rank_pools.get(2).run(losses_on_rank, base, STEPS, timeout_s=600)


@pytest.mark.parametrize("stage,rel", [(1, 1e-5), (2, 1e-5), (3, 1e-4)])
def test_deepspeed_losses_match_the_native_step(rank_pools, base, native, stage, rel):
    overrides = base + ["optim.backend=deepspeed", f"optim.deepspeed.stage={stage}"]
    results = rank_pools.get(2).run(losses_on_rank, overrides, STEPS, timeout_s=600)
    for got, expected in zip(results, native, strict=True):
        assert got["lrs"] == expected["lrs"]
        assert got["grad_norms"][0] == pytest.approx(expected["grad_norms"][0], rel=1e-5)
        assert got["losses"] == pytest.approx(expected["losses"], rel=rel)
        assert got["grad_norms"] == pytest.approx(expected["grad_norms"], rel=10 * rel)


def resumed_losses_on_rank(overrides: list[str], first: int, steps: int) -> dict[str, list[float]]:
    """`first` steps, a save in DeepSpeed's format, then a new Trainer resuming (trainer.resume=auto)
    for the remaining steps."""
    import torch.distributed as dist

    from trainer.config import compose
    from trainer.distributed import RuntimeEnv
    from trainer.trainer import Trainer

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", EXTENSIONS_DIR)
    world, rank = dist.get_world_size(), dist.get_rank()
    env = RuntimeEnv(rank=rank, world_size=world, local_rank=rank, local_world_size=world)
    trainer = Trainer(compose(overrides), env=env)
    losses = [trainer.train_step()["loss"] for _ in range(first)]
    trainer.save()
    saved = sorted(os.listdir(os.path.join(trainer.run_dir, "deepspeed")))
    del trainer
    resumed = Trainer(compose([*overrides, "trainer.resume=auto"]), env=env)
    start = resumed.step
    losses += [resumed.train_step()["loss"] for _ in range(steps - first)]
    return {"losses": losses, "saved": saved, "start": start}


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_checkpoint_resumes_the_same_losses(rank_pools, base, tmp_path, stage):
    engine = ["optim.backend=deepspeed", f"optim.deepspeed.stage={stage}"]
    without_run_dir = [o for o in base if not o.startswith("trainer.run_dir")]
    straight = rank_pools.get(2).run(losses_on_rank, [*without_run_dir, *engine,
                                                      f"trainer.run_dir={tmp_path / 'straight'}"], 6)
    resumed = rank_pools.get(2).run(resumed_losses_on_rank, [*without_run_dir, *engine,
                                                             f"trainer.run_dir={tmp_path / 'run'}"], 3, 6, timeout_s=600)
    for got, expected in zip(resumed, straight, strict=True):
        assert got["start"] == 3
        assert "latest" in got["saved"] and "step_3" in got["saved"]  # DeepSpeed's layout: latest + a tag directory
        assert got["losses"] == expected["losses"]


# --- validation (plain pytest, no ranks): what the engine cannot run fails before anything starts ---

BAD = [
    (["parallel.tp=2"], 2, "parallel.tp", "data parallelism only"),
    (["parallel.pp=2", "model.num_layers=4"], 2, "parallel.pp", "data parallelism only"),
    (["parallel.cp=2"], 2, "parallel.cp", "data parallelism only"),
    (["model.channel_mixers=[moe]", "model.moe.num_experts=4", "parallel.ep=2"], 2, "parallel.ep",
     "data parallelism only"),
    (["optim.distributed=true"], 2, "optim.distributed", "DeepSpeed shards the optimizer state itself"),
    (["optim.deepspeed.stage=4"], 1, "optim.deepspeed.stage", "ZeRO stage"),
    (["trainer.precision=bf16"], 1, "trainer.precision", "not implemented"),
    (["optim.backend=megatron"], 1, "optim.backend", "must be one of"),
]


@pytest.mark.parametrize("extra,world,field,problem", BAD, ids=[b[2] for b in BAD])
def test_deepspeed_rejects_what_it_cannot_run(extra, world, field, problem):
    from trainer.config import compose
    from trainer.validation import ConfigError, validate

    with pytest.raises(ConfigError) as error:
        validate(compose(["+experiment=quickstart", "optim.backend=deepspeed", *extra]), world_size=world)
    assert (error.value.field, problem in error.value.problem) == (field, True), str(error.value)
    assert error.value.fix


def test_deepspeed_missing_package_is_a_clear_error(monkeypatch):
    import importlib.util

    from trainer.config import compose
    from trainer.validation import ConfigError, validate

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else find_spec(name, *a))
    with pytest.raises(ConfigError, match="needs the deepspeed package") as error:
        validate(compose(["+experiment=quickstart", "optim.backend=deepspeed"]))
    assert "pip install" in error.value.fix
