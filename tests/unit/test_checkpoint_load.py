"""Weights-only loads, the consolidated export, asynchronous saves, bad input, and saves killed
half-way (docs/checkpoints.md)."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from tests.conftest import REPO_ROOT
from trainer.checkpoint import find_latest_checkpoint, list_checkpoints
from trainer.checkpoint_boxes import global_name
from trainer.config import compose
from trainer.validation import ConfigError


def _trainer(overrides: list[str]):
    from trainer.trainer import Trainer

    return Trainer(compose(overrides))


def _weights(trainer) -> dict[str, torch.Tensor]:
    return {global_name(n): p.detach().clone() for n, p in trainer.model.named_parameters()}


def _trained(tiny, tmp_path, name: str, *extra: str, steps: int = 3):
    t = _trainer(tiny(run_dir=tmp_path / name, steps=steps) + list(extra))
    t.train()
    return t, str(tmp_path / name / "checkpoints" / f"step_{steps:06d}")


def test_weights_only_load_starts_a_fresh_optimizer_schedule_and_data(tmp_path, tiny):
    source, path = _trained(tiny, tmp_path, "source")
    tuned = _trainer(tiny(run_dir=tmp_path / "tuned", steps=3) + [f"trainer.load={path}"])
    assert tuned.step == 0 and not tuned.optimizer.state  # nothing but the weights
    for name, w in _weights(source).items():
        assert torch.equal(_weights(tuned)[name], w), name
    # A resume of the fine-tuning run's own checkpoint wins over trainer.load.
    tuned.train()
    again = _trainer(tiny(run_dir=tmp_path / "tuned", steps=5) + [f"trainer.load={path}", "trainer.resume=auto"])
    assert again.step == 3


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_export_is_one_process_model_that_trainer_load_accepts(tmp_path, tiny, dtype):
    from safetensors.torch import load_file

    source, path = _trained(tiny, tmp_path, "source", "trainer.precision=bf16", "model.vocab_size=4099")
    out = tmp_path / "exported"
    subprocess.run([sys.executable, os.path.join(REPO_ROOT, "launch", "export.py"), path, str(out), "--dtype", dtype],
                   check=True, capture_output=True)
    assert sorted(os.listdir(out)) == ["config.yaml", "model.safetensors"]
    tensors = load_file(str(out / "model.safetensors"))
    reference = _weights(source)
    assert tensors.keys() == reference.keys()
    masters = {global_name(n): m for n, m in zip(
        [n for n, _ in source.model.named_parameters()], source.optim_step.masters)}
    for name, t in tensors.items():
        assert t.dtype == getattr(torch, {"fp32": "float32", "bf16": "bfloat16"}[dtype])
        # fp32 exports hold the bf16 run's fp32 masters; bf16 ones its weights.
        assert torch.equal(t, masters[name] if dtype == "fp32" else reference[name]), name
    assert tensors["embedding.weight"].shape[0] == 4099  # vocabulary padding removed

    loaded = _trainer(tiny(run_dir=tmp_path / "loaded", steps=3) + [f"trainer.load={out}",
                                                                   "model.vocab_size=4099"])
    for name, w in _weights(loaded).items():
        assert torch.equal(w, tensors[name].float()), name


def test_async_save_resumes_bit_exactly_and_the_run_waits_for_its_last_save(tmp_path, tiny):
    extra = ["model.dropout=0.1", "trainer.save_interval=2", "trainer.save_final=true"]
    straight = _trainer(tiny(run_dir=tmp_path / "straight", steps=6) + extra)
    expected = [straight.train_step()["loss"] for _ in range(6)]
    first = _trainer(tiny(run_dir=tmp_path / "async", steps=6) + [*extra, "trainer.async_save=true"])
    first.cfg.trainer.max_steps = 4  # stop after the step-4 save, as a killed job would
    first.train()
    assert [s for s, _ in list_checkpoints(str(tmp_path / "async"))] == [2, 4]  # complete when train() returns
    second = _trainer(tiny(run_dir=tmp_path / "async", steps=6) + [*extra, "trainer.resume=auto"])
    assert second.step == 4
    assert [second.train_step()["loss"] for _ in range(2)] == expected[4:]


def test_another_model_shape_is_one_clear_error_naming_the_parameter(tmp_path, tiny):
    _, path = _trained(tiny, tmp_path, "source")
    for mode in (f"trainer.resume={path}", f"trainer.load={path}"):
        field = mode.split("=")[0]
        with pytest.raises(ConfigError) as e:
            _trainer(tiny(run_dir=tmp_path / "other", steps=3) + [mode, "model.hidden_size=48"])
        assert str(e.value).startswith(f"{field}=")
        assert ": embedding.weight has shape [4096, 32] in the checkpoint but [4096, 48] in this model" in str(e.value)
        assert "Fix: use the model.* settings of the checkpoint's config.yaml" in str(e.value)
    assert sorted(os.listdir(tmp_path / "source" / "checkpoints")) == ["step_000003"]  # nothing overwritten


def test_missing_path_and_missing_marker_are_clear_errors(tmp_path, tiny):
    with pytest.raises(ConfigError, match=r"trainer.load=.*no such checkpoint"):
        _trainer(tiny(run_dir=tmp_path / "a", steps=3) + [f"trainer.load={tmp_path / 'nowhere'}"])
    _, path = _trained(tiny, tmp_path, "source")
    os.remove(os.path.join(path, "meta.json"))
    for mode in ("trainer.resume", "trainer.load"):
        with pytest.raises(ConfigError, match=rf"{mode}=.*is incomplete \(no meta.json.*Fix: use a complete"):
            _trainer(tiny(run_dir=tmp_path / "b", steps=3) + [f"{mode}={path}"])


# A writer that saves steps 1, 2, ... (a few MB each, every tensor filled with its step) until killed.
WRITER = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, sys.argv[2])
    from trainer.checkpoint import commit_save, prepare_save
    from trainer.checkpoint_boxes import Box, Entry
    from trainer.checkpoint_dcp import save_boxes
    step = 0
    while True:
        step += 1
        entries = [Entry(f"model/w{i}", (256, 1024), [Box((0, 0), torch.full((256, 1024), float(step)))])
                   for i in range(4)]
        pending = prepare_save(sys.argv[1], step)
        save_boxes(pending.tmp, entries, {"trainer": {"step": step}}, distributed=False)
        commit_save(pending, {}, keep_last=2)
        print(step, flush=True)
""")


def test_killing_the_writer_mid_save_never_loses_the_newest_complete_checkpoint(tmp_path, caplog):
    from trainer.checkpoint_dcp import load_whole

    rng = random.Random(21)
    for run in range(3):
        run_dir = tmp_path / f"run{run}"
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(run_dir), REPO_ROOT], stdout=subprocess.PIPE,
                                text=True)
        assert proc.stdout.readline().strip() == "1"  # imports done, one save on disk
        time.sleep(rng.uniform(0.05, 1.0))  # then killed at some point of a later save
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        with caplog.at_level("WARNING"):
            path, meta = find_latest_checkpoint(str(run_dir))
        value = load_whole(path, ["model/w0", "model/w3"])
        assert all((t == meta["step"]).all() for t in value.values()), (path, meta)
        unfinished = [n for n in os.listdir(run_dir / "checkpoints") if n.startswith(".tmp_")]
        for name in unfinished:
            assert name in caplog.text  # named and skipped
