"""Outer optimizers on gloo ranks equal the one-process simulator of G workers, step by step.

The real Trainer runs CO2, local SGD and DiLoCo with every worker on its own ranks. The reference
is optim/outer/simulator.py driven by the one-process model: worker w's gradient is the gradient
of the loss over worker w's samples (the data ranks w * worker_dp ..), normalised over the worker's
tokens. Per step, each worker's loss matches the simulated worker's; after the run
every worker's weights match the simulated worker's (fp32, inner SGD with momentum). Also: local
SGD with tau = 1 trains exactly like data-parallel SGD on the same ranks, and a tp2 worker layout
with the distributed optimizer (the outer state sharded over the worker's dp ranks) matches too.
"""
from __future__ import annotations

import contextlib
import re

import pytest
import torch
import torch.distributed as dist

from optim.config import CO2Config
from optim.outer.simulator import simulate
from tests.conftest import tiny_overrides
from trainer.config import compose
from trainer.data import DataPipeline
from trainer.distributed import RuntimeEnv
from trainer.trainer import Trainer

pytestmark = pytest.mark.xdist_group("rank_pool")

STEPS = 6
LR = 0.05
SGD = ["optim.name=sgd", "optim.momentum=0.9", "optim.weight_decay=0.0", "optim.clip_grad=0",
       "optim.schedule.name=constant", "optim.schedule.warmup_steps=0", f"optim.lr={LR}", "trainer.save_final=false"]


def global_name(name: str) -> str:
    return re.sub(r"^chunks\.\d+\.", "", name)


def outer_overrides(outer: str, co2: dict) -> list[str]:
    return [f"optim.outer={outer}"] + [f"optim.co2.{k}={v}" for k, v in co2.items()]


def train_on_rank(overrides: list[str]) -> dict:
    world = dist.get_world_size()
    env = RuntimeEnv(rank=dist.get_rank(), world_size=world, local_rank=dist.get_rank(), local_world_size=world)
    trainer = Trainer(compose(overrides), env=env)
    metrics = [trainer.train_step() for _ in range(STEPS)]
    trainer.optim_step.finish_param_sync()
    logged = trainer._window_metrics(metrics, seconds=1.0)  # what a log line of these steps shows
    return {"losses": [m["loss"] for m in metrics], "worker": trainer.ps.coords.worker, "logged_loss": logged["loss"],
            "rounds": [m.get("outer/round") for m in metrics], "staleness": metrics[-1].get("outer/staleness"),
            "params": {global_name(n): p.detach().clone() for n, p in trainer.model.named_parameters()}}


def simulated(overrides: list[str], outer: str, co2: dict, make_inner):
    """The simulator on the one-process model: returns the run and the parameter names."""
    cfg = compose(overrides)
    workers, data_ranks = co2["workers"], co2.get("data_ranks", co2["workers"])
    ref = Trainer(cfg)
    named = list(ref.model.named_parameters())
    pipes = [DataPipeline(cfg.data, seed=cfg.seed, dp_rank=d, dp_size=data_ranks, prepared=ref.data.prepared)
             for d in range(data_ranks)]
    per_worker = data_ranks // workers

    def grad_fn(w: int, step: int, params: list[torch.Tensor]):
        with torch.no_grad():
            for (_, p), x in zip(named, params):
                p.copy_(x)
        ref.optim_step.zero_grad()
        microbatches = [mb for d in range(w * per_worker, (w + 1) * per_worker)
                        for mb in pipes[d].train_microbatches(step)]
        tokens = sum(mb["loss_mask"].sum() for mb in microbatches)
        ref.aux_loss_scale.value = 1.0 / float(tokens)  # MoE aux losses: the worker's token contract
        total = 0.0
        for i, mb in enumerate(microbatches):
            with ref.optim_step.no_sync() if i < len(microbatches) - 1 else contextlib.nullcontext():
                loss_sum = ref._loss_sum(mb)
                (loss_sum / tokens).backward()
            total += loss_sum.item()
        ref.optim_step.reduce_and_clip()  # completes the (one-rank) gradient buckets; optim.clip_grad=0
        return total / float(tokens), [p.grad.detach().clone() for _, p in named]

    settings = {k: v for k, v in co2.items() if k != "data_ranks"}
    run = simulate([p.detach().clone() for _, p in named], grad_fn, STEPS, workers, outer, CO2Config(**settings),
                   make_inner)
    return run, [global_name(n) for n, _ in named]


def sgd_inner(params):
    return torch.optim.SGD(params, lr=LR, momentum=0.9)


