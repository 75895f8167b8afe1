"""Faults on real gloo ranks (trainer/faults.py, docs/launch.md): an Inf injected on one rank of tp2 x dp2
is located and its skipped step leaves weights and optimizer state untouched; SIGTERM on one rank and
trainer.time_limit stop every rank after the same step with a checkpoint the resume continues from;
a hung rank makes the others fail within parallel.timeout_s naming the collective, and every rank
dumps its stack."""
from __future__ import annotations

import json
import os
import signal
import time

import pytest
import torch
import torch.distributed as dist

from tests.conftest import tiny_overrides
from trainer.config import compose
from trainer.distributed import RuntimeEnv
from trainer.faults import CollectiveTimeoutError, RunStopped
from trainer.trainer import Trainer

pytestmark = pytest.mark.xdist_group("rank_pool")


def _env() -> RuntimeEnv:
    world = dist.get_world_size()
    return RuntimeEnv(rank=dist.get_rank(), world_size=world, local_rank=dist.get_rank(), local_world_size=world)


def _optimizer_state(trainer: Trainer) -> list[torch.Tensor]:
    return [t.detach().clone() for s in trainer.optim_step.param_states() for t in (*s.tensors.values(), s.step)]


def inf_on_one_rank(overrides: list[str], bad_rank: int, module: str) -> dict:
    """Step 1 clean; step 2 with `module`'s output set to Inf on `bad_rank` (skipped); step 3 clean."""
    trainer = Trainer(compose(overrides), env=_env())
    trainer.train_step()
    weights = [p.detach().clone() for p in trainer.model.parameters()]
    state = _optimizer_state(trainer)
    handle = None
    if dist.get_rank() == bad_rank:
        target = dict(trainer.model.named_modules())[module]
        handle = target.register_forward_hook(lambda m, i, out: out * float("inf"))
    skipped = trainer.train_step()
    if handle is not None:
        handle.remove()
    untouched = (all(torch.equal(a, p) for a, p in zip(weights, trainer.model.parameters()))
                 and all(torch.equal(a, b) for a, b in zip(state, _optimizer_state(trainer))))
    after = trainer.train_step()
    return {"message": trainer.last_non_finite, "skipped_loss": skipped["loss"], "untouched": untouched,
            "next_loss": after["loss"], "step": trainer.step}


def test_inf_on_one_rank_is_located_and_the_skipped_step_changes_nothing(tmp_path, rank_pools):
    overrides = tiny_overrides(tmp_path, steps=3) + ["parallel.tp=2", "trainer.nan_policy=skip"]
    results = rank_pools.get(4).run(inf_on_one_rank, overrides, 3, "layers.1.mlp.w1")
    for r in results:
        assert r["skipped_loss"] != r["skipped_loss"] or abs(r["skipped_loss"]) == float("inf")
        assert r["untouched"] and r["next_loss"] == pytest.approx(r["next_loss"]) and r["step"] == 3
        assert abs(r["next_loss"]) < 100
    message = results[0]["message"]
    assert message == results[3]["message"]  # every rank reports the same diagnosis
    assert "first went non-finite in layers.1.mlp.w1 (layer 1) on rank 3" in message, message


