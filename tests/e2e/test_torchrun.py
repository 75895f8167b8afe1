"""torchrun end to end: metrics.jsonl, a checkpoint, the config, and data parallelism over 2 ranks."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO_ROOT, tiny_overrides

pytestmark = pytest.mark.e2e


def _torchrun(nproc: int, overrides: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           os.path.join(REPO_ROOT, "launch", "train.py"), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # A hung rank: ask every process of the job for its stacks (launch/train.py registers SIGUSR1
        # with faulthandler), then kill the job and fail with what they printed.
        # torchrun starts its workers in sessions of their own, so find them by parentage.
        workers = _descendants(proc.pid)
        _signal_all(workers, signal.SIGUSR1)
        time.sleep(3)
        _signal_all([proc.pid, *workers], signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun timed out after {timeout}s; stacks:\n{stderr[-8000:]}")
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def assert_dcp_checkpoint(path) -> None:
    """DCP's index and data files, the run's config and the marker (written last)."""
    names = set(os.listdir(path))
    assert {".metadata", "config.yaml", "meta.json"} <= names and any(n.endswith(".distcp") for n in names), names


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


QUICKSTART_10 = ["+experiment=quickstart", "trainer.max_steps=10", "trainer.log_interval=1",
                 "trainer.eval_interval=0", "trainer.eval_at_end=false", "trainer.save_interval=0",
                 "optim.schedule.warmup_steps=2"]


# Session-scoped: xdist interleaves other modules' tests, which would tear a module fixture down
# and run it again; its xdist group keeps every user on one worker.
@pytest.fixture(scope="session")
def quickstart_one_rank(tmp_path_factory) -> list[float]:
    """The 1-rank loss curve of the quickstart's first 10 steps (the reference of the layouts below)."""
    run_dir = tmp_path_factory.mktemp("quickstart") / "one"
    _torchrun(1, QUICKSTART_10 + [f"trainer.run_dir={run_dir}"])
    return [r["loss"] for r in _metrics(run_dir) if "loss" in r]


# Both layouts on one xdist worker: the one-rank reference (a module fixture) is then run once.
@pytest.mark.xdist_group("quickstart_layouts")
@pytest.mark.parametrize("nproc,layout", [
    (4, ["parallel.tp=2", "parallel.sequence_parallel=true"]),
    (8, ["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.pp=2", "data.micro_batch_size=3"]),
], ids=["tp2-sp-dp2", "tp2-sp-pp2-dp2"])
def test_quickstart_layout_matches_one_rank(tmp_path, quickstart_one_rank, nproc, layout):
    """`make train`'s layouts reproduce the 1-rank loss curve of the quickstart for 10 steps and
    write a DCP checkpoint (docs/checkpoints.md)."""
    run_dir = tmp_path / "layout"
    proc = _torchrun(nproc, QUICKSTART_10 + [f"trainer.run_dir={run_dir}", *layout], timeout=500)
    losses = [r["loss"] for r in _metrics(run_dir) if "loss" in r]
    assert len(losses) == len(quickstart_one_rank) == 10
    assert losses == pytest.approx(quickstart_one_rank, rel=1e-5)
    assert "tp=2" in proc.stdout and "dp=2" in proc.stdout
    rows = _metrics(run_dir)
    assert rows[-1]["comm/tp/all_gather_bytes"] > 0 and rows[-1]["comm/tp/reduce_scatter_bytes"] > 0
    if "parallel.pp=2" in layout:
        assert rows[-1]["comm/pp/send_bytes"] > 0
    assert_dcp_checkpoint(run_dir / "checkpoints" / "step_000010")


def test_bad_override_fails_fast_with_the_field(tmp_path):
    cmd = [sys.executable, os.path.join(REPO_ROOT, "launch", "train.py"), "+experiment=quickstart",
           "model.num_kv_heads=3", f"trainer.run_dir={tmp_path / 'never'}"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2
    assert "model.num_kv_heads=3" in proc.stderr and "Fix:" in proc.stderr
    assert not (tmp_path / "never").exists()


def test_moe_quickstart_folded_on_8_ranks_matches_one_process(tmp_path):
    """moe_quickstart on 8 ranks (attention tp2 x dp4, experts ep4 x edp2) gives the one-process
    losses; its metrics carry the aux losses and the load imbalance; capacity mode stays finite."""
    common = ["+experiment=moe_quickstart", "trainer.max_steps=6", "trainer.log_interval=1",
              "trainer.eval_interval=0", "trainer.eval_at_end=false", "optim.schedule.warmup_steps=2"]
    folded, single, capacity = tmp_path / "folded", tmp_path / "single", tmp_path / "capacity"
    _torchrun(8, common + [f"trainer.run_dir={folded}"], timeout=400)
    _torchrun(1, common + [f"trainer.run_dir={single}", "parallel.tp=1", "parallel.ep=1"])
    a = [r["loss"] for r in _metrics(folded) if "loss" in r]
    b = [r["loss"] for r in _metrics(single) if "loss" in r]
    assert len(a) == len(b) == 6
    assert a == pytest.approx(b, rel=1e-5)
    last = _metrics(folded)[-1]
    assert last["moe/load_balancing"] > 0 and last["moe/z_loss"] > 0 and last["moe/load_imbalance"] >= 1.0
    # Every routed slot is counted once: tokens x k over the 4 MoE layers.
    assert sum(last[f"moe/tokens_per_expert/{e}"] for e in range(8)) == 16 * 128 * 2 * 4
    assert last["comm/ep/all_to_all_bytes"] > 0 and last["comm/edp/all_reduce_bytes"] > 0
    assert_dcp_checkpoint(folded / "checkpoints" / "step_000006")

    _torchrun(8, common + [f"trainer.run_dir={capacity}", "trainer.max_steps=4", "model.moe.capacity_factor=1.0"],
              timeout=400)
    rows = [r for r in _metrics(capacity) if "loss" in r]
    assert len(rows) == 4 and all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in rows)
    assert max(r["moe/dropped_fraction"] for r in rows) > 0 and last["moe/dropped_fraction"] == 0  # dropless
