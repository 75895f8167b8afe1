"""torchrun end to end: metrics.jsonl, a checkpoint, the config, and data parallelism over 2 ranks."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT, tiny_overrides

pytestmark = pytest.mark.e2e


def _torchrun(nproc: int, overrides: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           os.path.join(REPO_ROOT, "launch", "train.py"), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _metrics(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_torchrun_trains_logs_and_checkpoints(tmp_path):
    run_dir = tmp_path / "run1"
    proc = _torchrun(1, tiny_overrides(tmp_path, run_dir=run_dir, steps=20) + ["trainer.save_interval=10"])
    rows = _metrics(run_dir)
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 21))
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu"):
        assert all(key in r for r in rows if "loss" in r), key
    assert [r["step"] for r in rows if "val_loss" in r] == [10, 20]
    assert rows[-1]["loss"] < rows[0]["loss"]
    ckpts = sorted(os.listdir(run_dir / "checkpoints"))
    assert ckpts == ["step_000010", "step_000020"]
    assert (run_dir / "config.yaml").exists() and (run_dir / "train.log").exists()
    assert "final validation loss" in proc.stdout


def test_two_data_parallel_ranks_match_one_rank(tmp_path):
    """dp=2 over torchrun reproduces the 1-rank loss curve; only rank 0 writes shared files."""
    one, two = tmp_path / "one", tmp_path / "two"
    _torchrun(1, tiny_overrides(tmp_path, run_dir=one, steps=8))
    proc = _torchrun(2, tiny_overrides(tmp_path, run_dir=two, steps=8))
    a = [r["loss"] for r in _metrics(one) if "loss" in r]
    b = [r["loss"] for r in _metrics(two) if "loss" in r]
    assert len(a) == len(b) == 8
    assert b == pytest.approx(a, rel=1e-5)
    assert sum("| loss " in line for line in proc.stdout.splitlines()) == 8  # rank 0 logs, once


def test_bad_override_fails_fast_with_the_field(tmp_path):
    cmd = [sys.executable, os.path.join(REPO_ROOT, "launch", "train.py"), "+experiment=quickstart",
           "model.num_kv_heads=3", f"trainer.run_dir={tmp_path / 'never'}"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "model.num_kv_heads=3" in proc.stderr and "Fix:" in proc.stderr
    assert not (tmp_path / "never").exists()
