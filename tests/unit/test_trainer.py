"""The in-process trainer: metrics and their sinks, NaN policy, MFU inputs, fast-path report."""
from __future__ import annotations

import glob
import json
import logging
import os
import sys
import types

import pytest
import torch

from kernels.fast_paths import detect_fast_paths
from trainer.config import LoggerConfig, compose
from trainer.metrics import WandbSink, console_line, format_duration, wandb_mode
from trainer.mfu import table_peak_tflops
from trainer.trainer import NonFiniteLossError, Trainer


def _rows(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_metrics_jsonl_has_the_promised_keys_and_loss_falls(tmp_path, tiny):
    run = tmp_path / "run"
    last = Trainer(compose(tiny(run_dir=run, steps=20))).train()
    rows = _rows(run)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 21))
    for r in train_rows:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu"} <= set(r)
        assert r["tokens_per_s"] > 0 and 0 < r["mfu"] and r["grad_norm"] > 0
    assert [r["step"] for r in rows if "val_loss" in r] == [10, 20]
    assert train_rows[-1]["loss"] < train_rows[0]["loss"] - 0.5
    assert last["val_loss"] == rows[-1]["val_loss"]
    assert os.path.exists(run / "config.yaml") and os.path.exists(run / "checkpoints" / "step_000020")


def test_loss_is_sum_over_global_batch_tokens_not_mean_of_microbatch_means(tmp_path, tiny):
    """The logged loss and the gradient do not depend on how the global batch is split into microbatches."""
    grads, losses = [], []
    for micro in (1, 2, 4):
        t = Trainer(compose(tiny(run_dir=tmp_path / f"m{micro}", steps=3) + [f"data.micro_batch_size={micro}"]))
        t.optimizer.step = lambda: None  # keep the weights so the gradients stay comparable
        losses.append(t.train_step()["loss"])
        mbs = t.data.train_microbatches(0)
        n = sum(mb["loss_mask"].sum() for mb in mbs)
        with t.optim_step.no_sync():  # one process: nothing to reduce, accumulate only
            for mb in mbs:
                (t._loss_sum(mb) / n).backward()
        grads.append(torch.cat([p.grad.flatten() for p in t.model.parameters()]))
    assert losses[1] == pytest.approx(losses[0], rel=1e-6) and losses[2] == pytest.approx(losses[0], rel=1e-6)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grads[2], grads[0], rtol=1e-5, atol=1e-7)


def _poison_after(trainer: Trainer, good_steps: int) -> None:
    original = trainer._loss_sum
    calls = {"n": 0}
    per_step = trainer.data.num_microbatches

    def loss_sum(mb):
        calls["n"] += 1
        value = original(mb)
        return value * float("nan") if calls["n"] > good_steps * per_step else value

    trainer._loss_sum = loss_sum


def test_nan_loss_stops_with_step_value_and_advice(tmp_path, tiny):
    t = Trainer(compose(tiny(run_dir=tmp_path / "run", steps=6)))
    _poison_after(t, good_steps=3)
    with pytest.raises(NonFiniteLossError) as e:
        t.train()
    msg = str(e.value)
    assert "step 4" in msg and "loss=nan" in msg and "optim.lr" in msg and "trainer.nan_policy=skip" in msg


def test_nan_policy_skip_keeps_weights_and_gives_up_after_the_limit(tmp_path, tiny):
    t = Trainer(compose(tiny(run_dir=tmp_path / "run", steps=10) + ["trainer.nan_policy=skip",
                                                                     "trainer.max_skipped_steps=2"]))
    for _ in range(2):
        t.train_step()
    before = [p.detach().clone() for p in t.model.parameters()]
    _poison_after(t, good_steps=0)
    t.train_step()
    t.train_step()  # two skips allowed
    assert all(torch.equal(a, b) for a, b in zip(before, t.model.parameters()))
    with pytest.raises(NonFiniteLossError):
        t.train_step()


def test_tensorboard_and_wandb_offline_sinks(tmp_path, tiny, monkeypatch):
    run = tmp_path / "tb"
    Trainer(compose(tiny(run_dir=run, steps=3) + ["logger=tensorboard"])).train()
    assert glob.glob(str(run / "tensorboard" / "events.out.tfevents.*"))

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    run = tmp_path / "wb"
    Trainer(compose(tiny(run_dir=run, steps=3) + ["logger=wandb"])).train()
    assert glob.glob(str(run / "wandb" / "offline-run-*"))