CASES = {
    "co2": ("co2", {"workers": 2, "tau": 2, "alpha": 0.8, "beta": 0.5, "clip": 0.002, "penalty": "gap"}),
    "localsgd": ("localsgd", {"workers": 2, "tau": 2, "alpha": 1.0, "beta": 0.3, "clip": 0.0, "penalty": "constant"}),
    "diloco": ("diloco", {"workers": 2, "tau": 3, "alpha": 0.7, "beta": 0.9, "clip": 0.0, "penalty": "constant"}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_ranks_equal_the_simulator_step_for_step(tmp_path, rank_pools, case):
    outer, co2 = CASES[case]
    base = tiny_overrides(tmp_path, steps=STEPS) + SGD
    run, names = simulated(base + [f"trainer.run_dir={tmp_path / 'sim'}"], outer, co2, sgd_inner)
    results = rank_pools.get(2).run(train_on_rank, base + outer_overrides(outer, co2))
    assert [r["worker"] for r in results] == [0, 1]
    for r in results:
        # Each rank logs its worker's loss per step (normalised over the worker's tokens).
        assert r["losses"] == pytest.approx([losses[r["worker"]] for losses in run.losses], rel=1e-5)
        assert r["rounds"] == [float((s + 1) // co2["tau"]) for s in range(STEPS)]
        assert r["staleness"] == (1.0 if outer == "co2" else 0.0)
        # The logged loss of the window is the mean over workers.
        assert r["logged_loss"] == pytest.approx(sum(map(sum, run.losses)) / (STEPS * len(results)), rel=1e-5)
        for name, x in zip(names, run.params[-1][r["worker"]]):
            torch.testing.assert_close(r["params"][name], x, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    assert run.applied == ([0, 1] if outer == "co2" else list(range(STEPS // co2["tau"])))
    # The runs really diverged between rounds: worker weights differ after a step inside a round.
    assert not torch.equal(run.params[0][0][0], run.params[0][1][0])


def test_local_sgd_with_tau1_trains_like_data_parallel_sgd(tmp_path, rank_pools):
    base = tiny_overrides(tmp_path, steps=STEPS) + SGD + ["optim.momentum=0.0"]
    dp = rank_pools.get(2).run(train_on_rank, base + [f"trainer.run_dir={tmp_path / 'dp'}"])
    local = rank_pools.get(2).run(train_on_rank, base + [f"trainer.run_dir={tmp_path / 'local'}"] + outer_overrides(
        "localsgd", {"workers": 2, "tau": 1, "alpha": 1.0, "beta": 0.0}))
    # Every sample is a full window: the mean over workers of their losses is the global batch's loss.
    mean = [(a + b) / 2 for a, b in zip(local[0]["losses"], local[1]["losses"])]
    for d, s in zip(dp, local):
        assert mean == pytest.approx(d["losses"], rel=1e-5)
        assert s["logged_loss"] == pytest.approx(d["logged_loss"], rel=1e-5)
        for name, x in d["params"].items():
            torch.testing.assert_close(s["params"][name], x, rtol=1e-5, atol=1e-6)


def adamw_inner(params):
    return torch.optim.AdamW(params, lr=LR / 10, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)


ADAMW = ["optim.name=adamw", f"optim.lr={LR / 10}"]


@pytest.mark.parametrize("model, layout, inner, data_ranks, loss_rel", [
    # Each worker is a tp2 (SP) group: a rank's outer state is its TP shard.
    ([], ["parallel.tp=2", "parallel.sequence_parallel=true"], "sgd", 2, 1e-5),
    # Each worker is dp2 with the distributed optimizer: the outer state is sharded over its dp ranks.
    # AdamW's first steps move by ~lr * sign(g), so rounding-level differences weigh more (test_parity).
    (["data.micro_batch_size=1"], ["optim.distributed=true"], "adamw", 4, 1e-4),
    # Each worker is a 2-stage pipeline with the embedding tied over its first and last stage.
    (["model.tie_embeddings=true"], ["parallel.pp=2"], "sgd", 2, 1e-5),
    # Each worker folds 4 experts over ep2 (= its dp2); aux losses follow the per-worker token contract.
    (["model.channel_mixers=[moe]", "model.moe.num_experts=4", "model.moe.ffn_hidden_size=32",
      "model.moe.aux_loss_coeff=0.01", "data.micro_batch_size=1"], ["parallel.ep=2"], "sgd", 4, 1e-5),
], ids=["tp2-sp-workers", "dp2-distributed-optimizer-workers", "pp2-tied-workers", "moe-ep2-workers"])
def test_parallel_workers_equal_the_simulator(tmp_path, rank_pools, model, layout, inner, data_ranks, loss_rel):
    """World 4 = 2 workers of 2 ranks each."""
    co2 = {"workers": 2, "tau": 2, "alpha": 0.8, "beta": 0.5, "clip": 0.0, "penalty": "constant"}
    base = tiny_overrides(tmp_path, steps=STEPS) + SGD + (ADAMW if inner == "adamw" else []) + model
    run, names = simulated(base + [f"trainer.run_dir={tmp_path / 'sim'}"], "co2", {**co2, "data_ranks": data_ranks},
                           adamw_inner if inner == "adamw" else sgd_inner)
    results = rank_pools.get(4).run(train_on_rank, base + layout + outer_overrides("co2", co2))
    assert [r["worker"] for r in results] == [0, 0, 1, 1]
    for r in results:
        assert r["losses"] == pytest.approx([losses[r["worker"]] for losses in run.losses], rel=loss_rel)
    if inner == "adamw":  # whole weights on every rank: replicas in a worker agree, and match the simulator
        for r in results:
            for name, x in zip(names, run.params[-1][r["worker"]]):
                torch.testing.assert_close(r["params"][name], x, rtol=1e-4, atol=LR / 10,
                                           msg=lambda m, n=name: f"{n}: {m}")
        for a, b in ((results[0], results[1]), (results[2], results[3])):
            assert all(torch.equal(a["params"][n], b["params"][n]) for n in names)


def train_with_saves(overrides: list[str], stop_at: int | None = None) -> dict:
    world = dist.get_world_size()
    env = RuntimeEnv(rank=dist.get_rank(), world_size=world, local_rank=dist.get_rank(), local_world_size=world)
    trainer = Trainer(compose(overrides), env=env)
    resumed_at = trainer.step
    stop = stop_at if stop_at is not None else trainer.cfg.trainer.max_steps
    losses = []
    while trainer.step < stop:
        losses.append(trainer.train_step()["loss"])
        if trainer.step % trainer.cfg.trainer.save_interval == 0:
            trainer.save()
    trainer.checkpointer.wait()
    trainer.optim_step.finish_param_sync()
    return {"losses": losses, "resumed_at": resumed_at, "round": trainer.optim_step.round,
            "params": {global_name(n): p.detach().clone() for n, p in trainer.model.named_parameters()}}


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync-save", "async-save"])
def test_resume_mid_round_with_an_average_in_flight_is_bit_exact(tmp_path, rank_pools, asynchronous):
    """tau 3, saved after step 4: round 1 is half done and round 0's average is still in flight."""
    base = tiny_overrides(tmp_path, steps=8) + SGD + ADAMW + ["trainer.save_interval=4", f"trainer.async_save={asynchronous}"] \
        + outer_overrides("co2", {"workers": 2, "tau": 3, "alpha": 0.8, "beta": 0.5, "clip": 0.01, "penalty": "gap"})
    pool = rank_pools.get(2)
    straight = pool.run(train_with_saves, base + [f"trainer.run_dir={tmp_path / 'straight'}"])
    split = tmp_path / "split"
    first = pool.run(train_with_saves, base + [f"trainer.run_dir={split}"], 4)
    from trainer.checkpoint_dcp import read_metadata, stored_shapes

    shapes = stored_shapes(read_metadata(str(split / "checkpoints" / "step_000004")))
    for key in ("model", "optim/embedding.weight/exp_avg", "optim/embedding.weight/outer_anchor",
                "optim/embedding.weight/outer_momentum", "optim/embedding.weight/outer_pending"):
        assert shapes[key if key != "model" else "model/embedding.weight"] == shapes["model/embedding.weight"], key
    assert "worker1/model/embedding.weight" in shapes and "worker1/optim/embedding.weight/exp_avg" in shapes
    second = pool.run(train_with_saves, base + [f"trainer.run_dir={split}", "trainer.resume=auto"])
    for s, a, b in zip(straight, first, second):
        assert b["resumed_at"] == 4 and b["round"] == s["round"] == 2
        assert a["losses"] + b["losses"] == s["losses"]  # exact float equality
        for name, x in s["params"].items():
            assert torch.equal(b["params"][name], x), name
    assert not torch.equal(straight[0]["params"]["embedding.weight"], straight[1]["params"]["embedding.weight"])


def train_over_slow_link(overrides: list[str], latency_s: float) -> list[float]:
    """co2 whose outer average first sleeps on a background thread (bench/co2.py's injected link)."""
    import dataclasses

    from optim.factory import build_inner_step
    from optim.outer.average import SlowLink
    from optim.outer.step import OuterOptimizerStep

    def factory(inputs):
        inner = build_inner_step(dataclasses.replace(inputs, ps=inputs.ps.within_worker()))
        return OuterOptimizerStep(inner, inputs, link=SlowLink(latency_s))

    world = dist.get_world_size()
    env = RuntimeEnv(rank=dist.get_rank(), world_size=world, local_rank=dist.get_rank(), local_world_size=world)
    trainer = Trainer(compose(overrides), env=env, optimizer_step=factory)
    return [trainer.train_step()["loss"] for _ in range(STEPS)]


def test_an_average_launched_from_the_link_thread_gives_the_same_training(tmp_path, rank_pools):
    """The average in flight on its own communicator never mixes with the trainer's collectives over
    the workers (the loss mean runs on ps.outer while the thread sends)."""
    outer, co2 = CASES["co2"]
    base = tiny_overrides(tmp_path, steps=STEPS) + SGD + outer_overrides(outer, co2)
    plain = rank_pools.get(2).run(train_on_rank, base + [f"trainer.run_dir={tmp_path / 'plain'}"])
    slow = rank_pools.get(2).run(train_over_slow_link, base + [f"trainer.run_dir={tmp_path / 'slow'}"], 0.05)
    for p, s in zip(plain, slow):
        assert s == p["losses"]