def _metrics(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def train_until_stopped(overrides: list[str], signal_rank: int | None, at_step: int) -> dict:
    """Trainer.train() with SIGTERM sent to `signal_rank` by itself after step `at_step` (None: rely on
    trainer.time_limit); returns how it stopped."""
    trainer = Trainer(compose(overrides), env=_env())
    step_fn = trainer.train_step

    def step_then_signal():
        out = step_fn()
        if dist.get_rank() == signal_rank and trainer.step == at_step:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    trainer.train_step = step_then_signal
    try:
        trainer.train()
    except RunStopped as e:
        # A stopping run keeps its handler (the process is about to exit); this pool worker lives on.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        return {"step": e.step, "reason": e.reason, "checkpoint": e.checkpoint, "exit_code": e.exit_code}
    return {"step": None}


def train_to_end(overrides: list[str]) -> None:
    Trainer(compose(overrides), env=_env()).train()


def test_sigterm_on_one_rank_stops_every_rank_after_the_same_step_and_resumes(tmp_path, rank_pools):
    pool = rank_pools.get(2)
    base = tiny_overrides(tmp_path, steps=6) + ["trainer.eval_interval=0", "trainer.eval_at_end=false"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    pool.run(train_to_end, base + [f"trainer.run_dir={straight}"])
    results = pool.run(train_until_stopped, base + [f"trainer.run_dir={stopped}"], 1, 3)
    assert [r["step"] for r in results] == [3, 3]
    assert results[1]["reason"] == "SIGTERM received" and results[1]["exit_code"] == 75
    assert results[0]["reason"] == "a signal reached another rank"
    assert sorted(os.listdir(stopped / "checkpoints")) == ["step_000003"]  # save_interval=0: the stop's save
    assert os.path.exists(stopped / "checkpoints" / "step_000003" / "meta.json")
    assert [r["step"] for r in _metrics(stopped)] == [1, 2, 3]
    pool.run(train_to_end, base + [f"trainer.run_dir={stopped}", "trainer.resume=auto"])
    rows = _metrics(stopped)
    assert [r["step"] for r in rows] == list(range(1, 7))  # no step counted twice
    assert [r["loss"] for r in rows] == [r["loss"] for r in _metrics(straight)]  # bit-exact continuation

    limited = pool.run(train_until_stopped, base + [f"trainer.run_dir={tmp_path / 'limited'}",
                                                    "trainer.time_limit=1e-6"], None, 0)
    assert [r["step"] for r in limited] == [1, 1]
    assert limited[0]["reason"] == "trainer.time_limit=1e-06 minutes reached"


def hang_one_rank(overrides: list[str], hung_rank: int, at_step: int, hang_s: float) -> dict:
    """`hung_rank` sleeps in its data loading at step `at_step` while the others wait in a collective."""
    trainer = Trainer(compose(overrides), env=_env())
    load = trainer.data.train_microbatches
    started = {}

    def hanging_load(step: int):
        if step == at_step - 1:
            started["step"] = time.monotonic()
            if dist.get_rank() == hung_rank:
                time.sleep(hang_s)  # the hang: this frame must show in the rank's stack dump
        return load(step)

    trainer.data.train_microbatches = hanging_load
    try:
        trainer.train()
    except Exception as e:  # noqa: BLE001 -- the hung rank may meet its peer's exit in another way
        text = str(e) if isinstance(e, CollectiveTimeoutError) else f"{type(e).__name__}: {e}"
        return {"error": text, "seconds": time.monotonic() - started["step"], "run_dir": trainer.run_dir}
    return {"error": None}


def test_a_hung_rank_fails_its_peers_naming_the_collective_and_every_rank_dumps_its_stack(tmp_path, rank_pools):
    pool = rank_pools.get(2)
    overrides = tiny_overrides(tmp_path, steps=4) + ["parallel.timeout_s=3"]
    try:
        results = pool.run(hang_one_rank, overrides, 1, 2, 12.0, timeout_s=55)
    finally:
        pool.close(force=True)  # its gloo subgroups timed out: the next test gets a fresh pool
    waiting = results[0]
    assert waiting["error"].startswith("rank 0: all_reduce on the dp_cp group (global ranks 0, 1) did not "
                                       "complete within parallel.timeout_s=3 s"), waiting["error"]
    assert waiting["seconds"] < 12.0  # failed within the timeout (plus the dumps' grace), before the hang ended
    stacks = os.path.join(waiting["run_dir"], "stacks")
    assert sorted(os.listdir(stacks)) == ["rank00000.txt", "rank00001.txt"]
    with open(os.path.join(stacks, "rank00001.txt")) as f:
        hung = f.read()
    assert "asked for after: rank 0: all_reduce on the dp_cp group" in hung
    assert "hanging_load" in hung  # the hung rank's main thread, caught in the act
