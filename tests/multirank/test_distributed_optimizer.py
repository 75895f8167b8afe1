"""The distributed optimizer (optim.distributed=true) trains exactly like the all-reduce step.

Each layout runs the real Trainer for a few steps twice from the same seed: with the default step
(which the parity matrix ties to one process) and with the distributed optimizer. Losses, grad
norms and the full weights after the last step must agree to fp32 rounding; a checkpoint of the
distributed optimizer (one file per rank) resumes bit-exactly.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.conftest import tiny_overrides
from tests.multirank.test_parity import MOE, global_name
from tests.multirank.test_sharded_checkpoint import train_losses
from trainer.config import compose
from trainer.distributed import RuntimeEnv
from trainer.trainer import Trainer

pytestmark = pytest.mark.xdist_group("rank_pool")

STEPS = 3


def _env() -> RuntimeEnv:
    world = dist.get_world_size()
    return RuntimeEnv(rank=dist.get_rank(), world_size=world, local_rank=dist.get_rank(), local_world_size=world)


def train(overrides: list[str], steps: int = STEPS) -> dict:
    trainer = Trainer(compose(overrides), env=_env())
    metrics = [trainer.train_step() for _ in range(steps)]
    trainer.optim_step.finish_param_sync()  # with overlap_param_gather the last gather is in flight
    weights = {global_name(n): p.detach().clone() for n, p in trainer.model.named_parameters()}
    return {"losses": [m["loss"] for m in metrics], "grad_norms": [m["grad_norm"] for m in metrics],
            "weights": weights, "comm": trainer.comm_stats.summary(), "kind": type(trainer.optim_step).__name__}


LAYOUTS = {
    "dp2": (2, ["data.micro_batch_size=1"]),
    "tp2-sp-dp2": (4, ["parallel.tp=2", "parallel.sequence_parallel=true"]),
    "pp2-dp2-tied": (4, ["parallel.pp=2", "model.tie_embeddings=true", "data.micro_batch_size=1"]),
    "cp2-dp2": (4, ["parallel.cp=2"]),
    "moe-ep2-edp2": (4, [*MOE, "parallel.ep=2", "data.micro_batch_size=1"]),
}


# bf16 weights, fp32 main grads and masters: sharding the masters and moments changes nothing but the
# rounding of the clip coefficient (the norm sums other pieces), which may flip a bf16 rounding.
CASES = [("fp32", name) for name in LAYOUTS] + [("bf16", name) for name in
                                                ("dp2", "tp2-sp-dp2", "pp2-dp2-tied", "moe-ep2-edp2")]
WEIGHT_TOLERANCE = {"fp32": {"rtol": 1e-4, "atol": 2e-5}, "bf16": {"rtol": 1e-2, "atol": 1e-3}}


@pytest.mark.parametrize("precision,name", CASES, ids=[f"{p}-{n}" for p, n in CASES])
def test_distributed_optimizer_matches_the_all_reduce_step(tmp_path, rank_pools, precision, name):
    world, layout = LAYOUTS[name]
    base = tiny_overrides(tmp_path, steps=10) + ["trainer.save_final=false", "model.dropout=0.0",
                                                 f"trainer.precision={precision}", *layout]
    pool = rank_pools.get(world)
    plain = pool.run(train, base + [f"trainer.run_dir={tmp_path / 'plain'}"])
    sharded = pool.run(train, base + [f"trainer.run_dir={tmp_path / 'sharded'}", "optim.distributed=true"])
    for p, s in zip(plain, sharded):
        assert s["kind"] == "DistributedOptimizerStep" and p["kind"] == "BucketedOptimizerStep"
        assert s["losses"] == pytest.approx(p["losses"], rel=1e-5)
        assert s["grad_norms"] == pytest.approx(p["grad_norms"], rel=1e-5)
        assert s["weights"].keys() == p["weights"].keys()
        for key, w in p["weights"].items():
            assert w.dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
            torch.testing.assert_close(s["weights"][key], w, **WEIGHT_TOLERANCE[precision], msg=key)
        # Gradients are reduce-scattered, not all-reduced, over the data-parallel group.
        assert s["comm"].get("comm/dp_cp/reduce_scatter_bytes", 0) > 0
        assert "comm/dp_cp/all_reduce_bytes" not in s["comm"] or (
            s["comm"]["comm/dp_cp/all_reduce_bytes"] < p["comm"]["comm/dp_cp/all_reduce_bytes"])


@pytest.mark.parametrize("name", ["dp2", "pp2-dp2-tied", "moe-ep2-edp2"])
def test_overlapped_parameter_gather_gives_the_same_training(tmp_path, rank_pools, name):
    """The gathers wait in forward pre-hooks instead of after the update: the same numbers exactly."""
    world, layout = LAYOUTS[name]
    base = tiny_overrides(tmp_path, steps=10) + ["trainer.save_final=false", "model.dropout=0.0",
                                                 "optim.distributed=true", *layout]
    pool = rank_pools.get(world)
    blocking = pool.run(train, base + [f"trainer.run_dir={tmp_path / 'blocking'}"])
    overlapped = pool.run(train, base + [f"trainer.run_dir={tmp_path / 'overlap'}", "optim.overlap_param_gather=true"])
    for b, o in zip(blocking, overlapped):
        assert o["losses"] == b["losses"] and o["grad_norms"] == b["grad_norms"]
        for key, w in b["weights"].items():
            assert torch.equal(o["weights"][key], w), key


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_distributed_optimizer_checkpoint_resumes_bit_exactly(tmp_path, rank_pools, precision):
    base = tiny_overrides(tmp_path, steps=6) + ["optim.distributed=true", "trainer.save_interval=3",
                                                 "data.micro_batch_size=1", f"trainer.precision={precision}"]
    pool = rank_pools.get(2)
    straight = pool.run(train_losses, base + [f"trainer.run_dir={tmp_path / 'straight'}"])
    split = tmp_path / "split"
    first = pool.run(train_losses, base + [f"trainer.run_dir={split}"], 3)
    # Each rank's pieces of the moments are stored as parts of one global tensor per parameter.
    from trainer.checkpoint_dcp import read_metadata, stored_shapes

    shapes = stored_shapes(read_metadata(str(split / "checkpoints" / "step_000003")))
    assert shapes["optim/embedding.weight/exp_avg"] == shapes["model/embedding.weight"]
    second = pool.run(train_losses, base + [f"trainer.run_dir={split}", "trainer.resume=auto"])
    for s, a, b in zip(straight, first, second):
        assert a + b == s  # exact float equality


def state_bytes(overrides: list[str]) -> dict:
    from optim.memory import measured_state_bytes

    trainer = Trainer(compose(overrides), env=_env())
    trainer.train_step()  # the optimizer state exists after the first update
    held = measured_state_bytes(trainer.optim_step)
    return {"per_param": held.per_param, "padding": held.padding, "params": held.params}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("distributed", [False, True], ids=["all-reduce", "distributed"])
def test_measured_bytes_per_parameter_match_the_analytic_table(tmp_path, rank_pools, distributed, precision):
    from optim.memory import analytic_bytes_per_param

    overrides = tiny_overrides(tmp_path, steps=3) + [f"optim.distributed={str(distributed).lower()}",
                                                     "trainer.save_final=false", f"trainer.precision={precision}"]
    results = rank_pools.get(2).run(state_bytes, overrides)
    # fp32: 16, or 8 + 8/2 = 12; bf16: 18, or 6 + 12/2 = 12
    expected = analytic_bytes_per_param(precision, distributed, d=2)
    for r in results:
        assert r["per_param"] == pytest.approx(expected, rel=0.01), r
        assert r["padding"] < (4 + 2) * 2 * 8  # at most d - 1 elements per bucket, reported apart