def _tensorboard_events(run_dir) -> list[tuple[str, int, str]]:
    """(file, step, kind) of every raw event, files in write order."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    events = []
    for path in sorted(glob.glob(str(run_dir / "tensorboard" / "events.out.tfevents.*"))):
        for event in EventFileLoader(path).Load():
            kind = event.WhichOneof("what")
            if kind == "session_log":
                kind = f"session_log:{event.session_log.status}"
            events.append((path, event.step, kind))
    return events


def test_tensorboard_resume_purges_the_replayed_steps(tmp_path, tiny):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    # Logs steps 1-3, saves at step 2 only: a resume replays step 3.
    Trainer(compose(tiny(run_dir=run, steps=3) + ["logger=tensorboard", "trainer.save_interval=2",
                                                  "trainer.save_final=false"])).train()
    Trainer(compose(tiny(run_dir=run, steps=4) + ["logger=tensorboard", "trainer.resume=auto"])).train()
    events = _tensorboard_events(run)
    second_file = events[-1][0]
    start = [step for path, step, kind in events if path == second_file and kind == "session_log:1"]
    assert start == [3]  # purge_step: TensorBoard drops the first run's events from step 3 on
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]


class _FakeWandb(types.ModuleType):
    """Records wandb.init's arguments, define_metric and log calls (the real one would need a server
    for online mode)."""

    def __init__(self):
        super().__init__("wandb")
        self.inits: list[dict] = []
        self.defined: list[tuple] = []
        self.rows: list[dict] = []

    def init(self, **kwargs):
        self.inits.append(kwargs)
        return types.SimpleNamespace(log=lambda row, **k: self.rows.append(row), finish=lambda: None,
                                     define_metric=lambda *a, **k: self.defined.append((a, k)))

    class Histogram:
        def __init__(self, np_histogram):
            self.np_histogram = np_histogram


@pytest.fixture
def fake_wandb(monkeypatch):
    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    warnings: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    logger = logging.getLogger("trainer.metrics")
    logger.addHandler(handler)
    yield fake, warnings
    logger.removeHandler(handler)


def test_wandb_resume_rewinds_online_and_says_offline_cannot(tmp_path, fake_wandb):
    fake, warnings = fake_wandb
    WandbSink(LoggerConfig(wandb_mode="online"), str(tmp_path), "run", {}, resume_step=7)
    run_id = fake.inits[0]["resume_from"].split("?")[0]
    assert fake.inits[0]["resume_from"] == f"{run_id}?_step=7" and "resume" not in fake.inits[0]
    WandbSink(LoggerConfig(wandb_mode="online"), str(tmp_path), "run", {})  # fresh: continue the same id
    assert fake.inits[1]["resume"] == "allow" and fake.inits[1]["id"] == run_id
    assert not warnings
    WandbSink(LoggerConfig(wandb_mode="offline"), str(tmp_path), "run", {}, resume_step=7)
    assert fake.inits[2]["id"] == run_id and "resume_from" not in fake.inits[2]
    assert len(warnings) == 1 and "cannot rewind to step 7" in warnings[0]


def test_wandb_disabled_by_the_environment_is_reported_once(tmp_path, tiny, fake_wandb, monkeypatch):
    fake, warnings = fake_wandb
    monkeypatch.setenv("WANDB_MODE", "disabled")
    Trainer(compose(tiny(run_dir=tmp_path / "run", steps=3) + ["logger=wandb"])).train()
    assert fake.inits[0]["mode"] == "disabled"
    assert [w for w in warnings if "WANDB_MODE=disabled" in w] == warnings and len(warnings) == 1


def test_wandb_mode_choice():
    assert wandb_mode(LoggerConfig(), {}) in ("offline", "online")  # online only if `wandb login` was run
    assert wandb_mode(LoggerConfig(), {"WANDB_API_KEY": "x"}) == "online"
    assert wandb_mode(LoggerConfig(), {"WANDB_API_KEY": "x", "WANDB_MODE": "disabled"}) == "disabled"
    assert wandb_mode(LoggerConfig(wandb_mode="offline"), {"WANDB_API_KEY": "x"}) == "offline"


def test_console_line_shows_every_figure():
    line = console_line(120, 200, {"loss": 4.12344, "lr": 1.2e-3, "grad_norm": 0.5, "tokens_per_s": 12345.0,
                                   "mfu": 0.31, "val_loss": 4.0}, elapsed=75, eta=50)
    for part in ("step 120/200", "[############........]", "loss 4.1234", "val 4.0000", "lr 1.20e-03",
                 "gnorm 0.500", "12.3k tok/s", "MFU 31.0%", "elapsed 01:15", "ETA 00:50"):
        assert part in line, part
    assert format_duration(3725) == "1:02:05"


def test_peak_table_and_fast_paths_report():
    assert table_peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.0
    assert table_peak_tflops("Some CPU", "bf16") is None
    report = detect_fast_paths().describe()
    assert "triton=" in report and "apex=" in report and "transformer_engine=" in report


def test_bf16_autocast_trains(tmp_path, tiny):
    t = Trainer(compose(tiny(run_dir=tmp_path / "run", steps=3) + ["trainer.precision=bf16_autocast"]))
    t.train()
    assert all(p.dtype == torch.float32 for p in t.model.parameters())  # fp32 master weights


def test_dropout_runs_are_reproducible_from_the_seed(tmp_path, tiny):
    losses = []
    for name in ("a", "b"):
        run = tmp_path / name
        Trainer(compose(tiny(run_dir=run, steps=4) + ["model.dropout=0.2"])).train()
        losses.append([r["loss"] for r in _rows(run) if "loss" in r])
    assert losses[0] == losses[1]
